"""Cost of privacy per training step: a non-private step against the two DP-SGD paths.

For each model preset (``conf/model/tiny28.yaml`` at 28x28x1, ``conf/model/small32.yaml``
at 32x32x3, read from the YAML so the bench follows the presets) it times, in one process
and on one fixed batch:

* a **non-private step**: the plain UNet, EDM diffusion loss (``training_loss(...).mean()``),
  backward, ``torch.optim.Adam`` step;
* a **DP step** of the same model (same initial weights) and the same batch on each of
  the two paths of :func:`privimage.dp.dpsgd.make_private`: ``hooks`` (Opacus' per-example
  gradients, the old default) and ``bookkeeping`` (:mod:`privimage.dp.bookkeeping`, norms
  from activations, one backward pass): forward, backward, ``optimizer.step()``,
  ``optimizer.zero_grad()``. The wrapped model and optimizer are called directly rather
  than through the Poisson loader, so every path sees exactly the same batch.

It prints the median images/second of each over ``--repeats`` timed steps (after two
untimed warm-up steps; the paths take turns, so load from other processes hits all
alike) and the ratio DP time / non-DP time of each DP path. With``
``--noise-multiplicity K > 1`` the DP step feeds every example K times (B*K rows) and
averages them before clipping, as fine-tuning does; the figures stay *examples* per
second (B per step), and the non-private step processes the same B*K rows, so the ratio
is the cost of DP against plain training on the same rows.

``--memory`` adds the peak memory of one step of each kind, each in a fresh process
(``VmHWM`` reset before the step, minus the resident size before it; glibc's mmap
threshold fixed so freed tensors leave the resident set), and the ratio DP / non-DP.
On a GPU it is ``torch.cuda.max_memory_allocated`` instead.

Usage::

    .venv/bin/python bench/dp_step.py                          # both presets, batch 64
    .venv/bin/python bench/dp_step.py --models tiny28 --batch-size 32 --repeats 3
    .venv/bin/python bench/dp_step.py --noise-multiplicity 4 --device cuda
    .venv/bin/python bench/dp_step.py --threads 1      # on a CPU shared with other jobs
    .venv/bin/python bench/dp_step.py --models tiny28,tiny32,small32 --memory  # the README table
    .venv/bin/python bench/dp_step.py --models tiny28 --per-layer   # where book-keeping's time goes
    .venv/bin/python bench/dp_step.py --models tiny28 --trainable up_blocks,conv_norm_out,conv_out
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from privimage import (
    DiffusionConfig,
    build_unet,
    count_parameters,
    load_group,
    make_opacus_safe,
    make_private,
    repeat_for_noise_draws,
    select_trainable,
    training_loss,
)

# Preset -> (resolution, channels) of the data it is the default model for.
PRESETS = {"tiny28": (28, 1), "lean28": (28, 1), "tiny32": (32, 3), "small32": (32, 3)}
NUM_CLASSES = 10
WARMUP = 2
# Poisson loader size only (it is never iterated): N = 8 batches, so q = 1/8.
BATCHES_IN_DATASET = 8
DP_PATHS = ("hooks", "bookkeeping")
PATHS = ("plain", *DP_PATHS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: dict[str, Callable[[], None]],
    repeats: int,
    device: torch.device,
    *,
    warmup: int = WARMUP,
) -> dict[str, tuple[list[float], float]]:
    """Per step function: wall seconds of ``repeats`` calls after ``WARMUP`` untimed ones,
    and the median CPU seconds per wall second.

    The step functions take turns (A, B, A, B, ...), so a burst of load from another
    process hits both paths alike instead of skewing their ratio. The CPU figure tells
    whether the run had the machine: on a CPU it is about the thread count when nothing
    else ran, and drops towards 1 when other processes took cores.
    """
    for _ in range(warmup):  # first calls pay for allocation and Opacus' hook set-up
        for step in steps.values():
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            wall = time.perf_counter() - start
            times[name].append(wall)
            cpu[name].append((time.process_time() - cpu_start) / wall)
    return {name: (times[name], statistics.median(cpu[name])) for name in steps}


def _steps(
    name: str,
    *,
    batch_size: int,
    noise_multiplicity: int,
    device: torch.device,
    paths,
    trainable: list[str] | None = None,
) -> tuple[dict[str, Callable[[], None]], dict[str, object], int, dict]:
    """One step function per path (``plain`` and each DP path) on one fixed batch.

    The ``partial`` path is book-keeping DP-SGD training only the parameters under the
    ``trainable`` prefixes (``finetune.trainable``), the rest frozen.
    """
    resolution, channels = PRESETS[name]
    torch.manual_seed(0)
    model = build_unet(
        load_group("model", name), resolution=resolution, channels=channels, num_classes=NUM_CLASSES
    )
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch_size, channels, resolution, resolution, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen).to(device)
    # Every path processes the same B*K rows; the DP paths treat each K as one example.
    xk, yk = repeat_for_noise_draws(x, y, noise_multiplicity)
    spec = DiffusionConfig()  # the default formulation (EDM)
    steps: dict[str, Callable[[], None]] = {}
    optimizers: dict[str, object] = {}
    wrapped: dict[str, torch.nn.Module] = {}
    if "plain" in paths:
        plain_model = copy.deepcopy(model).to(device).train()
        adam = torch.optim.Adam(plain_model.parameters(), lr=1e-4)
        plain_gen = torch.Generator().manual_seed(2)

        def plain_step() -> None:
            loss = training_loss(plain_model, xk, yk, spec=spec, generator=plain_gen).mean()
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()

        steps["plain"] = plain_step
    n = batch_size * BATCHES_IN_DATASET
    loader = DataLoader(
        TensorDataset(torch.zeros(n, channels, resolution, resolution), torch.zeros(n).long()),
        batch_size=batch_size,
    )
    for mode in (p for p in paths if p != "plain"):
        # Same initial weights; make_opacus_safe only adds forward pre-hooks.
        base = make_opacus_safe(copy.deepcopy(model)).to(device).train()
        if mode == "partial":
            select_trainable(base, trainable)
        with warnings.catch_warnings():
            # Opacus warns that its secure RNG is off; irrelevant to timing.
            warnings.simplefilter("ignore", UserWarning)
            dp_model, optimizer, _, _ = make_private(
                base,
                torch.optim.Adam([p for p in base.parameters() if p.requires_grad], lr=1e-4),
                loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                noise_multiplicity=noise_multiplicity,
                # Seeded for a timing only, on random inputs: real DP training must seed
                # these from secret entropy (privimage.io.seeding), as fine-tuning does.
                sampler_generator=torch.Generator().manual_seed(3),
                noise_generator=torch.Generator(device=device).manual_seed(4),
                grad_sample_mode="bookkeeping" if mode == "partial" else mode,
            )
        dp_gen = torch.Generator().manual_seed(2)

        def dp_step(dp_model=dp_model, optimizer=optimizer, dp_gen=dp_gen) -> None:
            loss = training_loss(dp_model, xk, yk, spec=spec, generator=dp_gen).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[mode] = dp_step
        optimizers[mode] = optimizer
        wrapped[mode] = dp_model
    return steps, optimizers, count_parameters(model), wrapped


def bench_preset(
    name: str,
    *,
    batch_size: int,
    repeats: int,
    noise_multiplicity: int,
    device: torch.device,
    trainable: list[str] | None = None,
) -> dict[str, float]:
    """Time every path for one preset; returns the figures of one table row."""
    steps, optimizers, params, _ = _steps(
        name,
        batch_size=batch_size,
        noise_multiplicity=noise_multiplicity,
        device=device,
        paths=(*PATHS, "partial") if trainable else PATHS,
        trainable=trainable,
    )
    with warnings.catch_warnings():
        # Opacus' backward hooks warn on the first layer, whose input (the noisy images)
        # needs no gradient; expected and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        timed = time_steps(steps, repeats, device)
    for mode, optimizer in optimizers.items():
        if optimizer.steps_taken != WARMUP + repeats:
            raise RuntimeError(f"the {mode} optimizer took {optimizer.steps_taken} steps")
    row: dict[str, float] = {"params": params}
    for path, (times, cpu) in timed.items():
        row[path] = batch_size / statistics.median(times)
        row[f"{path}_cpu"] = cpu
    for mode in optimizers:
        row[f"{mode}_ratio"] = row["plain"] / row[mode]
    return row


def per_layer(
    name: str, *, batch_size: int, repeats: int, noise_multiplicity: int, device: torch.device
) -> None:
    """Where a book-keeping step's extra time goes: its per-layer norm work and final sum.

    Prints the median plain and book-keeping step, then the time inside the wrapper's
    hooks per kind of layer (type, output shape, norm method, what is kept), summed over
    layers of that kind and averaged over ``repeats`` steps. The rest of a book-keeping
    step (forward, the input-gradient backward, Adam) is what a plain step does minus its
    weight gradients.
    """
    steps, _, _, wrapped = _steps(
        name,
        batch_size=batch_size,
        noise_multiplicity=noise_multiplicity,
        device=device,
        paths=("plain", "bookkeeping"),
    )
    engine = wrapped["bookkeeping"]
    timed = time_steps(steps, repeats, device)
    plain, bk = (statistics.median(timed[p][0]) for p in ("plain", "bookkeeping"))
    engine.timings = {}
    for _ in range(repeats):
        steps["bookkeeping"]()
    plans = engine.plans()
    modules = dict(engine._module.named_modules())
    kinds: dict[str, float] = {}
    layers: dict[str, int] = {}
    for layer, seconds in engine.timings.items():
        if layer in plans:
            m, plan = modules[layer], plans[layer]
            kind = (
                f"{type(m).__name__} {m.weight.shape[1]}->{m.weight.shape[0]}, "
                f"{plan.positions} positions: {plan.norm}, keep {plan.keep}"
            )
        elif layer in modules:
            kind = type(modules[layer]).__name__
        else:
            kind = layer
        kinds[kind] = kinds.get(kind, 0.0) + seconds / repeats
        layers[kind] = layers.get(kind, 0) + 1
    hooks = sum(engine.timings.values()) / repeats
    print(
        f"\n{name}: plain step {plain * 1e3:.0f} ms, book-keeping step {bk * 1e3:.0f} ms "
        f"({bk / plain:.2f}x); inside book-keeping's hooks {hooks * 1e3:.0f} ms per step"
    )
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds * 1e3:7.1f} ms  {layers[kind]:>3} x {kind}")


def measure_peak_memory(
    name: str, path: str, *, batch_size: int, noise_multiplicity: int, device: torch.device
) -> int:
    """Peak bytes one step of ``path`` adds, measured in this process (call it fresh)."""
    steps, _, _, _ = _steps(
        name,
        batch_size=batch_size,
        noise_multiplicity=noise_multiplicity,
        device=device,
        paths=(path,),
    )
    step = steps[path]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(WARMUP):  # optimizer state and Opacus' hooks exist before the peak
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        step()
        return _status_bytes("VmHWM") - base


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_in_fresh_process(
    name: str, path: str, *, batch_size: int, noise_multiplicity: int, device: torch.device
) -> int:
    """Run :func:`measure_peak_memory` in a new interpreter, so steps cannot share pages."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure-memory",
            f"{name}:{path}",
            "--batch-size",
            str(batch_size),
            "--noise-multiplicity",
            str(noise_multiplicity),
            "--device",
            str(device),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step (B)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path")
    parser.add_argument(
        "--models", default="tiny28,small32", help=f"comma-separated, from {', '.join(PRESETS)}"
    )
    parser.add_argument(
        "--noise-multiplicity",
        type=int,
        default=1,
        help="K diffusion-noise draws per example in the DP step (B*K rows)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own); 1 avoids thread contention when "
        "another process shares the cores",
    )
    parser.add_argument(
        "--memory", action="store_true", help="also measure each step's peak memory"
    )
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also print where a book-keeping step's time goes, per kind of layer",
    )
    parser.add_argument(
        "--trainable",
        default=None,
        help="comma-separated finetune.trainable prefixes: adds a 'partial' path, "
        "book-keeping DP-SGD training only those parameters",
    )
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    trainable = [t.strip() for t in args.trainable.split(",")] if args.trainable else None
    dp_paths = (*DP_PATHS, "partial") if trainable else DP_PATHS
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in PRESETS]
    if unknown:
        parser.error(f"unknown model preset(s) {unknown}; choose from {list(PRESETS)}")
    if args.noise_multiplicity < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size, --repeats and --noise-multiplicity must be >= 1")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )

    if args.measure_memory:  # the child process of peak_memory_in_fresh_process
        name, path = args.measure_memory.split(":")
        print(
            measure_peak_memory(
                name,
                path,
                batch_size=args.batch_size,
                noise_multiplicity=args.noise_multiplicity,
                device=device,
            )
        )
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(
        f"batch {args.batch_size} examples, noise multiplicity K={args.noise_multiplicity} "
        f"(DP step processes {args.batch_size * args.noise_multiplicity} rows), "
        f"{WARMUP} warm-up + {args.repeats} timed steps per path; median reported"
    )
    # Other processes on a small machine slow both paths; the load average says if they ran.
    print(f"load average before: {_load()}\n")
    header = f"{'model':<8} {'params':>9} {'non-DP img/s':>13}"
    for mode in dp_paths:
        header += f" {mode + ' img/s':>17} {mode + ' time':>17}"
    if args.memory:
        for mode in DP_PATHS:
            header += f" {mode + ' memory':>19}"
    print(header)
    for name in models:
        row = bench_preset(
            name,
            batch_size=args.batch_size,
            repeats=args.repeats,
            noise_multiplicity=args.noise_multiplicity,
            device=device,
            trainable=trainable,
        )
        line = f"{name:<8} {row['params']:>9,} {row['plain']:>13.1f}"
        for mode in dp_paths:
            line += f" {row[mode]:>17.1f} {row[mode + '_ratio']:>16.2f}x"
        if args.memory:
            peaks = {
                path: peak_memory_in_fresh_process(
                    name,
                    path,
                    batch_size=args.batch_size,
                    noise_multiplicity=args.noise_multiplicity,
                    device=device,
                )
                for path in PATHS
            }
            for mode in DP_PATHS:
                line += f" {peaks[mode] / peaks['plain']:>7.2f}x ({peaks[mode] / 2**20:>5.0f} MiB)"
            line += f"   [non-DP peak {peaks['plain'] / 2**20:.0f} MiB]"
        cpu = "/".join(f"{row[p + '_cpu']:.2f}" for p in ("plain", *dp_paths))
        print(f"{line}   cpu/wall {cpu}", flush=True)
    if args.per_layer:
        for name in models:
            per_layer(
                name,
                batch_size=args.batch_size,
                repeats=args.repeats,
                noise_multiplicity=args.noise_multiplicity,
                device=device,
            )
    print(
        "\nimg/s counts examples (B per step); every path processes the same B*K rows. time "
        "and memory are\nDP / non-DP of one step (medians; memory: peak above the resident "
        "size before the step).\ncpu/wall is CPU seconds per wall second (non-DP/"
        + "/".join(dp_paths)
        + "), about the thread count when the run had the machine."
    )
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()

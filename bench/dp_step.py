"""Cost of privacy per training step: a non-private step against a DP-SGD step.

For each model preset (``conf/model/tiny28.yaml`` at 28x28x1, ``conf/model/small32.yaml``
at 32x32x3, read from the YAML so the bench follows the presets) it times, in one process
and on one fixed batch:

* a **non-private step**: the plain UNet, EDM diffusion loss (``training_loss(...).mean()``),
  backward, ``torch.optim.Adam`` step;
* a **DP step** of the same model (same initial weights) and the same batch, wrapped by
  :func:`privimage.dpsgd.make_private` (Opacus per-sample gradients, clipping, noise,
  :class:`~privimage.dpsgd.NoiseMultiplicityDPOptimizer`): forward, backward,
  ``optimizer.step()``, ``optimizer.zero_grad()``. The wrapped model and optimizer are
  called directly rather than through the Poisson loader, so both paths see exactly the
  same batch.

It prints the median images/second of each over ``--repeats`` timed steps (after two
untimed warm-up steps; the two paths take turns, so load from other processes hits both
alike) and their ratio, the slowdown that DP-SGD costs. With
``--noise-multiplicity K > 1`` the DP step feeds every example K times (B*K rows) and
averages them before clipping, as fine-tuning does; the figures stay *examples* per
second (B per step) so the ratio is the cost of one DP example against one plain one.

Usage::

    .venv/bin/python bench/dp_step.py                          # both presets, batch 64
    .venv/bin/python bench/dp_step.py --models tiny28 --batch-size 32 --repeats 3
    .venv/bin/python bench/dp_step.py --noise-multiplicity 4 --device cuda
    .venv/bin/python bench/dp_step.py --threads 1      # on a CPU shared with other jobs
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from privimage.__main__ import config_dir
from privimage.config import DiffusionConfig, ModelConfig
from privimage.diffusion import training_loss
from privimage.dpsgd import make_private, repeat_for_noise_draws
from privimage.models import build_unet, count_parameters, make_opacus_safe

# Preset -> (resolution, channels) of the data it is the default model for.
PRESETS = {"tiny28": (28, 1), "tiny32": (32, 3), "small32": (32, 3)}
NUM_CLASSES = 10
WARMUP = 2
# Poisson loader size only (it is never iterated): N = 8 batches, so q = 1/8.
BATCHES_IN_DATASET = 8


def load_preset(name: str) -> ModelConfig:
    """The preset YAML merged onto the schema, so unknown keys fail as they would in a run."""
    path = Path(config_dir()) / "model" / f"{name}.yaml"
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


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


def bench_preset(
    name: str, *, batch_size: int, repeats: int, noise_multiplicity: int, device: torch.device
) -> dict[str, float]:
    """Time both steps for one preset; returns the figures of one table row."""
    resolution, channels = PRESETS[name]
    torch.manual_seed(0)
    model = build_unet(
        load_preset(name), resolution=resolution, channels=channels, num_classes=NUM_CLASSES
    )
    # Same initial weights for the DP copy; make_opacus_safe only adds forward pre-hooks.
    dp_base = make_opacus_safe(copy.deepcopy(model)).to(device).train()
    model = model.to(device).train()

    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch_size, channels, resolution, resolution, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen).to(device)
    spec = DiffusionConfig()  # the default formulation (EDM)

    # ---- non-private -----------------------------------------------------------------
    adam = torch.optim.Adam(model.parameters(), lr=1e-4)
    plain_gen = torch.Generator().manual_seed(2)

    def plain_step() -> None:
        loss = training_loss(model, x, y, spec=spec, generator=plain_gen).mean()
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()

    # ---- DP-SGD ----------------------------------------------------------------------
    n = batch_size * BATCHES_IN_DATASET
    loader = DataLoader(
        TensorDataset(torch.zeros(n, channels, resolution, resolution), torch.zeros(n).long()),
        batch_size=batch_size,
    )
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off; irrelevant to timing.
        warnings.simplefilter("ignore", UserWarning)
        dp_model, optimizer, _, _ = make_private(
            dp_base,
            torch.optim.Adam(dp_base.parameters(), lr=1e-4),
            loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_multiplicity=noise_multiplicity,
            # Seeded for a timing only, on random inputs: real DP training must seed these
            # from secret entropy (privimage.io.seeding), as the finetune stage does.
            sampler_generator=torch.Generator().manual_seed(3),
            noise_generator=torch.Generator(device=device).manual_seed(4),
        )
    xk, yk = repeat_for_noise_draws(x, y, noise_multiplicity)
    dp_gen = torch.Generator().manual_seed(2)

    def dp_step() -> None:
        loss = training_loss(dp_model, xk, yk, spec=spec, generator=dp_gen).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        # Opacus' backward hooks warn on the first layer, whose input (the noisy images)
        # needs no gradient; expected and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        timed = time_steps({"plain": plain_step, "dp": dp_step}, repeats, device)
    (plain, plain_cpu), (dp, dp_cpu) = timed["plain"], timed["dp"]
    if optimizer.steps_taken != WARMUP + repeats:
        raise RuntimeError(f"the DP optimizer took {optimizer.steps_taken} steps, not all noised")

    plain_rate = batch_size / statistics.median(plain)
    dp_rate = batch_size / statistics.median(dp)
    return {
        "params": count_parameters(model),
        "plain": plain_rate,
        "dp": dp_rate,
        "dp_min": batch_size / max(dp),
        "dp_max": batch_size / min(dp),
        "plain_min": batch_size / max(plain),
        "plain_max": batch_size / min(plain),
        "slowdown": plain_rate / dp_rate,
        "plain_cpu": plain_cpu,
        "dp_cpu": dp_cpu,
    }


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
    args = parser.parse_args()
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

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(
        f"batch {args.batch_size} examples, noise multiplicity K={args.noise_multiplicity} "
        f"(DP step processes {args.batch_size * args.noise_multiplicity} rows), "
        f"{WARMUP} warm-up + {args.repeats} timed steps per path; median reported"
    )
    # Other processes on a small machine slow both paths; the load average says if they ran.
    print(f"load average before: {_load()}\n")
    print(
        f"{'model':<8} {'params':>9} {'non-DP img/s':>13} {'(min-max)':>13} "
        f"{'DP img/s':>9} {'(min-max)':>13} {'DP slowdown':>12} {'cpu/wall':>10}"
    )
    for name in models:
        row = bench_preset(
            name,
            batch_size=args.batch_size,
            repeats=args.repeats,
            noise_multiplicity=args.noise_multiplicity,
            device=device,
        )
        print(
            f"{name:<8} {row['params']:>9,} {row['plain']:>13.1f} "
            f"{row['plain_min']:>6.1f}-{row['plain_max']:<6.1f} {row['dp']:>9.1f} "
            f"{row['dp_min']:>6.1f}-{row['dp_max']:<6.1f} {row['slowdown']:>11.2f}x "
            f"{row['plain_cpu']:>4.2f}/{row['dp_cpu']:<4.2f}",
            flush=True,
        )
    print(
        "\nimg/s counts examples (B per step) on both paths, also when K > 1; slowdown is "
        "non-DP img/s / DP img/s;\ncpu/wall is CPU seconds per wall second (non-DP/DP), "
        "about the thread count when the run had the machine."
    )
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()

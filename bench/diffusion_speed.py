"""Pretraining and sampling throughput of the diffusion core, per model preset.

For each preset (read from ``conf/model/<name>.yaml``) it times, in one process:

* a **pretraining step** as the pretrain stage takes it: EDM per-example loss on a batch
  of ``--batch-size`` images, backward, AdamW step, EMA update;
* **sampling** a batch of ``--sample-batch`` images with the deterministic EDM solvers
  at ``--steps`` steps: Heun (``2 steps - 1`` network calls) and Euler (``steps`` calls).

It prints median images/second over ``--repeats`` timed calls (after one untimed
warm-up; the timed functions take turns so background load hits all alike), the ratio
Heun/Euler (the price of the second-order correction), and the median CPU
seconds per wall second (about the thread count when the machine was idle).

Usage::

    .venv/bin/python bench/diffusion_speed.py                  # tiny28, tiny32, small32
    .venv/bin/python bench/diffusion_speed.py --models tiny32 --steps 18 --repeats 3
    .venv/bin/python bench/diffusion_speed.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from dp_step import PRESETS, time_steps

from privimage import (
    EMA,
    DiffusionConfig,
    build_unet,
    count_parameters,
    load_group,
    sample_batch,
    training_loss,
)

NUM_CLASSES = 10


def bench_preset(
    name: str,
    *,
    batch_size: int,
    sample_batch_size: int,
    steps: int,
    repeats: int,
    device: torch.device,
) -> dict[str, float]:
    resolution, channels = PRESETS[name]
    torch.manual_seed(0)
    model = build_unet(
        load_group("model", name), resolution=resolution, channels=channels, num_classes=NUM_CLASSES
    ).to(device)
    ema = EMA(model, decay=0.999)
    spec = DiffusionConfig()
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch_size, channels, resolution, resolution, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    counter = [0]

    def train_step() -> None:
        model.train()
        loss = training_loss(model, x, y, spec=spec, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        counter[0] += 1

    seeds = list(range(sample_batch_size))
    labels = torch.arange(sample_batch_size) % NUM_CLASSES

    def sampler(solver: str):
        def run() -> None:
            sample_batch(
                ema.module.eval(),
                spec=spec,
                seeds=seeds,
                labels=labels,
                num_steps=steps,
                solver=solver,
            )

        return run

    timed = time_steps(
        {"train": train_step, "heun": sampler("heun"), "euler": sampler("euler")},
        repeats,
        device,
        warmup=1,
    )
    train = batch_size / statistics.median(timed["train"][0])
    heun = sample_batch_size / statistics.median(timed["heun"][0])
    euler = sample_batch_size / statistics.median(timed["euler"][0])
    return {
        "params": count_parameters(model),
        "train": train,
        "heun": heun,
        "euler": euler,
        "heun_over_euler": heun / euler,
        "cpu": statistics.median([timed[k][1] for k in timed]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny28,tiny32,small32")
    parser.add_argument("--batch-size", type=int, default=64, help="training images per step")
    parser.add_argument("--sample-batch", type=int, default=100, help="images per sampling call")
    parser.add_argument("--steps", type=int, default=18, help="solver steps (EDM uses 18)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {where}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
        f"train batch {args.batch_size}, sample batch {args.sample_batch}, {args.steps} steps "
        f"(Heun {2 * args.steps - 1} network calls, Euler {args.steps}); "
        f"medians of {args.repeats}"
    )
    header = (
        f"{'preset':<8} {'params':>7} {'train img/s':>12} {'heun img/s':>11} "
        f"{'euler img/s':>12} {'heun/euler':>11} {'cpu/wall':>9}"
    )
    print(header)
    for name in args.models.split(","):
        r = bench_preset(
            name,
            batch_size=args.batch_size,
            sample_batch_size=args.sample_batch,
            steps=args.steps,
            repeats=args.repeats,
            device=device,
        )
        print(
            f"{name:<8} {r['params'] / 1e6:>6.2f}M {r['train']:>12.1f} {r['heun']:>11.1f} "
            f"{r['euler']:>12.1f} {r['heun_over_euler']:>11.2f} {r['cpu']:>9.2f}"
        )


if __name__ == "__main__":
    main()

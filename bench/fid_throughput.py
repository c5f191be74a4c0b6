"""Throughput of FID feature extraction (``inception_features``) on this machine.

Prints the median images/second over a few repetitions for each batch size and input kind
(28x28 grey like MNIST, 32x32 RGB like CIFAR-10), to size the evaluation stage. Every image is
resampled to 299x299, so input size barely matters; the Inception forward pass dominates.

Usage::

    python bench/fid_throughput.py                      # defaults: batch 25/50/100, 3 reps
    python bench/fid_throughput.py --images 200 --reps 5 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from privimage import inception_features, load_inception

INPUTS = {"gray28": (1, 28, 28), "rgb32": (3, 32, 32)}


def images_per_second(images: torch.Tensor, batch_size: int, device: str) -> tuple[float, float]:
    """Images/second of one ``inception_features`` call, and its CPU seconds per wall second.

    The second figure tells whether the run had the machine: it is about the thread count when
    nothing else ran, and drops towards 1 when other processes took cores.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    inception_features(images, batch_size=batch_size, device=device, progress=False)
    # inception_features returns numpy, so the device work has finished when it returns.
    wall = time.perf_counter() - start
    return len(images) / wall, (time.process_time() - cpu_start) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--images", type=int, default=100, help="images per repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", nargs="+", choices=list(INPUTS), default=list(INPUTS))
    args = parser.parse_args()

    start = time.perf_counter()
    load_inception(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"network load: {time.perf_counter() - start:.1f} s")
    print(f"{args.images} images per repetition, {args.reps} repetitions; median reported")
    # Other processes on a small machine halve these figures; the load average says if they ran.
    print(f"load average before: {_load()}\n")
    print(f"{'input':<8} {'batch':>5} {'img/s (median)':>15} {'min':>7} {'max':>7} {'cpu/wall':>9}")

    gen = torch.Generator().manual_seed(0)
    for name in args.inputs:
        shape = INPUTS[name]
        images = torch.randint(0, 256, (args.images, *shape), dtype=torch.uint8, generator=gen)
        for batch_size in args.batch_sizes:
            # One untimed batch first: the first call of a shape pays for allocator warm-up.
            inception_features(
                images[:batch_size], batch_size=batch_size, device=args.device, progress=False
            )
            runs = [images_per_second(images, batch_size, args.device) for _ in range(args.reps)]
            rates = [rate for rate, _ in runs]
            cpu = statistics.median(util for _, util in runs)
            print(
                f"{name:<8} {batch_size:>5} {statistics.median(rates):>15.2f} "
                f"{min(rates):>7.2f} {max(rates):>7.2f} {cpu:>9.2f}",
                flush=True,
            )
    print(f"\nload average after: {_load()}")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()

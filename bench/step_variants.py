"""Training-step variants on the CPU: does ``foreach`` or ``channels_last`` speed up tiny28?

Three copies of the demo's pretraining step (``tiny28``, batch 64, EDM loss, AdamW, EMA)
run interleaved, so the machine's drift hits all of them alike:

* ``loop``: what the pretraining stage does (AdamW's per-parameter loop on CPU tensors,
  the EMA as one ``lerp_`` per parameter);
* ``foreach``: AdamW with ``foreach=True`` and the EMA as one ``torch._foreach_lerp_``;
* ``foreach+channels_last``: the same with the model and batch in channels-last layout.

Prints each variant's median step time, images/s and speed-up over ``loop``.

    python bench/step_variants.py --repeats 25
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from privimage import DiffusionConfig, build_unet, load_group, training_loss

VARIANTS = {"loop": (False, False), "foreach": (True, False), "foreach+channels_last": (True, True)}


def make(foreach: bool, channels_last: bool):
    torch.manual_seed(0)
    model = build_unet(load_group("model", "tiny28"), resolution=28, channels=1, num_classes=10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=foreach)
    return model, ema, opt


@torch.no_grad()
def update_ema(ema, model, *, foreach: bool, decay: float = 0.999) -> None:
    pairs = list(zip(ema.parameters(), model.parameters(), strict=True))
    if foreach:
        torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1 - decay)
    else:
        for e, p in pairs:
            e.lerp_(p.detach(), 1 - decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = DiffusionConfig(p_mean=0.6)
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (64,))
    setups = {name: make(*flags) for name, flags in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for rep in range(args.repeats):
        for name, (model, ema, opt) in setups.items():
            foreach, channels_last = VARIANTS[name]
            batch = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            gen = torch.Generator().manual_seed(rep)
            start = time.perf_counter()
            loss = training_loss(model, batch, y, spec=spec, generator=gen).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_ema(ema, model, foreach=foreach)
            times[name].append(time.perf_counter() - start)
    warm = min(3, args.repeats - 1)  # the first steps pay for allocations
    base = statistics.median(times["loop"][warm:])
    for name, t in times.items():
        m = statistics.median(t[warm:])
        print(f"{name:<24} median step {m:.4f} s, {64 / m:6.1f} img/s, speed-up x{base / m:.3f}")


if __name__ == "__main__":
    main()

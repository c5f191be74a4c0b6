"""Public-proxy utility of a run's generator on natural images: classifiers trained on its
samples, tested on the held-out public images of the classes its query selected.

The sampling settings of a run (the guidance scale above all) must not be chosen on the
sensitive test split, nor on anything computed from sensitive data outside the ledger.
The query's selection is a DP release and the public dataset is public: the held-out
public images of the selected classes (Tiny-ImageNet's, for a CIFAR-10 run), relabelled
to the sensitive class that took them, are a labelled test set that touches no
sensitive image. A classifier trained on the samples of a given guidance scale and
scored there answers "do these samples carry their class, with enough variety to
generalise?", which is what the downstream accuracy asks of them. The proxy's images
come from other sources than the sensitive ones, so its figures run lower: use it to
rank settings, not to predict the sensitive number. ``bench/handwriting_proxy.py`` is
the same idea for the digit demo.

For each guidance scale it samples ``--per-class`` images per class from the run's UNet
(seeds from 10**6, apart from the run's own; the run's solver and steps), trains the
run's downstream classifiers (its evaluation settings; ``--set`` overrides them, e.g.
``evaluate.classifier_arch=resnet``) with each seed of ``--seeds``, and prints one JSON
line per scale. The last line names the scale with the highest mean proxy accuracy:
a rule fixed before the numbers are seen.

    python bench/selection_proxy.py runs/gpu_recipe --guidance 1 2 3 --per-class 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from short_pretraining import relabelled, selection_mapping

from privimage import (
    Config,
    DiffusionConfig,
    ImageSplit,
    SealedSplit,
    cache_root,
    evaluate_downstream,
    load_dataset,
    load_run_config,
    load_unet,
    resolve_device,
    sample_batch,
    sampler_name,
)

FIRST_SEED = 10**6


def selection_test_split(cfg: Config, selection: dict) -> ImageSplit:
    """Held-out public images of the selected public classes, labelled by sensitive class."""
    if selection["public_source"] != cfg.public.source:
        raise SystemExit(
            f"the selection is a query of {selection['public_source']}, "
            f"but the run's public data is {cfg.public.source}"
        )
    public = load_dataset(cfg.public, cache_dir=cache_root(cfg.cache_dir))
    return relabelled(public.test, selection_mapping(selection), public.num_classes)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    spec: DiffusionConfig,
    cfg: Config,
    *,
    classes: int,
    per_class: int,
    guidance: float,
    device: torch.device,
) -> ImageSplit:
    """``per_class`` images of every class at ``guidance``, with the run's solver and steps."""
    labels = torch.arange(classes).repeat_interleave(per_class)
    seeds = list(range(FIRST_SEED, FIRST_SEED + len(labels)))
    batch = cfg.sample.batch_size
    out = []
    for i in range(0, len(labels), batch):
        x = sample_batch(
            model,
            spec=spec,
            seeds=seeds[i : i + batch],
            labels=labels[i : i + batch],
            num_steps=cfg.sample.num_inference_steps,
            solver=sampler_name(cfg),
            guidance_scale=guidance,
        )
        out.append(x)
    return ImageSplit(torch.cat(out), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder with query/ and the UNet")
    parser.add_argument("--unet", default="finetune/unet", help="UNet folder in the run")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = load_run_config(args.run_dir, args.set)
    unet_dir = args.run_dir / args.unet
    selection_file = args.run_dir / "query" / "selection.json"
    for path in (unet_dir, selection_file):
        if not path.exists():
            raise SystemExit(f"{path}: missing (a finished run has query/ and {args.unet})")
    selection = json.loads(selection_file.read_text())
    classes = len(selection["classes"])
    test = selection_test_split(cfg, selection)
    model, spec = load_unet(unet_dir)
    model.to(device).eval()
    print(json.dumps({"proxy_test_images": len(test), "device": str(device)}), flush=True)
    scores = {}
    for guidance in args.guidance:
        start = time.perf_counter()
        synthetic = sample(
            model,
            spec,
            cfg,
            classes=classes,
            per_class=args.per_class,
            guidance=guidance,
            device=device,
        )
        sampled = time.perf_counter() - start
        runs = []
        for seed in args.seeds:
            report, _, _ = evaluate_downstream(
                synthetic,
                SealedSplit(test),
                num_classes=classes,
                settings=cfg.evaluate,
                seed=seed,
                progress=False,
                device=device,
            )
            runs.append({k: round(v["test_accuracy"], 3) for k, v in report["classifiers"].items()})
        per_run = [statistics.fmean(r.values()) for r in runs]
        scores[guidance] = statistics.fmean(per_run)
        line = {
            "guidance": guidance,
            "per_class": args.per_class,
            "proxy_accuracy": round(scores[guidance], 4),
            "spread": round(max(per_run) - min(per_run), 4),
            "runs": runs,
            "sample_s": round(sampled, 1),
            "total_s": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(line), flush=True)
    print(json.dumps({"chosen_guidance": max(scores, key=scores.get)}), flush=True)


if __name__ == "__main__":
    main()

"""Stage 5: how good is the synthetic data?

- Fidelity: FID between the synthetic images and the sensitive training split, on the
  TF-Inception-2015 features (reference statistics cached per dataset).
- Utility: a classifier trained only on the synthetic images, for a fixed number of
  epochs (no model selection, so the real test split is touched exactly once), and its
  accuracy on the real sensitive test split.

These measurements read sensitive data and are for the data owner's eyes; they are not
part of the DP release. Writes ``evaluate/metrics.json``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from privimage import data
from privimage.classifier import accuracy, predict_logits, train_classifier
from privimage.config import Config
from privimage.data.cache import cache_key
from privimage.metrics import (
    cached_statistics,
    feature_statistics,
    frechet_distance,
    inception_features,
)
from privimage.runtime import (
    LEDGER_FILE,
    cache_root,
    mark_done,
    read_json,
    require_upstream,
    resolve_device,
    stage_dir,
    write_json,
)

log = logging.getLogger(__name__)

STAGE = "evaluate"


def reference_subset(split: data.ImageSplit, n: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of ``n`` images (all when n is None or too large)."""
    if n is None or n >= len(split):
        return split.images
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.images[idx]


def run(cfg: Config, run_dir: Path) -> Path:
    """Compute FID and downstream accuracy; see the module docstring."""
    sample_dir = require_upstream(run_dir, "sample", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cache = cache_root(cfg.cache_dir)
    ev = cfg.evaluate

    with np.load(sample_dir / "samples.npz") as f:
        synth_images = torch.from_numpy(f["images"])
        synth_labels = torch.from_numpy(f["labels"])
    sensitive = data.load(cfg.data, cache_dir=cache)

    key_spec = {"data": asdict(cfg.data), "n": ev.fid_reference_images, "seed": cfg.seed}
    key = "train-" + cache_key(key_spec)
    ref_mu, ref_sigma = cached_statistics(
        key,
        lambda: reference_subset(sensitive.train, ev.fid_reference_images, cfg.seed),
        cache_dir=cache,
        batch_size=ev.fid_batch_size,
        device=device,
        desc="inception features (real)",
    )
    feats = inception_features(
        synth_images,
        batch_size=ev.fid_batch_size,
        device=device,
        desc="inception features (synthetic)",
    )
    mu, sigma = feature_statistics(feats)
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)

    clf = train_classifier(
        data.ImageSplit(synth_images, synth_labels).as_float(),
        synth_labels,
        num_classes=sensitive.num_classes,
        width=ev.classifier_width,
        epochs=ev.classifier_epochs,
        batch_size=ev.classifier_batch_size,
        lr=ev.classifier_lr,
        device=device,
        seed=cfg.seed,
        desc="downstream classifier (synthetic data)",
    )
    logits = predict_logits(clf, sensitive.test.as_float(), batch_size=512, device=device)
    acc = accuracy(logits, sensitive.test.labels)

    ledger_path = Path(run_dir) / LEDGER_FILE
    ledger = read_json(ledger_path) if ledger_path.exists() else None
    metrics = {
        "fid": fid,
        "fid_synthetic_images": int(len(synth_images)),
        "fid_reference_images": int(
            min(ev.fid_reference_images or len(sensitive.train), len(sensitive.train))
        ),
        "fid_reference": "sensitive train split",
        "downstream_accuracy": acc,
        "downstream_classifier": f"SmallCNN(width={ev.classifier_width}), "
        f"{ev.classifier_epochs} epochs on synthetic data, tested once on the real test split",
        "real_test_images": int(len(sensitive.test)),
        "epsilon_spent": ledger["epsilon_spent"] if ledger else None,
        "target_epsilon": ledger["target_epsilon"] if ledger else None,
        "delta": ledger["delta"] if ledger else None,
    }
    write_json(out / "metrics.json", metrics)
    log.info("FID %.2f, downstream accuracy %.3f", fid, acc)
    mark_done(out)
    return out

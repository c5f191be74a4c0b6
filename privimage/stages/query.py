"""Stage 1, the DP semantic query: which public classes look like each sensitive class?

A classifier trained on the public set (its labels are the semantics) predicts the top-k
public classes of every sensitive training image. Each image adds 1 to those k cells of
its sensitive class's histogram row (L2 sensitivity sqrt(k)); Gaussian noise makes the
histogram DP; each sensitive class then keeps its top public classes, disjoint across
classes, and those public images are relabelled to the sensitive class.

Writes ``query/``: ``selection.json``, ``selection.png``, ``public_index.npy``,
``public_labels.npy``, ``histogram_noisy.npy``; records one Gaussian mechanism in the
run's privacy ledger.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from privimage import data, privacy
from privimage.classifier import accuracy, predict_logits, train_classifier
from privimage.config import Config
from privimage.data.cache import cache_key
from privimage.errors import ConfigError
from privimage.models import SmallCNN
from privimage.plots import save_image_grid
from privimage.runtime import (
    LEDGER_FILE,
    cache_root,
    mark_done,
    resolve_device,
    save_npy,
    stage_dir,
    write_json,
)

log = logging.getLogger(__name__)

STAGE = "query"


def _classifier_key(cfg: Config) -> str:
    spec = {
        "public": asdict(cfg.public),
        "width": cfg.query.classifier_width,
        "epochs": cfg.query.classifier_epochs,
        "batch_size": cfg.query.batch_size,
        "lr": cfg.query.lr,
        "seed": cfg.seed,
        "version": 1,
    }
    return cache_key(spec)


def query_classifier(cfg: Config, public: data.ImageDataset, device: torch.device) -> tuple:
    """Train the semantic query function on public data, or reuse the cached one.

    It depends only on the public data and its own settings, so every run (and every
    epsilon of a sweep) with the same public set shares one trained classifier.
    Returns ``(model, public_test_top1)``.
    """
    path = cache_root(cfg.cache_dir) / "query_classifiers" / f"{_classifier_key(cfg)}.pt"
    model = SmallCNN(
        in_channels=cfg.public.channels,
        num_classes=public.num_classes,
        width=cfg.query.classifier_width,
    )
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        log.info("query classifier reused from %s", path)
        return model.to(device).eval(), float(saved["public_test_top1"])
    model = train_classifier(
        public.train.as_float(),
        public.train.labels,
        num_classes=public.num_classes,
        width=cfg.query.classifier_width,
        epochs=cfg.query.classifier_epochs,
        batch_size=cfg.query.batch_size,
        lr=cfg.query.lr,
        device=device,
        seed=cfg.seed,
        desc="query classifier (public data)",
    )
    logits = predict_logits(model, public.test.as_float(), batch_size=512, device=device)
    top1 = accuracy(logits, public.test.labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.cpu().state_dict(), "public_test_top1": top1}, tmp)
    tmp.replace(path)
    return model.to(device).eval(), top1


def query_noise_multiplier(cfg: Config) -> float:
    """The query's noise multiplier: given directly, or calibrated to its epsilon share.

    With ``query.epsilon`` set, the one-shot Gaussian mechanism (sampling rate 1) is
    calibrated under the run's accountant to spend at most that share at the run's delta.
    """
    if cfg.query.epsilon is None:
        return cfg.query.noise_multiplier
    return privacy.calibrate_noise_multiplier(
        target_epsilon=cfg.query.epsilon,
        delta=cfg.privacy.delta,
        sample_rate=1.0,
        steps=1,
        accountant=cfg.privacy.accountant,
        epsilon_tolerance=min(0.01, cfg.query.epsilon / 100),
    )


def run(cfg: Config, run_dir: Path) -> Path:
    """Run the semantic query; see the module docstring for what it writes."""
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cache = cache_root(cfg.cache_dir)

    public = data.load(cfg.public, cache_dir=cache)
    model, public_top1 = query_classifier(cfg, public, device)
    log.info("query classifier: top-1 %.3f on the public test split", public_top1)

    sensitive = data.load(cfg.data, cache_dir=cache)
    n_sensitive = len(sensitive.train)
    privacy.check_delta(delta=cfg.privacy.delta, num_records=n_sensitive)
    k = cfg.query.top_k
    if k > public.num_classes:
        raise ConfigError(f"query.top_k={k} exceeds the {public.num_classes} public classes")
    per_class = privacy.classes_to_keep(
        num_public_classes=public.num_classes,
        num_sensitive_classes=sensitive.num_classes,
        classes_per_sensitive_class=cfg.query.classes_per_sensitive_class,
        fraction_of_public_classes=cfg.query.fraction_of_public_classes,
    )
    sigma = query_noise_multiplier(cfg)
    mechanism = privacy.query_mechanism(noise_multiplier=sigma, top_k=k)
    ledger = privacy.Ledger(
        Path(run_dir) / LEDGER_FILE,
        target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )
    # Refuses here, before the sensitive images are looked at, if over budget.
    ledger.begin(mechanism)

    logits = predict_logits(model, sensitive.train.as_float(), batch_size=512, device=device)
    topk = logits.topk(k, dim=1).indices.numpy()
    counts = privacy.topk_histogram(
        topk,
        sensitive.train.labels.numpy(),
        num_sensitive_classes=sensitive.num_classes,
        num_public_classes=public.num_classes,
    )
    rng = np.random.default_rng(cfg.seed)
    noisy = privacy.add_gaussian_noise(
        counts, noise_multiplier=mechanism.noise_multiplier, top_k=k, rng=rng
    )
    selection = privacy.select_public_classes(noisy, classes_per_sensitive_class=per_class)
    ledger.complete(mechanism)
    # The exact counts are sensitive and never written; only the noisy ones are released.
    del counts

    public_labels_np = public.train.labels.numpy()
    index_parts, label_parts, classes_json = [], [], []
    for s, chosen in enumerate(selection):
        entries = []
        for p in chosen:
            idx = np.flatnonzero(public_labels_np == p)
            index_parts.append(idx)
            label_parts.append(np.full(len(idx), s, dtype=np.int64))
            entries.append(
                {
                    "public_class": int(p),
                    "name": public.class_names[p],
                    "noisy_count": float(noisy[s, p]),
                    "images": int(len(idx)),
                }
            )
        classes_json.append(
            {"sensitive_class": s, "name": sensitive.class_names[s], "public_classes": entries}
        )
    public_index = np.concatenate(index_parts) if index_parts else np.empty(0, np.int64)
    public_relabel = np.concatenate(label_parts) if label_parts else np.empty(0, np.int64)

    save_npy(out / "public_index.npy", public_index.astype(np.int64))
    save_npy(out / "public_labels.npy", public_relabel)
    save_npy(out / "histogram_noisy.npy", noisy)
    write_json(
        out / "selection.json",
        {
            "public_source": cfg.public.source,
            "sensitive_source": cfg.data.source,
            "top_k": k,
            "noise_multiplier": mechanism.noise_multiplier,
            "noise_std": mechanism.noise_multiplier * float(np.sqrt(k)),
            "classes_per_sensitive_class": per_class,
            "query_classifier_public_test_top1": public_top1,
            "selected_public_images": int(len(public_index)),
            "classes": classes_json,
        },
    )
    _save_selection_grid(cfg, public, selection, sensitive.class_names, out / "selection.png")
    mark_done(out)
    return out


def _save_selection_grid(
    cfg: Config,
    public: data.ImageDataset,
    selection: list[list[int]],
    sensitive_names: list[str],
    path: Path,
) -> None:
    """One row per sensitive class: a few public images from the classes it selected."""
    g = torch.Generator().manual_seed(cfg.seed)
    rows, labels = [], []
    n = cfg.query.grid_images_per_class
    for s, chosen in enumerate(selection):
        idx = torch.from_numpy(np.flatnonzero(np.isin(public.train.labels.numpy(), chosen)))
        pick = idx[torch.randperm(len(idx), generator=g)[:n]]
        rows.append(public.train.images[pick])
        names = ", ".join(public.class_names[p] for p in chosen)
        labels.append(f"{sensitive_names[s]} <- {names}"[:40])
    save_image_grid(rows, path, row_labels=labels, title="public images selected per class")

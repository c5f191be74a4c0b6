"""Stage 5: how good is the synthetic data, and how much does it give away?

- **Fidelity**: FID and k-NN precision/recall (k = 4) between the synthetic images and a
  seeded subset of the sensitive training split, on TF-Inception-2015 pool features
  (reference features cached per dataset, subset size and seed). Inception Score needs
  class logits, which the shipped feature network does not have, so it is reported as not
  computed.
- **Utility**: a CNN, logistic regression and an MLP trained only on synthetic data, each
  selected (epoch, weight decay) on held-out *synthetic* images, beside the same
  classifiers trained on as many real training images (the reference); the real test
  split is opened once, after all training
  (:class:`~privimage.metrics.downstream.SealedSplit`).
- **Leakage**: for every synthetic image its nearest sensitive training image in pixel
  space (with SSIM and PSNR to it) and in Inception-feature space; the same statistics for
  real held-out test images as the baseline; the fraction of near-copies by a normalised
  nearest-neighbour criterion; a loss-threshold membership-inference attack on each
  downstream classifier (members: training images, non-members: test images); gradient
  inversion (Geiping et al. 2020) against the CNN trained on real data (positive
  control) and the one trained on synthetic data; a model-memorisation check: images
  inverted from each CNN (DeepInversion on its BN running statistics) and their nearest
  training images, against the held-out baseline; and the GAN-based inversion (GMI,
  Zhang et al. 2020) of each CNN through a DCGAN prior on the public data, scored by an
  independent classifier (:mod:`privimage.metrics.gan_attack`).

These measurements read sensitive data and are for the data owner's eyes; they are not
part of the DP release and nothing downstream reads them. Writes ``evaluate/``:
``metrics.json``, ``report.md``, ``samples.png``, ``nearest_pairs.png``,
``nearest_distances.png``, ``gradient_attack.png``, ``model_inversion.png``,
``gan_inversion.png``, and ``features/`` (cached synthetic features).

With ``evaluate.synthetic=<folder or .npz>`` any set of images is scored against
``cfg.data`` instead of this run's samples (no other stage needs to have run).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from privimage import data
from privimage.config.schema import Config, EvaluateConfig
from privimage.data.imagesets import UNLABELLED, load_image_set
from privimage.data.splits import random_subset
from privimage.errors import ConfigError, DataError
from privimage.io import artifacts
from privimage.io.artifacts import (
    Evaluation,
    Stage,
    load_evaluation,
    mark_done,
    read_ledger,
    require_upstream,
    save_evaluation,
    stage_dir,
)
from privimage.metrics import cached_features, gan_attack, leakage
from privimage.metrics import downstream as ds
from privimage.metrics.attacks import gradient_attack, model_memorisation, neighbour_stats
from privimage.metrics.fidelity import fidelity_summary
from privimage.plots import save_histograms, save_image_grid, save_pairs
from privimage.report import write_report
from privimage.runtime import cache_root, resolve_device

log = logging.getLogger(__name__)

STAGE = "evaluate"
# Independent seeded streams for the subsets drawn here (see privimage.data.splits).
STREAM_REFERENCE = 10
STREAM_HELDOUT = 11
STREAM_MEMBERS = 12
STREAM_PR_REAL = 13
STREAM_PR_SYNTHETIC = 14
STREAM_REAL_BASELINE = 15
STREAM_GRADIENT_ATTACK = 16
STREAM_FIDELITY = 17
NO_CNN = "no CNN was trained (unlabelled images or no cnn classifier)"


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]


def load_synthetic(
    cfg: Config, run_dir: Path, class_names: list[str], image_shape: tuple[int, ...]
) -> tuple[data.ImageSplit, str]:
    """The images to evaluate and where they came from."""
    channels, resolution = image_shape[0], image_shape[-1]
    if cfg.evaluate.synthetic is not None:
        split = load_image_set(
            cfg.evaluate.synthetic,
            class_names=class_names,
            resolution=resolution,
            channels=channels,
        )
        return split, str(cfg.evaluate.synthetic)
    sample_dir = require_upstream(run_dir, "sample", STAGE)
    path = sample_dir / artifacts.SAMPLES
    split = load_image_set(path, class_names=class_names, resolution=resolution, channels=channels)
    return split, str(path)


def _requested_source(cfg: Config, run_dir: Path) -> Path:
    if cfg.evaluate.synthetic is not None:
        return Path(cfg.evaluate.synthetic).expanduser().resolve()
    return (stage_dir(run_dir, "sample") / artifacts.SAMPLES).resolve()


def check_done(cfg: Config, run_dir: Path) -> None:
    """Called instead of :func:`run` when ``evaluate/DONE`` exists: refuse to pass off the
    scores of one image set as those of another (``evaluate.synthetic`` changed)."""
    done = load_evaluation(run_dir)
    if done is None:
        return
    scored = Path(done.synthetic or "").expanduser().resolve()
    wanted = _requested_source(cfg, run_dir)
    if scored != wanted:
        raise ConfigError(
            f"{stage_dir(run_dir, STAGE)} already holds the scores of {scored}; to score "
            f"{wanted} use another hydra.run.dir (or delete that evaluate/ folder)"
        )


def _subset(split: data.ImageSplit, n: int | None, seed: int, stream: int) -> data.ImageSplit:
    return split.subset(random_subset(len(split), n, seed, stream))


def run(cfg: Config, run_dir: Path) -> Path:
    """Measure fidelity, utility and leakage; see the module docstring."""
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cache = cache_root(cfg.cache_dir)
    lap = _Laps()
    sensitive = data.load(cfg.data, cache_dir=cache)
    train, class_names = sensitive.train, sensitive.class_names
    if len(train) < 2:
        raise DataError(f"the sensitive training split has {len(train)} image(s); need >= 2")
    # From here on the test split is reachable only through the seal.
    sealed_test = ds.SealedSplit(sensitive.test)
    del sensitive
    synthetic, synthetic_source = load_synthetic(
        cfg, run_dir, class_names, tuple(train.images.shape[1:])
    )
    if len(synthetic) < 2:
        raise DataError(f"{synthetic_source} holds {len(synthetic)} images; FID needs at least 2")
    feats = _Features(cfg, out, cache, device)
    fidelity, ref_feats, synth_feats = _measure_fidelity(cfg, feats, train, synthetic, device)
    lap("fidelity")
    utility, models, real_test, real_train = _measure_utility(
        cfg, synthetic, train, sealed_test, len(class_names), device
    )
    lap("utility")
    leak, synth_nn, held_nn = _measure_leakage(
        cfg,
        feats,
        out,
        train=train,
        synthetic=synthetic,
        real_test=real_test,
        real_train=real_train,
        models=models,
        ref_feats=ref_feats,
        synth_feats=synth_feats,
        num_classes=len(class_names),
        device=device,
    )
    lap("leakage")
    n_near = leak["near_copies"]["neighbours"]
    _save_pictures(out, synthetic, train, synth_nn, held_nn, class_names, cfg.evaluate, n_near)
    result = _evaluation(cfg, run_dir, fidelity, utility, leak, synthetic_source)
    lap("pictures")
    result.seconds = lap.seconds | {"total": round(sum(lap.seconds.values()), 1)}
    save_evaluation(out, result)
    write_report(out / artifacts.REPORT, result, class_names=class_names)
    acc = result.downstream_accuracy
    log.info(
        "FID %.2f, precision %.3f, recall %.3f, downstream accuracy %s, near-copies %d",
        result.fid,
        result.precision,
        result.recall,
        "n/a" if acc is None else f"{acc:.3f}",
        leak["near_copies"]["synthetic_count"],
    )
    mark_done(out)
    return out


class _Laps:
    """Wall seconds per part of the evaluation, for metrics.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 1)
        self._clock = now


class _Features:
    """Inception features, cached: real ones under the cache, synthetic ones in evaluate/."""

    def __init__(self, cfg: Config, out: Path, cache: Path, device: torch.device) -> None:
        self.cfg, self.out, self.cache = cfg, out, cache
        self.opts = {"batch_size": cfg.evaluate.feature_batch_size, "device": device}
        self.data_key = data.content_key(cfg.data)

    def real(self, split: data.ImageSplit, which: str, desc: str) -> np.ndarray:
        return cached_features(
            f"{self.data_key}-{which}-{len(split)}-{self.cfg.seed}",
            lambda: split.images,
            cache_dir=self.cache,
            desc=desc,
            **self.opts,
        )

    def synthetic(self, split: data.ImageSplit) -> np.ndarray:
        return cached_features(
            f"synthetic-{_digest(split.images)}",
            lambda: split.images,
            cache_dir=self.out,
            desc="inception features (synthetic images)",
            **self.opts,
        )


def _measure_fidelity(cfg, feats: _Features, train, synthetic, device):
    """FID and precision/recall; returns them with the two feature sets."""
    ev = cfg.evaluate
    reference = _subset(train, ev.reference_images.pick(device.type), cfg.seed, STREAM_REFERENCE)
    ref_feats = feats.real(reference, "train", "inception features (real training images)")
    # FID's estimate settles with a few hundred images while the classifiers keep gaining
    # from more, so the features (0.1 s an image on a CPU) may come from a seeded subset.
    featured = _subset(synthetic, ev.fidelity_images.pick(device.type), cfg.seed, STREAM_FIDELITY)
    synth_feats = feats.synthetic(featured)
    fidelity = fidelity_summary(
        synth_feats,
        ref_feats,
        k=ev.precision_recall_k,
        device=device,
        seed=cfg.seed,
        streams=(STREAM_PR_REAL, STREAM_PR_SYNTHETIC),
    )
    fidelity["synthetic_images_total"] = len(synthetic)
    return fidelity, ref_feats, synth_feats


def _measure_utility(cfg, synthetic, train, sealed_test, num_classes: int, device):
    """Train on synthetic, select on synthetic, test once on real. Returns the summary,
    the selected models, the opened test split and the as-many-real training set."""
    ev = cfg.evaluate
    labelled = bool((synthetic.labels != UNLABELLED).all())
    real_train = None
    if not (labelled and ev.classifiers):
        reason = "the synthetic images carry no labels" if not labelled else "no classifiers"
        return {"not_computed": reason}, {}, sealed_test.open(), real_train
    if ev.real_baseline:
        real_train = _subset(train, len(synthetic), cfg.seed, STREAM_REAL_BASELINE)
    utility, models, real_test = ds.evaluate_downstream(
        synthetic,
        sealed_test,
        num_classes=num_classes,
        settings=ev,
        seed=cfg.seed,
        device=device,
        real_train=real_train,
    )
    return utility, models, real_test, real_train


def _measure_leakage(
    cfg,
    feats,
    out,
    *,
    train,
    synthetic,
    real_test,
    real_train,
    models,
    ref_feats,
    synth_feats,
    num_classes,
    device,
):
    """Nearest training images, near-copies, membership inference and the two attacks."""
    ev = cfg.evaluate
    heldout = _subset(real_test, ev.heldout_images.pick(device.type), cfg.seed, STREAM_HELDOUT)
    heldout_feats = feats.real(heldout, "test", "inception features (real held-out images)")
    train_pixels = leakage.pixel_vectors(train.images)
    n_near = min(ev.near_copy_neighbours, len(train))
    near = {"alpha": ev.near_copy_alpha, "n_near": n_near, "device": device}
    synth_nn = neighbour_stats(synthetic, synth_feats, train, train_pixels, ref_feats, **near)
    held_nn = neighbour_stats(heldout, heldout_feats, train, train_pixels, ref_feats, **near)
    leak = {
        "nearest_neighbour": {
            key: {
                "synthetic": leakage.summary(synth_nn[key]),
                "heldout_real": leakage.summary(held_nn[key]),
            }
            for key in ("pixel_l2", "feature_l2", "ssim", "psnr", "near_copy_score")
        },
        "heldout_real_images": int(len(heldout)),
        "training_images_searched": int(len(train)),
        "feature_neighbours_searched": int(len(ref_feats)),
        "near_copies": _near_copies(ev, synth_nn, held_nn, n_near),
        "membership_inference": _membership(cfg, models, train, heldout, device),
    }
    leak["gradient_attack"] = _gradient_attack(
        cfg, out, models, real_train, synthetic, train, train_pixels, device
    )
    leak["model_inversion"] = _model_inversion(
        cfg, out, models, train, train_pixels, held_nn, num_classes, n_near, device
    )
    sets = {"train": train, "train_pixels": train_pixels, "heldout": heldout, "held_nn": held_nn}
    leak["gan_attack"] = _gan_attack(cfg, out, models, sets, num_classes, n_near, device)
    return leak, synth_nn, held_nn


def _near_copies(ev: EvaluateConfig, synth_nn: dict, held_nn: dict, n_near: int) -> dict:
    threshold = ev.near_copy_threshold
    return {
        "criterion": f"nearest / ({ev.near_copy_alpha:g} x mean of {n_near} nearest "
        f"training images), pixel L2, < {threshold:.4g}",
        "threshold": threshold,
        "alpha": ev.near_copy_alpha,
        "neighbours": n_near,
        "synthetic_fraction": float((synth_nn["near_copy_score"] < threshold).mean()),
        "synthetic_count": int((synth_nn["near_copy_score"] < threshold).sum()),
        "heldout_real_fraction": float((held_nn["near_copy_score"] < threshold).mean()),
    }


def _membership(cfg, models, train, heldout, device) -> dict:
    """Loss-threshold membership inference against each synthetic-trained classifier."""
    synthetic_models = {k: v for k, v in models.items() if not k.startswith("real/")}
    if not synthetic_models:
        return {"not_computed": "no downstream classifier was trained"}
    members = _subset(train, len(heldout), cfg.seed, STREAM_MEMBERS)
    return {
        kind: leakage.loss_threshold_attack(
            ds.losses(sel.model, members, device=device),
            ds.losses(sel.model, heldout, device=device),
        )
        for kind, sel in synthetic_models.items()
    }


def _gradient_attack(cfg, out, models, real_train, synthetic, train, train_pixels, device):
    ev, n_attack = cfg.evaluate, cfg.evaluate.gradient_attack_images
    if skip := _skip(cfg, "gradient_attack_images", models):
        return skip
    cases = {}
    if "real/cnn" in models:
        cases["real/cnn"] = _subset(real_train, n_attack, cfg.seed, STREAM_GRADIENT_ATTACK)
    cases["cnn"] = _subset(synthetic, n_attack, cfg.seed, STREAM_GRADIENT_ATTACK)
    attack, rows, row_labels = gradient_attack(
        ev, models, cases, train, train_pixels, device, cfg.seed
    )
    save_image_grid(
        rows,
        out / "gradient_attack.png",
        row_labels=row_labels,
        title="gradient inversion (Geiping et al. 2020): one gradient per image",
    )
    return attack


def _model_inversion(cfg, out, models, train, train_pixels, held_nn, num_classes, n_near, device):
    ev = cfg.evaluate
    if skip := _skip(cfg, "model_inversion_images_per_class", models):
        return skip
    memorisation, rows, row_labels = model_memorisation(
        ev,
        models,
        train,
        train_pixels,
        held_nn,
        num_classes=num_classes,
        n_near=n_near,
        device=device,
        seed=cfg.seed,
    )
    save_image_grid(
        rows,
        out / "model_inversion.png",
        row_labels=row_labels,
        title="model inversion (one image per class) and the nearest training image",
    )
    return memorisation


def _skip(cfg, setting: str, models) -> dict | None:
    """Why an attack on the downstream CNNs does not run, or None when it does."""
    if not getattr(cfg.evaluate, setting):
        return {"not_computed": f"evaluate.{setting}=0"}
    return None if "cnn" in models else {"not_computed": NO_CNN}


def _gan_attack(cfg, out, models, sets, num_classes, n_near, device):
    if skip := _skip(cfg, "gan_attack_images_per_class", models):
        return skip
    if cfg.data.resolution % 4:
        return {"not_computed": f"data.resolution={cfg.data.resolution}: the GAN needs 4k pixels"}
    result, rows, row_labels = gan_attack.gmi_attack(
        cfg.evaluate,
        models,
        public=cfg.public,
        cache_dir=cache_root(cfg.cache_dir),
        **sets,
        num_classes=num_classes,
        n_near=n_near,
        device=device,
        seed=cfg.seed,
    )
    title = "GAN-based inversion (GMI): one image per class and the nearest training image"
    save_image_grid(rows, out / "gan_inversion.png", row_labels=row_labels, title=title)
    return result


def _evaluation(cfg, run_dir, fidelity, utility, leak, synthetic_source) -> Evaluation:
    """The headline numbers flat, then each part in full."""
    # The ledger speaks for this run's samples only, not for images from elsewhere.
    own_samples = cfg.evaluate.synthetic is None
    ledger = read_ledger(run_dir) if own_samples else None
    return Evaluation(
        fid=fidelity["fid"],
        precision=fidelity["precision"],
        recall=fidelity["recall"],
        downstream_accuracy=utility.get("mean_test_accuracy"),
        **Evaluation.privacy_fields(ledger),
        synthesizer=cfg.synthesizer if own_samples else None,
        synthetic=synthetic_source,
        fidelity=fidelity,
        utility=utility,
        leakage=leak,
    )


def _save_pictures(
    out: Path,
    synthetic: data.ImageSplit,
    train: data.ImageSplit,
    synth_nn: dict[str, np.ndarray],
    held_nn: dict[str, np.ndarray],
    class_names: list[str],
    ev: EvaluateConfig,
    n_near: int,
) -> None:
    per_row = 10
    if bool((synthetic.labels != UNLABELLED).all()):
        rows, labels = [], []
        for c, name in enumerate(class_names):
            idx = torch.nonzero(synthetic.labels == c).flatten()[:per_row]
            if len(idx):
                rows.append(synthetic.images[idx])
                labels.append(name)
    else:
        rows = [synthetic.images[i : i + per_row] for i in range(0, min(len(synthetic), 100), 10)]
        labels = None
    save_image_grid(rows, out / "samples.png", row_labels=labels, title="synthetic images")

    order = np.argsort(synth_nn["near_copy_score"], kind="stable")[: ev.closest_pairs]
    nearest_train = train.images[torch.from_numpy(synth_nn["nearest_index"][order])]
    save_pairs(
        synthetic.images[torch.from_numpy(order)],
        nearest_train,
        out / "nearest_pairs.png",
        row_labels=("synthetic", "nearest\ntraining"),
        captions=[f"s={synth_nn['near_copy_score'][i]:.2f}" for i in order],
        title=f"the {len(order)} synthetic images closest to a training image "
        f"(s = nearest / ({ev.near_copy_alpha:g} x mean of {n_near} nearest), pixel L2; "
        f"near-copy below {ev.near_copy_threshold:.2g})",
    )
    save_histograms(
        [
            (xlabel, {"synthetic": synth_nn[key], "real held-out": held_nn[key]})
            for key, xlabel in (
                ("pixel_l2", "pixel L2 to nearest training image"),
                ("feature_l2", "Inception L2 to nearest training image"),
                ("near_copy_score", f"near-copy score (flagged < {ev.near_copy_threshold:.2g})"),
            )
        ],
        out / "nearest_distances.png",
        title="distance to the sensitive training set: synthetic vs real held-out images",
    )


SPEC = Stage(name=STAGE, run=run, check_done=check_done)

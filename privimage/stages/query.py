"""Stage 1, the DP semantic query: which public classes look like each sensitive class?

A classifier trained on the public set (its labels are the semantics) predicts the top-k
public classes of every sensitive training image. Each image adds 1 to those k cells of
its sensitive class's histogram row (L2 sensitivity sqrt(k)); Gaussian noise makes the
histogram DP; each sensitive class then keeps its top public classes, disjoint across
classes, and those public images are relabelled to the sensitive class.

Writes ``query/``: ``selection.json``, ``selection.png``, ``public_index.npy``,
``public_labels.npy``, ``histogram_noisy.npy``; records one Gaussian mechanism in the
run's privacy ledger. The histogram noise comes from fresh OS entropy
(:mod:`privimage.io.seeding`), never from the seed in the run's config.

With ``query.score_selection`` (opt-in) also ``selection_score.json``: how well the
selection matches, judged by a classifier trained (without DP, as a measurement for the
data owner) on the sensitive data, against a random selection of the same shape. The
ledger lists it as a non-private measurement; it is not releasable (:data:`RELEASE`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from privimage import data, selection_score
from privimage.config.schema import Config
from privimage.data.archives import file_digest
from privimage.data.cache import cache_key
from privimage.dp import accounting
from privimage.dp.ledger import Ledger, run_ledger
from privimage.errors import ConfigError
from privimage.io import artifacts
from privimage.io.artifacts import Stage, mark_done, read_json, stage_dir
from privimage.io.atomic import save_npy, torch_save, write_json
from privimage.io.release import Output
from privimage.io.seeding import dp_entropy, numpy_generator
from privimage.nets.classifier import accuracy, predict_logits, train_classifier
from privimage.nets.models import build_classifier
from privimage.plots import save_image_grid
from privimage.query import histogram
from privimage.runtime import cache_root, resolve_device

log = logging.getLogger(__name__)

STAGE = "query"
MECHANISM = "query/gaussian_histogram"

# What of query/ may be shared (privimage.io.release). Everything here is the noisy
# histogram or a function of it and the public data; selection_score.json is not.
_FROM_HISTOGRAM = (f"query/{artifacts.HISTOGRAM_NOISY}", "public")
RELEASE = {
    artifacts.HISTOGRAM_NOISY: Output(
        mechanism=MECHANISM, dest=f"selection/{artifacts.HISTOGRAM_NOISY}"
    ),
    **{
        name: Output(inputs=_FROM_HISTOGRAM, dest=f"selection/{name}")
        for name in (
            artifacts.SELECTION,
            artifacts.PUBLIC_INDEX,
            artifacts.PUBLIC_LABELS,
            artifacts.SELECTION_PNG,
        )
    },
}


def _classifier_key(cfg: Config) -> str:
    spec = {
        # The preprocessed public images themselves (input files included), not just
        # their config: a changed archive or glyph renderer retrains the classifier.
        "public": data.content_key(cfg.public),
        "arch": cfg.query.classifier_arch,
        "width": cfg.query.classifier_width,
        "epochs": cfg.query.classifier_epochs,
        "hflip": cfg.query.classifier_hflip,
        "augment": cfg.query.classifier_augment,
        "batch_size": cfg.query.batch_size,
        "lr": cfg.query.lr,
        "seed": cfg.seed,
        "version": 3,
    }
    return cache_key(spec)


def query_classifier(cfg: Config, public: data.ImageDataset, device: torch.device) -> tuple:
    """Train the semantic query function on public data, or reuse the cached one.

    It depends only on the public data and its own settings, so every run (and every
    epsilon of a sweep) with the same public set shares one trained classifier.
    Returns ``(model, public_test_top1)``.
    """
    path = cache_root(cfg.cache_dir) / "query_classifiers" / f"{_classifier_key(cfg)}.pt"
    if path.exists():
        model = build_classifier(
            cfg.query.classifier_arch,
            in_channels=cfg.public.channels,
            num_classes=public.num_classes,
            width=cfg.query.classifier_width,
        )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        log.info("query classifier reused from %s", path)
        return model.to(device).eval(), float(saved["public_test_top1"])
    start = time.perf_counter()
    model = train_classifier(
        public.train.as_float(),
        public.train.labels,
        num_classes=public.num_classes,
        arch=cfg.query.classifier_arch,
        width=cfg.query.classifier_width,
        epochs=cfg.query.classifier_epochs,
        hflip=cfg.query.classifier_hflip,
        augment=cfg.query.classifier_augment,
        batch_size=cfg.query.batch_size,
        lr=cfg.query.lr,
        device=device,
        seed=cfg.seed,
        desc="query classifier (public data)",
    )
    seconds = time.perf_counter() - start
    logits = predict_logits(model, public.test.as_float(), batch_size=512, device=device)
    top1 = accuracy(logits, public.test.labels)
    log.info("query classifier trained in %.0f s; public test top-1 %.3f", seconds, top1)
    state = {k: v.contiguous() for k, v in model.cpu().state_dict().items()}
    # A unique temporary name: runs of a sweep may train the same classifier at once.
    torch_save({"state_dict": state, "public_test_top1": top1, "train_seconds": seconds}, path)
    return model.to(device).eval(), top1


def query_mechanism(cfg: Config) -> accounting.Mechanism:
    """The semantic query as the ledger records it (the same for a run and its adopters)."""
    return accounting.query_mechanism(
        noise_multiplier=query_noise_multiplier(cfg), top_k=cfg.query.top_k
    )


def query_noise_multiplier(cfg: Config) -> float:
    """The query's noise multiplier: given directly, or calibrated to its epsilon share.

    With ``query.epsilon`` set, the one-shot Gaussian mechanism (sampling rate 1) is
    calibrated under the run's accountant to spend at most that share at the run's delta.
    """
    if cfg.query.epsilon is None:
        return cfg.query.noise_multiplier
    return accounting.calibrate_noise_multiplier(
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
    semantic_logits, public_top1 = _semantic_function_of(cfg, public, device)
    sensitive = data.load(cfg.data, cache_dir=cache)
    n_sensitive = len(sensitive.train)
    accounting.check_delta(delta=cfg.privacy.delta, num_records=n_sensitive)
    k = cfg.query.top_k
    if k > public.num_classes:
        raise ConfigError(f"query.top_k={k} exceeds the {public.num_classes} public classes")
    per_class = histogram.classes_to_keep(
        num_public_classes=public.num_classes,
        num_sensitive_classes=sensitive.num_classes,
        classes_per_sensitive_class=cfg.query.classes_per_sensitive_class,
        fraction_of_public_classes=cfg.query.fraction_of_public_classes,
    )
    mechanism = query_mechanism(cfg)
    ledger = run_ledger(cfg, run_dir)
    noisy = _drawn_release(cfg, ledger, mechanism, out)
    if noisy is None:
        noisy = _noisy_histogram(cfg, ledger, mechanism, out, semantic_logits, sensitive, public)
    selection = histogram.select_public_classes(noisy, classes_per_sensitive_class=per_class)

    _write_selection(
        cfg, out, public, sensitive, selection, noisy, mechanism, per_class, public_top1
    )
    if cfg.query.score_selection:
        _record_judge(ledger)  # before the judge reads the sensitive data
        score = _score_selection(cfg, public, sensitive, selection, device)
        write_json(out / "selection_score.json", score)
        log.info(
            "selection score %.3f vs %.3f for a random selection of the same shape (%.1fx)",
            score["score"],
            score["random_baseline"],
            score["ratio"] or float("nan"),
        )
    mark_done(out)
    return out


def _semantic_function_of(cfg: Config, public: data.ImageDataset, device: torch.device):
    """The semantic function (public-class logits of an image batch) and, for the
    classifier, its top-1 accuracy on the public test split."""
    if cfg.query.method == "clip":
        # Imported here: open_clip is needed only by this query method, so every other
        # stage and method runs on machines without it.
        from privimage.clip_query import load_clip

        # Weights come from a local file only; a missing one stops here, before the
        # query uses any sensitive data.
        scorer = load_clip(cfg.query.clip_model, cfg.query.clip_weights, device=device)
        public_top1 = None

        def semantic_logits(images: torch.Tensor) -> torch.Tensor:
            return scorer.class_logits(
                images, public.class_names, prompt=cfg.query.clip_prompt, batch_size=256
            )
    else:
        model, public_top1 = query_classifier(cfg, public, device)
        log.info("query classifier: top-1 %.3f on the public test split", public_top1)

        def semantic_logits(images: torch.Tensor) -> torch.Tensor:
            logits = predict_logits(model, images, batch_size=512, device=device)
            if cfg.query.classifier_hflip:
                # A classifier trained on mirrored images scores both views; averaging
                # them is a cheaper vote than a second model (a deterministic function
                # of each image, so the histogram's sensitivity is unchanged).
                mirrored = predict_logits(model, images.flip(-1), batch_size=512, device=device)
                logits = (logits + mirrored) / 2
            return logits

    return semantic_logits, public_top1


def _write_selection(
    cfg, out, public, sensitive, selection, noisy, mechanism, per_class, public_top1
) -> None:
    """The released selection: indices and labels of the chosen public images, the
    selection as JSON with the noisy counts behind it, and its picture."""
    k = cfg.query.top_k
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

    save_npy(out / artifacts.PUBLIC_INDEX, public_index.astype(np.int64))
    save_npy(out / artifacts.PUBLIC_LABELS, public_relabel)
    write_json(
        out / artifacts.SELECTION,
        {
            "public_source": cfg.public.source,
            "sensitive_source": cfg.data.source,
            "top_k": k,
            "noise_multiplier": mechanism.noise_multiplier,
            "noise_std": mechanism.noise_multiplier * float(np.sqrt(k)),
            "classes_per_sensitive_class": per_class,
            "semantic_function": _semantic_function(cfg),
            "query_classifier_public_test_top1": public_top1,
            "selected_public_images": int(len(public_index)),
            "classes": classes_json,
        },
    )
    _save_selection_grid(
        cfg, public, selection, sensitive.class_names, out / artifacts.SELECTION_PNG
    )


DRAW = "draw.json"  # what the saved noisy histogram was drawn from (not released)


def _draw_identity(cfg: Config, mechanism: accounting.Mechanism) -> dict:
    return {
        "mechanism": mechanism.to_dict(),
        "data": data.content_key(cfg.data),
        "public": data.content_key(cfg.public),
        "semantic_function": _semantic_function(cfg),
    }


def _drawn_release(
    cfg: Config, ledger: Ledger, mechanism: accounting.Mechanism, out: Path
) -> np.ndarray | None:
    """The noisy histogram an interrupted attempt of this run already drew, if any.

    The histogram is saved before the mechanism is marked completed, so an attempt that
    stopped afterwards (in the judge, or while writing the selection) left its release on
    disk: finishing from it is post-processing and spends nothing twice, where a rerun
    with fresh secret noise would be a second release.
    """
    status = ledger.status(*mechanism.key)
    saved, draw = out / artifacts.HISTOGRAM_NOISY, out / DRAW
    if status is None or not (saved.exists() and draw.exists()):
        return None
    recorded = read_json(draw)
    if (
        ledger.live(*mechanism.key) != mechanism  # the live attempt is another mechanism
        or recorded.get("identity") != _draw_identity(cfg, mechanism)
        or recorded.get("sha256") != file_digest(saved)["sha256"]
    ):
        return None  # not this attempt's draw; Ledger.begin decides what asking costs
    log.info("query: finishing from the noisy histogram already drawn in %s", saved)
    if status == "started":
        ledger.complete(mechanism)
    return np.load(saved)


def _noisy_histogram(
    cfg: Config,
    ledger: Ledger,
    mechanism: accounting.Mechanism,
    out: Path,
    semantic_logits,
    sensitive: data.ImageDataset,
    public: data.ImageDataset,
) -> np.ndarray:
    """The Gaussian mechanism itself: votes, exact histogram, secret noise, saved at once."""
    reproducible = cfg.privacy.reproducible_noise
    # A draw.json of an earlier attempt must never vouch for this attempt's histogram.
    (out / DRAW).unlink(missing_ok=True)
    # Refuses here, before the sensitive images are looked at, if over budget.
    ledger.begin(mechanism, noise_secret=not reproducible)
    k = cfg.query.top_k
    logits = semantic_logits(sensitive.train.as_float())
    topk = logits.topk(k, dim=1).indices.numpy()
    counts = histogram.topk_histogram(
        topk,
        sensitive.train.labels.numpy(),
        num_sensitive_classes=sensitive.num_classes,
        num_public_classes=public.num_classes,
    )
    # Secret: drawn now from OS entropy and kept nowhere, so the noise cannot be
    # regenerated from anything the run writes (unless privacy.reproducible_noise).
    rng = numpy_generator(dp_entropy(purpose=MECHANISM, seed=cfg.seed, reproducible=reproducible))
    noisy = histogram.add_gaussian_noise(
        counts, noise_multiplier=mechanism.noise_multiplier, top_k=k, rng=rng
    )
    # The exact counts are sensitive and never written; only the noisy ones are released.
    del rng, counts
    save_npy(out / artifacts.HISTOGRAM_NOISY, noisy)
    sha = file_digest(out / artifacts.HISTOGRAM_NOISY)["sha256"]
    write_json(out / DRAW, {"identity": _draw_identity(cfg, mechanism), "sha256": sha})
    ledger.complete(mechanism)
    return noisy


def _semantic_function(cfg: Config) -> str:
    if cfg.query.method == "classifier":
        return "classifier"
    return f"clip:{cfg.query.clip_model}"


def adopt(cfg: Config, run_dir: Path, copy_in) -> None:
    """Take over a finished query of another run with the same inputs (privimage.reuse).

    The copied selection is that run's release, reproduced exactly; this run records the
    same mechanism in its own ledger (refused there if over this run's budget) before
    the files arrive, as if it had made the release itself.
    """
    ledger = run_ledger(cfg, run_dir)
    mechanism = query_mechanism(cfg)
    # The key of the shared query includes reproducible_noise, so the copy's noise was
    # secret exactly when this run's would be.
    if cfg.query.score_selection:
        _record_judge(ledger)  # the copy brings the judge's score with it
    ledger.begin(mechanism, noise_secret=not cfg.privacy.reproducible_noise)
    copy_in()
    ledger.complete(mechanism)


def _record_judge(ledger: Ledger) -> None:
    """The selection judge in the ledger: it reads the sensitive data outside any mechanism."""
    ledger.record_measurement(
        stage=STAGE,
        name="selection_judge",
        description="selection_score.json: a judge classifier trained WITHOUT DP on the "
        "sensitive training split (query.score_selection=true); for the data owner, never "
        "released",
    )


def _score_selection(
    cfg: Config,
    public: data.ImageDataset,
    sensitive: data.ImageDataset,
    selection: list[list[int]],
    device: torch.device,
) -> dict:
    """Rate the selection with a judge trained on the sensitive data (see selection_score).

    The judge is trained without DP and is never saved: only the score leaves this
    function, as a measurement for the data owner.
    """
    q = cfg.query
    judge = train_classifier(
        sensitive.train.as_float(),
        sensitive.train.labels,
        num_classes=sensitive.num_classes,
        arch=q.classifier_arch,
        width=q.classifier_width,
        epochs=q.score_classifier_epochs,
        hflip=q.classifier_hflip,
        batch_size=q.batch_size,
        lr=q.lr,
        device=device,
        seed=cfg.seed,
        desc="selection judge (sensitive data, not DP)",
    )
    test_logits = predict_logits(judge, sensitive.test.as_float(), batch_size=512, device=device)
    sample = selection_score.sample_per_class(
        public.train.labels.numpy(),
        images_per_class=q.score_images_per_class,
        rng=np.random.default_rng(cfg.seed),
    )
    rated = public.train.subset(sample)
    predicted = predict_logits(judge, rated.as_float(), batch_size=512, device=device).argmax(1)
    affinity = selection_score.class_affinity(
        predicted.numpy(),
        rated.labels.numpy(),
        num_public_classes=public.num_classes,
        num_sensitive_classes=sensitive.num_classes,
    )
    result = selection_score.selection_score(affinity, selection)
    for s, entry in enumerate(result["per_class"]):
        entry["sensitive_class"] = s
        entry["name"] = sensitive.class_names[s]
        entry["public_classes"] = [public.class_names[p] for p in selection[s]]
    return {
        **result,
        "judge": f"{q.classifier_arch}(width={q.classifier_width}), "
        f"{q.score_classifier_epochs} epochs on the sensitive training split",
        "judge_sensitive_test_top1": accuracy(test_logits, sensitive.test.labels),
        "public_images_rated": int(len(sample)),
        "note": "measured with a classifier trained WITHOUT DP on the sensitive data: for the "
        "data owner, not part of the DP release; no later stage reads this file",
    }


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


def inputs(cfg: Config) -> dict:
    """Everything the query's output depends on: its key when runs share it."""
    return {
        "data": data.content_key(cfg.data),
        "public": data.content_key(cfg.public),
        "query": asdict(cfg.query),
        # The query's noise is calibrated at the run's delta when query.epsilon is set.
        "delta": cfg.privacy.delta,
        "accountant": cfg.privacy.accountant,
        # Whether the shared copy's noise was secret; a run adopting it records that.
        "reproducible_noise": cfg.privacy.reproducible_noise,
    }


SPEC = Stage(name=STAGE, run=run, release=lambda cfg: RELEASE, inputs=inputs, adopt=adopt)

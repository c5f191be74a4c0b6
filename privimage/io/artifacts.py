"""Every file a stage writes for another, named once, with typed save and load.

The stage contract: a stage writes only ``run_dir/<stage>/``, writes ``DONE`` last, and
is skipped when ``DONE`` exists. Stages talk through the files below and nothing else,
so a stage never imports another stage: it reads what the upstream one wrote, through
these functions. Files are written with :mod:`privimage.io.atomic`.

Who writes what (``docs/architecture.md`` has the table):

- run root: ``privacy.json`` (the ledger), ``timings.jsonl``, ``config.yaml``
- ``query/``: ``selection.json``, ``selection.png``, ``public_index.npy``,
  ``public_labels.npy``, ``histogram_noisy.npy``
- ``pretrain/`` and ``finetune/``: ``unet/`` (diffusers ``save_pretrained``),
  ``pipeline/`` (``PrivImagePipeline``; fine-tuning's with the model card);
  ``pretrain/classes.json``
- ``sample/``: ``images/<class>/<seed>.png``, ``samples.npz``, ``dataset/``, ``grid.png``
- ``evaluate/``: ``metrics.json``, ``report.md``
- ``audit/``: ``audit.json``
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from privimage.errors import PrivImageError
from privimage.io.atomic import atomic_file, write_json, write_text
from privimage.io.names import safe_name

# The stage folders of a run, in the order the pipeline runs them; the audit runs only
# when asked for by name.
STAGES = ("query", "pretrain", "finetune", "sample", "evaluate", "audit")
# The stages each synthesizer runs: PrivImage's DP diffusion pipeline, or BN-statistics
# synthesis (Soufleri et al. 2022; not differentially private), which makes its images
# in the sample stage.
SYNTHESIZER_STAGES = {"diffusion": STAGES, "bnstat": ("sample", "evaluate")}
DONE = "DONE"
# The run root.
LEDGER = "privacy.json"
TIMINGS = "timings.jsonl"
RUN_CONFIG = "config.yaml"
# query/
SELECTION = "selection.json"
SELECTION_PNG = "selection.png"
PUBLIC_INDEX = "public_index.npy"
PUBLIC_LABELS = "public_labels.npy"
HISTOGRAM_NOISY = "histogram_noisy.npy"
# pretrain/ and finetune/
UNET = "unet"
PIPELINE = "pipeline"  # PrivImagePipeline.save_pretrained: the UNet, its scheduler, a card
CLASSES = "classes.json"
# sample/
IMAGES = "images"
SAMPLES = "samples.npz"
DATASET = "dataset"
GRID = "grid.png"
PROGRESS = "progress.json"  # what the images on disk were made with (for resume)
# evaluate/
METRICS = "metrics.json"
REPORT = "report.md"
# audit/
AUDIT_STAGE = "audit"
AUDIT_RESULT = "audit.json"


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as the pipeline and the shared store see it.

    Attributes:
        name: Its folder in the run (one of :data:`STAGES`).
        run: ``run(cfg, run_dir)``: writes ``run_dir/<name>/``, ``DONE`` last.
        release: Its releasable outputs under ``cfg`` (path in its folder ->
            :class:`privimage.io.release.Output`), which ``release/`` is built from.
        check_done: Called instead of ``run`` when ``DONE`` exists; raises when the
            finished output answers another question than the one asked now.
        inputs: Everything its output depends on besides upstream stages; with
            ``upstream``, the key under which runs share it (privimage.reuse). None: the
            output depends on the privacy budget, and is never shared.
        upstream: The stages whose output it reads, for the key.
        adopt: ``adopt(cfg, run_dir, copy_in)``: what taking over a shared output means
            for the run (the query records its spend around the copy).
    """

    name: str
    run: Callable[..., Path]
    release: Callable[..., dict] = field(default=lambda cfg: {})
    check_done: Callable[..., None] = _nothing
    inputs: Callable[..., dict] | None = None
    upstream: Callable[..., tuple[str, ...]] = field(default=lambda cfg: ())
    adopt: Callable[..., None] | None = None


def stage_dir(run_dir: Path, stage: str) -> Path:
    """The folder a stage owns inside the run directory."""
    return Path(run_dir) / stage


def is_done(run_dir: Path, stage: str) -> bool:
    return (stage_dir(run_dir, stage) / DONE).exists()


def mark_done(out_dir: Path) -> None:
    """Write the DONE marker; call it last, after every output is in place."""
    write_text(Path(out_dir) / DONE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_ledger(run_dir: Path) -> dict[str, Any]:
    """The run's ledger (``privacy.json``) as written, or ``{}`` when there is none."""
    path = Path(run_dir) / LEDGER
    return read_json(path) if path.exists() else {}


def read_done_json(run_dir: Path, stage: str, name: str) -> dict | None:
    """``<stage>/<name>`` of a finished stage (its DONE written), else None."""
    path = stage_dir(run_dir, stage) / name
    if not is_done(run_dir, stage) or not path.exists():
        return None
    return read_json(path)


def require_upstream(run_dir: Path, stage: str, needed_by: str) -> Path:
    """Return the finished folder of an upstream stage or explain how to produce it."""
    folder = stage_dir(run_dir, stage)
    if not (folder / DONE).exists():
        raise PrivImageError(
            f"stage {needed_by!r} needs the finished {stage!r} stage in {folder}; "
            f"run it first (stages=[{stage},{needed_by}])"
        )
    return folder


def unet_dir(run_dir: Path, stage: str) -> Path:
    """Where ``stage`` (pretrain or finetune) saves its UNet."""
    return stage_dir(run_dir, stage) / UNET


def load_selection(query_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The query's release: selected public indices, their sensitive labels, class names."""
    index = np.load(query_dir / PUBLIC_INDEX)
    labels = np.load(query_dir / PUBLIC_LABELS)
    if len(index) == 0:
        raise PrivImageError(f"the query selected no public images ({query_dir}/{SELECTION})")
    return index, labels, [c["name"] for c in read_json(query_dir / SELECTION)["classes"]]


def class_names(run_dir: Path, *, needed_by: str) -> list[str]:
    """The sensitive class names in label order, as pretraining or the query recorded them."""
    recorded = stage_dir(run_dir, "pretrain") / CLASSES
    if recorded.exists():
        return read_json(recorded)["classes"]
    # Without pretrain/classes.json (a run that starts at a later stage from a query
    # folder), the query's selection names them too.
    selection = stage_dir(run_dir, "query") / SELECTION
    if selection.exists():
        return [c["name"] for c in read_json(selection)["classes"]]
    folder = require_upstream(run_dir, "pretrain", needed_by)  # explains an unfinished one
    raise PrivImageError(
        f"stage {needed_by!r} needs the class names, but {folder} has no {CLASSES} and "
        f"there is no query; rerun pretraining (delete {folder})"
    )


def save_png(image, path: Path) -> None:
    """One uint8 image, (C, H, W) (an array or a CPU tensor), as a PNG."""
    from PIL import Image

    image = np.asarray(image)
    arr = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    with atomic_file(path) as f:
        Image.fromarray(arr).save(f, format="PNG")


@dataclass
class SampleLayout:
    """A synthetic set laid out class by class: image ``i`` of class ``c`` has seed
    ``first_seed + c * images_per_class + i`` and is ``images/<class>/<seed>.png``, so
    each image depends on its own seed only and a resumed run keeps what is on disk."""

    seeds: np.ndarray
    labels: np.ndarray
    paths: list[Path]
    class_names: list[str]

    @classmethod
    def class_by_class(
        cls, out: Path, class_names: list[str], *, images_per_class: int, first_seed: int
    ) -> SampleLayout:
        labels = np.repeat(np.arange(len(class_names)), images_per_class)
        seeds = first_seed + np.arange(len(labels))
        image_dir = Path(out) / IMAGES
        paths = [
            image_dir / safe_name(class_names[c]) / f"{seed:06d}.png"
            for c, seed in zip(labels, seeds, strict=True)
        ]
        return cls(seeds, labels, paths, list(class_names))


def restart_unless_made_with(out: Path, fingerprint: dict) -> bool:
    """Keep the images of an earlier attempt only if ``progress.json`` says they were made
    with ``fingerprint``; otherwise delete them and return True. Records ``fingerprint``."""
    progress = Path(out) / PROGRESS
    changed = progress.exists() and read_json(progress) != fingerprint
    if changed:
        shutil.rmtree(Path(out) / IMAGES, ignore_errors=True)
    write_json(progress, fingerprint)
    return changed


def write_sample_set(
    out: Path, layout: SampleLayout, *, grid_images_per_class: int, title: str
) -> None:
    """``samples.npz``, ``dataset/`` and ``grid.png`` from the PNGs at ``layout.paths``.

    Everything is rebuilt from the PNGs (lossless), so a resumed run's outputs are
    byte-for-byte those of an uninterrupted one. Shared by every synthesizer, so the
    evaluation reads the same files whichever made them.
    """
    import datasets
    import torch
    from PIL import Image

    from privimage.plots import save_image_grid

    paths, labels, class_names = layout.paths, layout.labels, layout.class_names
    pil_images = [Image.open(p).copy() for p in paths]
    arrays = [np.asarray(im) for im in pil_images]
    images = np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays])
    with atomic_file(out / SAMPLES) as f:
        np.savez_compressed(
            f,
            images=images,
            labels=labels.astype(np.int64),
            seeds=layout.seeds.astype(np.int64),
            class_names=np.array(class_names),
        )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "seed": datasets.Value("int64"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": pil_images, "label": labels.tolist(), "seed": layout.seeds.tolist()},
        features=features,
    )
    if (out / DATASET).exists():
        shutil.rmtree(out / DATASET)
    ds.save_to_disk(str(out / DATASET))
    tensor = torch.from_numpy(images)
    rows = [tensor[labels == c][:grid_images_per_class] for c in range(len(class_names))]
    save_image_grid(rows, out / GRID, row_labels=class_names, title=title)


# What evaluate/metrics.json says of itself: for the data owner only.
EVALUATION_NOTE = "measured on sensitive data for the data owner; not part of the DP release"


# What a run's ledger guarantees, in one word (see privacy_status).
PRIVACY_STATES = ("unknown", "none", "over_budget", "seeded", "dp")


def privacy_status(ledger: dict[str, Any] | None) -> str:
    """What guarantee a ledger gives, from ``privacy.json`` as read or the fields an
    :class:`Evaluation` copied from it (same keys); the one place that decides it.

    ``unknown``: no ledger (images from elsewhere). ``none``: a non-private step used the
    sensitive data. ``over_budget``: epsilon spent exceeds the target. ``seeded``: the DP
    noise followed the seed (``privacy.reproducible_noise``), so no epsilon holds against
    anyone who knows the config. ``dp``: epsilon spent within the target, noise secret.
    """
    if not ledger:
        return "unknown"
    if ledger.get("differentially_private") is False:
        return "none"
    eps, target = ledger.get("epsilon_spent"), ledger.get("target_epsilon")
    if eps is None:
        return "unknown"
    if target is not None and eps > target * (1 + 1e-9):
        return "over_budget"
    return "dp" if ledger.get("noise_secret") else "seeded"


@dataclass
class Evaluation:
    """``evaluate/metrics.json``, typed: the headline numbers flat, then each part in full.

    The evaluate stage writes it; the report, the results table and the CLI's summary
    line read it through :func:`load_evaluation`. Field order is the file's key order.
    """

    fid: float | None
    precision: float | None
    recall: float | None
    downstream_accuracy: float | None
    # The privacy fields come from the run's ledger; all None (and the lists empty) when
    # the images come from elsewhere and nothing is known of them.
    epsilon_spent: float | None
    target_epsilon: float | None
    delta: float | None
    # False when the ledger records a non-private step (bnstat, finetune.dp=false).
    differentially_private: bool | None
    # False when the DP noise followed the seed (privacy.reproducible_noise): then no
    # epsilon holds against anyone who knows the config.
    noise_secret: bool | None
    non_private_steps: list[str]
    # The completed DP-SGD entry's details (which parameters it trained), if any.
    dp_trained: dict | None
    synthesizer: str | None
    synthetic: str | None  # None only in a file that lacks it
    fidelity: dict[str, Any]
    utility: dict[str, Any]
    leakage: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    note: str = EVALUATION_NOTE

    @staticmethod
    def privacy_fields(ledger: dict[str, Any] | None) -> dict[str, Any]:
        """The privacy headline of a ledger (``privacy.json`` as read), for the fields above."""
        ledger = ledger or {}
        known = bool(ledger)
        return {
            "epsilon_spent": ledger["epsilon_spent"] if known else None,
            "target_epsilon": ledger["target_epsilon"] if known else None,
            "delta": ledger["delta"] if known else None,
            "differentially_private": ledger.get("differentially_private", True) if known else None,
            "noise_secret": ledger.get("noise_secret", False) if known else None,
            "non_private_steps": [e["description"] for e in ledger.get("non_private", [])],
            "dp_trained": next(
                (
                    m["details"]
                    for m in ledger.get("mechanisms", [])
                    if m.get("status") == "completed" and "trainable" in m.get("details", {})
                ),
                None,
            ),
        }

    @property
    def privacy(self) -> str:
        """What the run's ledger guarantees: see :func:`privacy_status`."""
        return privacy_status(asdict(self))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Evaluation:
        """From a metrics.json dict; keys an older file lacks take their empty value."""
        known = {f.name for f in fields(cls)}
        # Fields with a default keep it; the others are unknown (None) or empty.
        values: dict[str, Any] = {
            f.name: None
            for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING
        }
        values |= {"fidelity": {}, "utility": {}, "leakage": {}, "non_private_steps": []}
        values.update({k: v for k, v in d.items() if k in known})
        return cls(**values)


def guarantee(ledger: dict) -> str:
    """The guarantee of a ledger in one sentence (:func:`privacy_status` decides which)."""
    status = privacy_status(ledger)
    if status == "unknown":
        return "no privacy ledger: nothing here is covered by a differential-privacy guarantee"
    if status == "none":
        return "NOT differentially private: the ledger records a non-private use of the data"
    eps, target = ledger["epsilon_spent"], ledger["target_epsilon"]
    if status == "over_budget":
        return f"NOT within budget: epsilon {eps:.4g} exceeds the target {target:g}"
    if status == "seeded":
        return (
            "NOT differentially private against anyone who knows the run's config: its DP "
            f"noise was derived from the seed (privacy.reproducible_noise=true; epsilon "
            f"{eps:.3f} holds only against someone who does not know the seed)"
        )
    return (
        f"({eps:.3f}, {ledger['delta']:g})-differentially private with respect to one "
        f"sensitive training image (target epsilon {target})"
    )


def mechanism_line(m: dict) -> str:
    """One ledger mechanism as a Markdown list item."""
    return (
        f"- `{m['stage']}/{m['name']}` ({m['status']}): noise multiplier "
        f"{m['noise_multiplier']:.4g}, sampling rate {m['sample_rate']:.4g}, "
        f"{m['steps']} step(s), sensitivity {m['sensitivity']:.4g}, noise "
        f"{'secret (OS entropy)' if m.get('noise_secret') else 'DERIVED FROM THE SEED'}"
        f"{trained_text(m.get('details'), prefix='; ')}"
    )


def trained_text(details: dict | None, *, prefix: str = "") -> str:
    """Which parameters a DP-SGD entry trained, in words ("" when it does not say)."""
    if not details or "trainable" not in details:
        return ""
    what = details["trainable"]
    what = "every parameter" if what == "all" else ", ".join(f"`{p}`" for p in what)
    return (
        f"{prefix}trained {what} ({details['trained_parameters']:,} of "
        f"{details['parameters']:,} parameters)"
    )


def save_evaluation(out_dir: Path, evaluation: Evaluation) -> None:
    write_json(Path(out_dir) / METRICS, evaluation.to_json())


def load_evaluation(run_dir: Path) -> Evaluation | None:
    """The run's ``evaluate/metrics.json`` (None when it has none)."""
    path = stage_dir(run_dir, "evaluate") / METRICS
    return Evaluation.from_json(read_json(path)) if path.exists() else None

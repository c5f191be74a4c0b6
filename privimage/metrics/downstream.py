"""Downstream utility: classifiers trained on synthetic data, tested once on real data.

The protocol keeps the real test split out of every decision:

1. a stratified slice of the *synthetic* data (``validation_fraction``) is held out;
2. every classifier kind (a CNN, logistic regression, a one-hidden-layer MLP, as in
   PrivImage) trains on the rest, once per weight-decay setting of its grid, and the
   setting and epoch with the best accuracy on the synthetic validation slice are kept;
3. only then is the real test split opened, once, and each chosen model scored on it.

Step 3 is enforced by :class:`SealedSplit`: the test split is handed over sealed, and
:func:`evaluate_downstream` opens it after all training is finished. Opening it twice
raises, so no later code can quietly use it for another round of selection.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privimage.config.schema import DOWNSTREAM_CLASSIFIERS, DownstreamSettings
from privimage.data.containers import ImageSplit
from privimage.data.splits import stratified_split
from privimage.errors import DataError
from privimage.nets.classifier import accuracy, predict_logits, train_classifier
from privimage.nets.models import build_classifier

log = logging.getLogger(__name__)

#: The classifier kinds, in report order.
KINDS = DOWNSTREAM_CLASSIFIERS
MLP_HIDDEN = 512


class TestSplitAlreadyOpened(RuntimeError):
    """The sealed test split was asked for a second time."""


class SealedSplit:
    """A real test split that can be read exactly once.

    Args:
        split: The images and labels.
        on_open: Called with no arguments when the split is opened (a hook for audits and
            tests that check *when* the test data is first read).
    """

    def __init__(self, split: ImageSplit, *, on_open: Callable[[], None] | None = None) -> None:
        self._split: ImageSplit | None = split
        self._size = len(split)
        self._on_open = on_open

    def __len__(self) -> int:
        return self._size

    @property
    def opened(self) -> bool:
        return self._split is None

    def open(self) -> ImageSplit:
        """Hand over the split; it cannot be opened again."""
        if self._split is None:
            raise TestSplitAlreadyOpened(
                "the real test split was already read once; model selection must use "
                "held-out synthetic data only"
            )
        split, self._split = self._split, None
        if self._on_open is not None:
            self._on_open()
        return split


@dataclass
class Selected:
    """A trained classifier and how it was chosen."""

    kind: str
    model: nn.Module
    weight_decay: float
    epoch: int
    validation_accuracy: float
    history: list[dict] = field(default_factory=list)


def build_downstream(
    kind: str, *, image_shape: tuple[int, int, int], num_classes: int, cnn_arch: str, width: int
) -> nn.Module:
    """The network of one classifier kind for images of ``image_shape`` (C, H, W)."""
    dim = int(np.prod(image_shape))
    if kind == "cnn":
        return build_classifier(
            cnn_arch, in_channels=image_shape[0], num_classes=num_classes, width=width
        )
    if kind == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(dim, MLP_HIDDEN), nn.ReLU(), nn.Linear(MLP_HIDDEN, num_classes)
        )
    raise ValueError(f"unknown downstream classifier {kind!r}; choose from {KINDS}")


def synthetic_holdout(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) indices of the synthetic set."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    train_idx, val_idx = stratified_split(labels.numpy(), fraction, seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f"{len(labels)} synthetic images are too few to hold out {fraction:.0%} for "
            "model selection; sample more images per class"
        )
    return train_idx, val_idx


def _epochs(settings: DownstreamSettings, kind: str) -> int:
    return settings.classifier_epochs if kind == "cnn" else settings.linear_epochs


def train_and_select(
    kind: str,
    train: ImageSplit,
    val: ImageSplit,
    *,
    num_classes: int,
    settings: DownstreamSettings,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> Selected:
    """Train ``kind`` for each weight decay of its grid; keep the best (decay, epoch) by
    accuracy on the synthetic validation split (the earliest wins ties)."""
    decays = [settings.cnn_weight_decay] if kind == "cnn" else list(settings.weight_decays)
    epochs = _epochs(settings, kind)
    x_train, x_val = train.as_float(), val.as_float()
    best: Selected | None = None
    history: list[dict] = []
    for decay in decays:
        torch.manual_seed(seed)
        model = build_downstream(
            kind,
            image_shape=tuple(train.images.shape[1:]),
            num_classes=num_classes,
            cnn_arch=settings.classifier_arch,
            width=settings.classifier_width,
        )

        def epoch_end(m: nn.Module, epoch: int, decay: float = decay) -> None:
            nonlocal best
            val_acc = accuracy(predict_logits(m, x_val, batch_size=512, device=device), val.labels)
            history.append({"weight_decay": decay, "epoch": epoch, "val_accuracy": val_acc})
            if best is None or val_acc > best.validation_accuracy:
                best = Selected(kind, copy.deepcopy(m).cpu(), decay, epoch, val_acc)

        train_classifier(
            x_train,
            train.labels,
            num_classes=num_classes,
            width=settings.classifier_width,
            epochs=epochs,
            batch_size=settings.classifier_batch_size,
            lr=settings.classifier_lr if kind == "cnn" else settings.linear_lr,
            device=device,
            seed=seed,
            # Shifts suit a convolutional network; a linear model on raw pixels has no
            # translation invariance to learn, and shifted inputs only blur its weights
            # (measured on the 8x8 digits: chance accuracy with shifts, 90%+ without).
            augment="shift" if kind == "cnn" else "none",
            hflip=settings.classifier_hflip and kind == "cnn",
            model=model,
            weight_decay=decay,
            epoch_end=epoch_end,
            progress=progress,
            desc=f"downstream {kind} (wd {decay:g}) on synthetic data",
        )
    assert best is not None
    best.history = history
    return best


def losses(model: nn.Module, split: ImageSplit, *, device: torch.device) -> np.ndarray:
    """Per-image cross-entropy of ``model`` on a split (the membership-inference signal)."""
    logits = predict_logits(model, split.as_float(), batch_size=512, device=device)
    return F.cross_entropy(logits, split.labels, reduction="none").numpy()


def evaluate_downstream(
    synthetic: ImageSplit,
    test: SealedSplit,
    *,
    num_classes: int,
    settings: DownstreamSettings,
    seed: int,
    device: torch.device,
    real_train: ImageSplit | None = None,
    progress: bool = True,
) -> tuple[dict, dict[str, Selected], ImageSplit]:
    """Train and select every classifier on synthetic data, then score them on the real
    test split, which is opened here and only here.

    With ``real_train`` (real training images, as many as there are synthetic ones) the
    same classifiers are also trained on real data, the same way, as the reference that
    the synthetic data's accuracy is read against; they are scored on the same single
    opening of the test split.

    Returns:
        ``(report, models, test_split)``: ``report`` holds each kind's validation and test
        accuracy, chosen weight decay and epoch, plus ``mean_test_accuracy``; ``models``
        the chosen networks by kind, and those trained on real data as ``"real/<kind>"``;
        ``test_split`` the opened real test split, for measurements
        that come after (membership inference uses it as the non-members).
    """
    missing = sorted(set(range(num_classes)) - set(synthetic.labels.tolist()))
    if missing:
        log.warning("synthetic data has no images of classes %s", missing)

    def train_every_kind(split: ImageSplit) -> tuple[dict[str, Selected], int, int]:
        """Hold out a validation slice of ``split``, train and select every kind on it."""
        train_idx, val_idx = synthetic_holdout(split.labels, settings.validation_fraction, seed)
        train, val = split.subset(train_idx), split.subset(val_idx)
        selected = {
            kind: train_and_select(
                kind,
                train,
                val,
                num_classes=num_classes,
                settings=settings,
                seed=seed,
                device=device,
                progress=progress,
            )
            for kind in settings.classifiers
        }
        return selected, len(train), len(val)

    chosen, n_train, n_val = train_every_kind(synthetic)
    on_real = train_every_kind(real_train)[0] if real_train is not None else {}
    real_test = test.open()  # the first and only read of the real test split
    report: dict = {"classifiers": {}}
    for kind, sel in chosen.items():
        logits = predict_logits(sel.model, real_test.as_float(), batch_size=512, device=device)
        report["classifiers"][kind] = {
            "test_accuracy": accuracy(logits, real_test.labels),
            "validation_accuracy": sel.validation_accuracy,
            "weight_decay": sel.weight_decay,
            "epoch": sel.epoch + 1,
            "epochs_trained": _epochs(settings, kind),
        }
        if kind in on_real:
            real_logits = predict_logits(
                on_real[kind].model, real_test.as_float(), batch_size=512, device=device
            )
            report["classifiers"][kind]["real_data_test_accuracy"] = accuracy(
                real_logits, real_test.labels
            )
    accs = [c["test_accuracy"] for c in report["classifiers"].values()]
    report["mean_test_accuracy"] = float(np.mean(accs))
    if on_real:
        report["mean_real_data_test_accuracy"] = float(
            np.mean([c["real_data_test_accuracy"] for c in report["classifiers"].values()])
        )
        report["real_train_images"] = len(real_train)
    report["synthetic_train_images"] = n_train
    report["synthetic_validation_images"] = n_val
    chosen.update({f"real/{kind}": sel for kind, sel in on_real.items()})
    report["real_test_images"] = len(real_test)
    return report, chosen, real_test

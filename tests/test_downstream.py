"""Downstream utility: selection on synthetic data only, the real test split read once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privimage.config.schema import DownstreamSettings
from privimage.data import ImageSplit
from privimage.errors import DataError
from privimage.metrics import downstream as ds


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as uint8 (N, 1, 8, 8): a real, fast classification task."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    d = load_digits()
    images = torch.from_numpy((d.images * 255 / 16).round().astype(np.uint8))[:, None]
    return ImageSplit(images, torch.from_numpy(d.target.astype(np.int64)))


def _settings(**kw):
    base = dict(
        classifier_width=8,
        classifier_epochs=8,
        linear_epochs=4,
        weight_decays=[0.0, 1e-2],
        classifier_batch_size=32,
    )
    return DownstreamSettings(**{**base, **kw})


def test_sealed_split_opens_once():
    split = ImageSplit(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    sealed = ds.SealedSplit(split)
    assert len(sealed) == 3 and not sealed.opened
    assert sealed.open() is split and sealed.opened
    with pytest.raises(ds.TestSplitAlreadyOpened, match="held-out synthetic data only"):
        sealed.open()


@pytest.mark.slow
def test_test_split_is_read_only_after_every_classifier_is_trained(digits, monkeypatch):
    """The order is enforced, not just intended: the seal records when it is opened, and a
    wrapper records each completed training run (the real function does the work)."""
    events = []
    train_and_select = ds.train_and_select

    def recording_train(kind, *args, **kwargs):
        result = train_and_select(kind, *args, **kwargs)
        events.append(f"trained {kind}")
        return result

    monkeypatch.setattr(ds, "train_and_select", recording_train)
    # "Synthetic" here: the first 800 digits; the real-data reference: the next 400.
    synthetic, real = digits.subset(np.arange(0, 800)), digits.subset(np.arange(1200, 1797))
    real_train = digits.subset(np.arange(800, 1200))
    sealed = ds.SealedSplit(real, on_open=lambda: events.append("opened test"))
    report, models, test = ds.evaluate_downstream(
        synthetic,
        sealed,
        num_classes=10,
        settings=_settings(),
        seed=0,
        device=torch.device("cpu"),
        real_train=real_train,
        progress=False,
    )
    trained = ["trained cnn", "trained logreg", "trained mlp"]
    assert events == [*trained, *trained, "opened test"]  # synthetic, then real, then test
    assert test is real and sealed.opened
    assert set(report["classifiers"]) == {"cnn", "logreg", "mlp"}
    assert set(models) == {"cnn", "logreg", "mlp", "real/cnn", "real/logreg", "real/mlp"}
    # Real digits are learnable: every classifier beats chance (0.1) by far on the test set.
    for c in report["classifiers"].values():
        assert c["test_accuracy"] > 0.4 and c["real_data_test_accuracy"] > 0.4  # chance: 0.1
    accs = [c["test_accuracy"] for c in report["classifiers"].values()]
    assert report["mean_test_accuracy"] == pytest.approx(np.mean(accs))
    assert report["synthetic_train_images"] + report["synthetic_validation_images"] == 800
    assert report["real_train_images"] == 400
    real_accs = [c["real_data_test_accuracy"] for c in report["classifiers"].values()]
    assert report["mean_real_data_test_accuracy"] == pytest.approx(np.mean(real_accs))


def test_selection_picks_the_best_validation_epoch_and_decay(digits):
    train, val = digits.subset(np.arange(0, 600)), digits.subset(np.arange(600, 800))
    sel = ds.train_and_select(
        "logreg",
        train,
        val,
        num_classes=10,
        settings=_settings(),
        seed=0,
        device=torch.device("cpu"),
        progress=False,
    )
    assert len(sel.history) == 2 * 4  # two decays x four epochs, each scored on validation
    best = max(sel.history, key=lambda h: h["val_accuracy"])
    assert sel.validation_accuracy == best["val_accuracy"]
    # The kept model is the one from that epoch: re-scoring it reproduces its accuracy.
    from privimage.nets.classifier import accuracy, predict_logits

    logits = predict_logits(sel.model, val.as_float(), batch_size=64, device="cpu")
    assert accuracy(logits, val.labels) == pytest.approx(sel.validation_accuracy)


def test_holdout_is_stratified_and_rejects_tiny_sets():
    labels = torch.arange(10).repeat(10)
    train_idx, val_idx = ds.synthetic_holdout(labels, 0.2, seed=0)
    assert sorted(labels[val_idx].tolist()) == sorted(list(range(10)) * 2)
    with pytest.raises(DataError, match="too few"):
        ds.synthetic_holdout(torch.arange(3), 0.1, seed=0)


def test_unknown_classifier_kind():
    with pytest.raises(ValueError, match="unknown downstream classifier"):
        ds.build_downstream("svm", image_shape=(1, 8, 8), num_classes=10, cnn_arch="cnn", width=8)


def test_a_narrow_resnet_trains_at_an_odd_batch_size():
    """Width 8 in channels_last crashed oneDNN's backward (heap corruption, torch 2.14.1,
    AMD EPYC) at batch 45: the GPU recipe's shrunk CPU copy hit it. It must train, and learn."""
    from privimage.nets.classifier import _narrowest_conv, train_classifier
    from privimage.nets.models import build_classifier

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(45) % 3
    images = (
        (torch.rand(45, 3, 32, 32, generator=g) * 0.2 - 0.1)
        + labels[:, None, None, None] * 0.5
        - 0.5
    )
    assert _narrowest_conv(build_classifier("resnet", in_channels=3, num_classes=3, width=8)) < 16
    model = train_classifier(
        images,
        labels,
        num_classes=3,
        width=8,
        epochs=30,
        batch_size=64,
        lr=1e-2,
        device=torch.device("cpu"),
        seed=0,
        arch="resnet",
        augment="none",
        progress=False,
    )
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() > 0.9

"""BN-statistics synthesis: exact class-wise statistics, and a synthesis that matches them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privimage import bnstat
from privimage.config.schema import EvaluateConfig
from privimage.nets.classifier import train_classifier
from privimage.nets.models import ResNet


@pytest.fixture(scope="module")
def digits():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # [-1, 1]
    return x, torch.from_numpy(d.target.astype(np.int64))


@pytest.fixture(scope="module")
def teacher(digits):
    x, y = digits
    return train_classifier(
        x,
        y,
        num_classes=10,
        width=8,
        epochs=2,
        batch_size=64,
        lr=3e-3,
        device=torch.device("cpu"),
        seed=0,
        arch="resnet",
        augment="none",
        progress=False,
    )


def test_classwise_statistics_equal_a_direct_computation(digits, teacher):
    x, y = digits
    stats = bnstat.classwise_bn_statistics(teacher, x, y, num_classes=10, batch_size=97)
    layers = [n for n, _ in bnstat.bn_layers(teacher)]
    assert list(stats.mean) == layers and len(layers) == 9  # stem, 3 blocks x 2, 2 shortcuts
    assert stats.counts.tolist() == torch.bincount(y, minlength=10).tolist()
    teacher.eval()
    for c in (0, 3, 9):
        with bnstat.capture_bn_inputs(teacher) as inputs, torch.no_grad():
            teacher(x[y == c])  # the whole class in one batch
            for name in layers:
                a = inputs[name].double()
                np.testing.assert_allclose(
                    stats.mean[name][c], a.mean(dim=(0, 2, 3)), rtol=1e-9, atol=1e-10
                )
                np.testing.assert_allclose(
                    stats.var[name][c], a.var(dim=(0, 2, 3), unbiased=False), rtol=1e-7, atol=1e-9
                )


def test_synthesis_loss_falls_and_statistics_approach_the_recorded_ones(digits, teacher):
    x, y = digits
    stats = bnstat.classwise_bn_statistics(teacher, x, y, num_classes=10)
    history = []
    # No jitter: a one-pixel roll is an eighth of an 8x8 digit, and the statistics were
    # recorded on unshifted images.
    weights = bnstat.SynthesisWeights(steps=200, lr=0.1, jitter_pixels=0)
    images = bnstat.synthesize(
        teacher,
        stats,
        3,
        num_images=16,
        image_shape=(1, 8, 8),
        seed=0,
        weights=weights,
        on_step=lambda step, parts: history.append(parts),
    )
    assert images.shape == (16, 1, 8, 8) and images.abs().max() <= 1.0
    first, last = history[0], np.mean([h["bn"] for h in history[-10:]])
    assert last < 0.05 * first["bn"], (first["bn"], last)
    assert np.mean([h["loss"] for h in history[-10:]]) < 0.5 * history[0]["loss"]
    # The teacher now reads the images as the class they were made for.
    assert (teacher(images).argmax(1) == 3).float().mean() > 0.9
    # Same seed, same images; another seed, other images.
    again = bnstat.synthesize(
        teacher, stats, 3, num_images=16, image_shape=(1, 8, 8), seed=0, weights=weights
    )
    torch.testing.assert_close(images, again)


def test_model_inversion_from_running_statistics(digits):
    """The evaluation's memorisation check: a trained BN CNN inverted from its running
    statistics alone gives images it reads as their class, and stays differentiable."""
    x, y = digits
    model = train_classifier(
        x,
        y,
        num_classes=10,
        width=8,
        epochs=4,
        batch_size=64,
        lr=3e-3,
        device=torch.device("cpu"),
        seed=0,
        arch="cnn",
        augment="none",
        progress=False,
    )
    stats = bnstat.ClassStatistics.from_running_stats(model, 10)
    layers = bnstat.bn_layers(model)
    assert list(stats.mean) == [n for n, _ in layers] and len(layers) == 6
    for name, layer in layers:
        for c in (0, 9):  # every class gets the all-class running statistics
            torch.testing.assert_close(stats.mean[name][c], layer.running_mean.double())
            torch.testing.assert_close(stats.var[name][c], layer.running_var.double())
    before = [p.requires_grad for p in model.parameters()]
    weights = bnstat.SynthesisWeights(
        steps=150, bn_weight=EvaluateConfig().model_inversion_bn_weight
    )
    hits = []
    for c in (2, 7):
        images = bnstat.synthesize(
            model, stats, c, num_images=4, image_shape=(1, 8, 8), seed=c, weights=weights
        )
        with torch.no_grad():
            hits.append((model(images).argmax(1) == c).float().mean())
    assert float(torch.stack(hits).mean()) >= 0.75, hits
    assert [p.requires_grad for p in model.parameters()] == before  # flags restored


def test_no_batchnorm_no_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    stats = bnstat.classwise_bn_statistics(
        model, torch.zeros(4, 1, 5, 5), torch.tensor([0, 1, 0, 1]), num_classes=2
    )
    assert stats.mean == {} and stats.counts.tolist() == [2, 2]


def test_resnet_has_batchnorm_layers():
    assert len(bnstat.bn_layers(ResNet(in_channels=3, num_classes=10, width=8))) == 9


BNSTAT_SMOKE = [
    "experiment=smoke",
    "synthesizer=bnstat",
    "stages=[sample,evaluate]",
    "bnstat.teacher_width=8",
    "bnstat.teacher_epochs=1",
    "bnstat.batch_size=3",
    "bnstat.steps=5",
]


@pytest.mark.slow
def test_bnstat_runs_end_to_end_and_says_it_is_not_private(tmp_path, compose):
    import json

    from privimage.pipeline import run_pipeline

    run = tmp_path / "run"
    cfg = compose(BNSTAT_SMOKE)
    run_pipeline(cfg, run)
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["differentially_private"] is False
    assert [(e["stage"], e["name"]) for e in ledger["non_private"]] == [("sample", "bnstat")]
    assert ledger["mechanisms"] == []
    with np.load(run / "sample" / "samples.npz") as f:
        assert f["images"].shape == (40, 1, 28, 28)  # 4 per class, batches of 3 and 1
        assert np.bincount(f["labels"]).tolist() == [4] * 10
    lines = (run / "sample" / "synthesis.jsonl").read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0])["step"] == 4
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["differentially_private"] is False and metrics["synthesizer"] == "bnstat"
    report = (run / "evaluate" / "report.md").read_text()
    assert "no differential-privacy guarantee" in report
    # A rerun changes nothing and records the non-private use once.
    run_pipeline(cfg, run)
    assert json.loads((run / "privacy.json").read_text())["non_private"] == ledger["non_private"]


def test_bnstat_refuses_diffusion_stages(compose):
    from privimage.errors import ConfigError

    with pytest.raises(ConfigError, match=r"set stages=\[sample,evaluate\]"):
        compose(["synthesizer=bnstat", "stages=[query,sample]"])

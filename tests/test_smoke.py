"""All five stages, end to end, on real data and real models (the tiny smoke preset)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from diffusers import UNet2DModel
from huggingface_hub import DatasetCard, ModelCard

from privimage.pipeline import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, compose):
    run_dir = tmp_path_factory.mktemp("smoke-run")
    cfg = compose(["experiment=smoke"])
    run_pipeline(cfg, run_dir)
    return cfg, run_dir


def test_every_stage_wrote_its_files(smoke_run):
    cfg, run = smoke_run
    for stage in ("query", "pretrain", "finetune", "sample", "evaluate"):
        assert (run / stage / "DONE").exists(), stage
    for name in ("selection.json", "selection.png", "public_index.npy", "public_labels.npy"):
        assert (run / "query" / name).stat().st_size > 0
    assert (run / "sample" / "grid.png").stat().st_size > 0
    assert (run / "sample" / "dataset").is_dir()
    with np.load(run / "sample" / "samples.npz") as f:
        n = 10 * cfg.sample.images_per_class
        assert f["images"].shape == (n, 1, 28, 28) and f["images"].dtype == np.uint8
        assert sorted(set(f["labels"].tolist())) == list(range(10))
    assert len(list((run / "sample" / "images").rglob("*.png"))) == n
    # Checkpoints load with plain diffusers.
    for stage in ("pretrain", "finetune"):
        assert isinstance(UNet2DModel.from_pretrained(run / stage / "unet"), UNet2DModel)


# What a user types after `pip install privimage`, and nothing of the test's process.
_FRESH_PYTHON = """
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline

folder, out, seeds, labels = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
generators = [torch.Generator().manual_seed(int(s)) for s in seeds.split(",")]
images = pipe(class_labels=[int(y) for y in labels.split(",")], generator=generators).images
np.save(out, np.stack([np.asarray(image) for image in images]))
print(type(pipe).__name__, type(pipe.scheduler).__name__)
"""


def test_the_pipeline_in_a_fresh_python_draws_the_sample_stages_images(smoke_run, tmp_path):
    """DiffusionPipeline.from_pretrained(run/finetune/pipeline), with the run's sampler,
    steps and guidance as its defaults, gives the sample stage's images seed for seed."""
    cfg, run = smoke_run
    with np.load(run / "sample" / "samples.npz") as f:
        pick = np.arange(0, len(f["seeds"]), cfg.sample.images_per_class)[:4]  # 4 classes
        seeds, labels, images = f["seeds"][pick], f["labels"][pick], f["images"][pick]
    out = tmp_path / "drawn.npy"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH_PYTHON,
            str(run / "finetune" / "pipeline"),
            str(out),
            ",".join(map(str, seeds)),
            ",".join(map(str, labels)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["PrivImagePipeline", "EDMHeunScheduler"]
    assert np.array_equal(np.load(out), images[:, 0])


def test_query_selection_is_disjoint_and_relabelled(smoke_run):
    _, run = smoke_run
    sel = json.loads((run / "query" / "selection.json").read_text())
    chosen = [p["public_class"] for c in sel["classes"] for p in c["public_classes"]]
    assert len(chosen) == len(set(chosen)) == 10
    labels = np.load(run / "query" / "public_labels.npy")
    index = np.load(run / "query" / "public_index.npy")
    assert len(labels) == len(index) == sel["selected_public_images"] > 0
    assert set(labels.tolist()) <= set(range(10))
    score = json.loads((run / "query" / "selection_score.json").read_text())
    assert 0.0 <= score["score"] <= 1.0 and 0.0 < score["random_baseline"] <= 1.0
    assert len(score["per_class"]) == 10 and "not part of the DP release" in score["note"]
    # The judge read the sensitive data outside any mechanism: listed, not charged.
    ledger = json.loads((run / "privacy.json").read_text())
    assert [m["name"] for m in ledger["measurements"]] == ["selection_judge"]
    assert ledger["differentially_private"] is True


def test_privacy_ledger_lists_every_mechanism_within_budget(smoke_run):
    cfg, run = smoke_run
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["accountant"] == "rdp"
    assert ledger["target_epsilon"] == cfg.privacy.target_epsilon
    mechs = {(m["stage"], m["name"]): m for m in ledger["mechanisms"]}
    assert set(mechs) == {("query", "gaussian_histogram"), ("finetune", "dp_sgd")}
    assert all(m["status"] == "completed" for m in mechs.values())
    q = mechs[("query", "gaussian_histogram")]
    assert q["sample_rate"] == 1.0 and q["steps"] == 1
    assert q["noise_multiplier"] == cfg.query.noise_multiplier
    sgd = mechs[("finetune", "dp_sgd")]
    assert sgd["steps"] >= 1 and 0 < sgd["sample_rate"] < 1
    # Calibrated on the composed history: spends the budget, never more.
    assert 0.95 * cfg.privacy.target_epsilon <= ledger["epsilon_spent"]
    assert ledger["epsilon_spent"] <= cfg.privacy.target_epsilon
    stats = (run / "finetune" / "stats.jsonl").read_text().splitlines()
    assert len(stats) == sgd["steps"]


def test_metrics_are_real_numbers(smoke_run):
    _, run = smoke_run
    m = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    assert 0.0 <= m["downstream_accuracy"] <= 1.0
    assert m["epsilon_spent"] <= m["target_epsilon"]


def test_rerun_skips_finished_stages(smoke_run):
    cfg, run = smoke_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    ledger_before = (run / "privacy.json").read_text()
    run_pipeline(cfg, run)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    manifest = (run / "release" / "MANIFEST.json").read_text()
    # release/ is rebuilt by every invocation (from the same finished outputs).
    changed = [
        p
        for p in before
        if after[p] != before[p] and p.name != "config.yaml" and "release" not in p.parts
    ]
    assert not changed, changed
    assert (run / "release" / "MANIFEST.json").read_text() == manifest
    assert (run / "privacy.json").read_text() == ledger_before


def test_report_gathers_the_run_into_one_table(smoke_run, tmp_path, capsys):
    """`privimage report` on a real run: one row whose figures are the run's own files'."""
    from privimage.results import cli, find_runs

    _, run = smoke_run
    timings = [json.loads(line) for line in (run / "timings.jsonl").read_text().splitlines()]
    assert [t["stage"] for t in timings] == ["query", "pretrain", "finetune", "sample", "evaluate"]
    # The run is found from a folder above it, as a sweep's root would be given: a copy of
    # the files the report reads, one level down in a folder of its own.
    job = tmp_path / "sweep" / "job0"
    for name in ("config.yaml", "privacy.json", "timings.jsonl", "evaluate/metrics.json"):
        (job / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / name, job / name)
    assert find_runs([tmp_path / "sweep"]) == [job] == find_runs([job])
    out = tmp_path / "results"
    assert cli([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    m = json.loads((run / "evaluate" / "metrics.json").read_text())
    ledger = json.loads((run / "privacy.json").read_text())
    assert row["method"] == "privimage" and row["name"] == "smoke" and row["data"] == "mnist5k"
    assert row["differentially_private"] == "True"
    assert float(row["epsilon_spent"]) == ledger["epsilon_spent"]
    assert float(row["fid"]) == m["fid"] and float(row["accuracy"]) == m["downstream_accuracy"]
    assert float(row["seconds"]) == pytest.approx(sum(t["seconds"] for t in timings), abs=0.1)
    assert "| privimage | smoke | mnist5k | yes |" in (out / "results.md").read_text()
    for plot in ("fid_vs_epsilon.png", "accuracy_vs_epsilon.png"):
        assert (out / plot).stat().st_size > 0
    assert "smoke" in capsys.readouterr().out


# What each releasable output may be a copy of: the DP mechanisms' outputs and what is
# computed from them and public data alone. Written out here, not read from the code's
# declarations, so a wrongly declared output fails this test.
ALLOWED_SOURCES = {
    "query/histogram_noisy.npy": {"query/gaussian_histogram"},
    "query/selection.json": {"query/gaussian_histogram"},
    "query/selection.png": {"query/gaussian_histogram"},
    "query/public_index.npy": {"query/gaussian_histogram"},
    "query/public_labels.npy": {"query/gaussian_histogram"},
    "finetune/pipeline": {"finetune/dp_sgd", "query/gaussian_histogram"},
    "sample/images": {"finetune/dp_sgd", "query/gaussian_histogram"},
    "sample/samples.npz": {"finetune/dp_sgd", "query/gaussian_histogram"},
    "sample/dataset": {"finetune/dp_sgd", "query/gaussian_histogram"},
    "sample/grid.png": {"finetune/dp_sgd", "query/gaussian_histogram"},
    "privacy.json": set(),
}


def _allowed(copy_of: str) -> set[str] | None:
    for source, mechanisms in ALLOWED_SOURCES.items():
        if copy_of == source or copy_of.startswith(source + "/"):
            return mechanisms
    return None


def test_release_holds_only_dp_outputs_and_public_data(smoke_run):
    """Walk every file in release/: each is a byte-exact copy of an output derived from the
    ledger's completed DP mechanisms or public data, and nothing else is there."""
    _, run = smoke_run
    release = run / "release"
    manifest = json.loads((release / "MANIFEST.json").read_text())
    ledger = json.loads((run / "privacy.json").read_text())
    completed = {f"{m['stage']}/{m['name']}" for m in ledger["mechanisms"]}
    assert {m["status"] for m in ledger["mechanisms"]} == {"completed"}
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {
        p.relative_to(release).as_posix()
        for p in release.rglob("*")
        if p.is_file() and p.name not in ("MANIFEST.json", "RELEASE.md")
    }
    assert on_disk == set(listed), on_disk ^ set(listed)
    for path, entry in listed.items():
        allowed = _allowed(entry["copy_of"])
        assert allowed is not None, f"{path} copies {entry['copy_of']}, which is not releasable"
        assert set(entry["mechanisms"]) <= allowed & completed, path
        assert (release / path).read_bytes() == (run / entry["copy_of"]).read_bytes(), path
    sources = {entry["copy_of"].split("/")[0] for entry in listed.values()}
    assert sources == {"query", "finetune", "sample", "privacy.json"}
    assert not any(s.startswith(("evaluate", "pretrain")) for s in sources)
    # What a user needs is there and loads: the DP model, the data, the noisy selection.
    model = UNet2DModel.from_pretrained(release / "model", subfolder="unet")
    assert isinstance(model, UNet2DModel)
    assert "_name_or_path" not in (release / "model" / "unet" / "config.json").read_text()
    with np.load(release / "synthetic" / "samples.npz") as f:
        assert len(f["images"]) == len(list((release / "synthetic" / "images").rglob("*.png")))
    assert (release / "selection" / "histogram_noisy.npy").exists()
    text = (release / "RELEASE.md").read_text()
    assert f"({ledger['epsilon_spent']:.3f}, 1e-05)-differentially private" in text
    assert "selection_score.json" in text and "evaluate/" in text  # said to stay behind
    assert manifest["noise_secret"] is True and manifest["differentially_private"] is True
    # The cards travel inside the folders they describe and parse as the hub reads them.
    model_card = ModelCard.load(release / "model" / "README.md")
    dataset_card = DatasetCard.load(release / "synthetic" / "dataset" / "README.md")
    for card in (model_card, dataset_card):
        assert "differential-privacy" in card.data.tags
        assert f"({ledger['epsilon_spent']:.3f}, 1e-05)-differentially private" in card.text
        assert all(f"`{m['stage']}/{m['name']}`" in card.text for m in ledger["mechanisms"])
    assert model_card.data.library_name == "diffusers"

"""The release boundary's rules on small run folders: lineage decides what leaves.

The end-to-end check on a real run (every file in release/ walked and traced back) is in
test_smoke.py; here each rule is shown to withhold what it must.
"""

from __future__ import annotations

import json
import subprocess
import sys

from privimage.dp.accounting import dpsgd_mechanism, query_mechanism
from privimage.dp.ledger import Ledger
from privimage.io.atomic import is_leftover
from privimage.io.release import Output, write_release

QUERY = query_mechanism(noise_multiplier=10.0, top_k=1)
SGD = dpsgd_mechanism(noise_multiplier=1.0, sample_rate=0.01, steps=10, max_grad_norm=1.0)
DECLARED = {
    "query": {
        "noisy.npy": Output(mechanism="query/gaussian_histogram", dest="selection/noisy.npy"),
        "selection.json": Output(inputs=("query/noisy.npy", "public"), dest="selection/s.json"),
    },
    "pretrain": {"unet": Output(inputs=("query/selection.json", "public"))},
    "finetune": {
        "unet": Output(mechanism="finetune/dp_sgd", inputs=("pretrain/unet",), dest="model")
    },
    "sample": {"images": Output(inputs=("finetune/unet", "public"), dest="synthetic/images")},
}


def _run(tmp_path, *, finetune_status="completed", noise_secret=True):
    run = tmp_path / "run"
    files = {
        "query/noisy.npy": b"noisy",
        "query/selection.json": b"{}",
        "query/selection_score.json": b"judge",  # undeclared: never leaves
        "pretrain/unet/w.safetensors": b"pre",
        "finetune/unet/w.safetensors": b"dp",
        "finetune/stats.jsonl": b"losses",
        "sample/images/0/000000.png": b"png",
        "evaluate/metrics.json": b"{}",
    }
    for name, content in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
    for stage in ("query", "pretrain", "finetune", "sample", "evaluate"):
        (run / stage / "DONE").write_text("")
    ledger = Ledger(run / "privacy.json", target_epsilon=10.0, delta=1e-5, accountant="rdp")
    ledger.begin(QUERY, noise_secret=noise_secret)
    ledger.complete(QUERY)
    ledger.begin(SGD, noise_secret=noise_secret)
    if finetune_status == "completed":
        ledger.complete(SGD)
    return run, ledger


def _released(run):
    release = run / "release"
    return sorted(
        p.relative_to(release).as_posix()
        for p in release.rglob("*")
        if p.is_file() and p.name not in ("MANIFEST.json", "RELEASE.md")
    )


def test_outputs_whose_lineage_resolves_are_released_and_nothing_else(tmp_path):
    run, _ = _run(tmp_path)
    write_release(run, DECLARED, summary={"method": "test"})
    assert _released(run) == [
        "model/w.safetensors",
        "privacy.json",
        "selection/noisy.npy",
        "selection/s.json",
        "synthetic/images/0/000000.png",
    ]
    manifest = json.loads((run / "release" / "MANIFEST.json").read_text())
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path["synthetic/images/0/000000.png"]["mechanisms"] == [
        "finetune/dp_sgd",
        "query/gaussian_histogram",
    ]
    assert by_path["model/w.safetensors"]["copy_of"] == "finetune/unet/w.safetensors"


def test_an_output_of_an_unfinished_mechanism_is_withheld_with_what_follows_from_it(tmp_path):
    run, _ = _run(tmp_path, finetune_status="started")
    write_release(run, DECLARED, summary={})
    assert _released(run) == ["privacy.json", "selection/noisy.npy", "selection/s.json"]
    withheld = json.loads((run / "release" / "MANIFEST.json").read_text())["withheld"]
    assert any("finetune/dp_sgd, not completed" in w for w in withheld)
    assert any(w.startswith("`sample/images`") for w in withheld)


def test_a_non_private_step_withholds_everything(tmp_path):
    run, ledger = _run(tmp_path)
    ledger.record_non_private(stage="sample", name="bnstat", description="fits the data")
    write_release(run, DECLARED, summary={})
    assert _released(run) == ["privacy.json"]
    text = (run / "release" / "RELEASE.md").read_text()
    assert "NOT differentially private" in text and "Only the ledger" in text


def test_a_measurement_is_listed_but_not_released_and_keeps_the_guarantee(tmp_path):
    run, ledger = _run(tmp_path)
    ledger.record_measurement(stage="query", name="selection_judge", description="the judge")
    write_release(run, DECLARED, summary={})
    assert "selection/noisy.npy" in _released(run)
    assert not any("score" in p for p in _released(run))
    text = (run / "release" / "RELEASE.md").read_text()
    assert "-differentially private with respect to one sensitive training image" in text
    assert "- the judge" in text


def test_seeded_noise_is_released_under_a_warning(tmp_path):
    run, _ = _run(tmp_path, noise_secret=False)
    write_release(run, DECLARED, summary={})
    manifest = json.loads((run / "release" / "MANIFEST.json").read_text())
    assert manifest["noise_secret"] is False and manifest["differentially_private"] is False
    assert "synthetic/images/0/000000.png" in _released(run)  # kept for the tests' use
    text = (run / "release" / "RELEASE.md").read_text()
    assert "NOT differentially private against anyone who knows the run's config" in text
    assert "DERIVED FROM THE SEED" in text


def test_a_rebuild_drops_what_is_no_longer_releasable(tmp_path):
    run, _ = _run(tmp_path)
    write_release(run, DECLARED, summary={})
    assert "model/w.safetensors" in _released(run)
    # Nothing finished or changed since: the release is left as it is, not rebuilt.
    inode = (run / "release" / "model" / "w.safetensors").stat().st_ino
    write_release(run, DECLARED, summary={})
    assert (run / "release" / "model" / "w.safetensors").stat().st_ino == inode
    (run / "finetune" / "DONE").unlink()  # the stage is being redone
    write_release(run, DECLARED, summary={})
    assert _released(run) == ["privacy.json", "selection/noisy.npy", "selection/s.json"]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".release")) == []


def test_an_over_budget_ledger_releases_nothing(tmp_path):
    run, _ = _run(tmp_path)
    ledger = json.loads((run / "privacy.json").read_text())
    ledger["epsilon_spent"] = 12.0  # as a mechanism that ran beyond what was approved
    (run / "privacy.json").write_text(json.dumps(ledger))
    write_release(run, DECLARED, summary={})
    assert _released(run) == ["privacy.json"]
    assert "NOT within budget" in (run / "release" / "RELEASE.md").read_text()


def test_a_write_killed_before_its_rename_leaves_nothing_in_the_release(tmp_path):
    """kill -9 inside atomic_file leaves its temporary file beside the outputs (no cleanup
    runs); a resumed stage writes the real file again, and the release skips the leftover."""
    run, _ = _run(tmp_path)
    image = run / "sample" / "images" / "0" / "000001.png"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from privimage.io.atomic import atomic_file\n"
            "with atomic_file(sys.argv[1]) as f:\n"
            "    f.write(b'png')\n"
            "    f.flush()\n"
            "    os._exit(9)\n",
            str(image),
        ],
        check=False,
    )
    assert killed.returncode == 9
    leftovers = [p for p in image.parent.iterdir() if p.name != "000000.png"]
    assert len(leftovers) == 1 and is_leftover(leftovers[0]) and not image.exists()
    image.write_bytes(b"png")  # what the resumed stage writes
    write_release(run, DECLARED, summary={"method": "test"})
    synthetic = [p for p in _released(run) if p.startswith("synthetic/")]
    assert synthetic == ["synthetic/images/0/000000.png", "synthetic/images/0/000001.png"]
    manifest = json.loads((run / "release" / "MANIFEST.json").read_text())
    assert not [f["path"] for f in manifest["files"] if f["path"].endswith(".tmp")]

"""Fault injection: SIGKILL the pipeline at seeded random points of every stage, rerun.

Each trial starts the whole smoke pipeline in a fresh run folder, kills it with SIGKILL
at a random time inside one stage (the stages take turns; once the stage has started,
the kill waits a share of that stage's time in an uninterrupted run drawn from a seeded
generator), then runs the same command again to the end. Every trial must end with

* the same release as the uninterrupted run: every file of ``release/`` with the same
  SHA-256 (the ledger aside, whose times and journal differ), and
* a ledger that never under-counts: the same mechanisms with the same parameters and
  the same epsilon, and at every moment (right after the kill, too) a record of every
  mechanism whose noise may have been drawn.

Bit-identical releases need DP randomness that follows the seed, so these runs set
``privacy.reproducible_noise=true``; with secret noise a restart draws fresh noise and
is charged as a second release (tests/test_secret_noise.py). The resumes of the single
stages are tested in detail in test_pretrain.py, test_resume.py and test_sample.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from privimage.config.schema import Config

STAGES = Config().stages

pytestmark = pytest.mark.slow

TRIALS = 20
# Smaller than the smoke preset where a stage's extra work adds time but no new way to
# fail: the attacks in the evaluation (their own tests cover them).
OVERRIDES = [
    "experiment=smoke",
    "device=cpu",
    "privacy.reproducible_noise=true",
    "evaluate.gradient_attack_images=0",
    "evaluate.model_inversion_images_per_class=0",
    "evaluate.gan_attack_images_per_class=0",
]
LEDGER_VOLATILE = ("time", "status")
# Files a DP mechanism writes only after it drew noise: the query's noisy histogram,
# fine-tuning's per-step stats and checkpoints.
NOISE_TRACES = {
    "query": ["histogram_noisy.npy", "draw.json"],
    "finetune": ["stats.jsonl", "checkpoint.pt"],
}


def _release(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every released file but the ledger copies and the files naming times."""
    root = run_dir / "release"
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and path.name not in ("privacy.json", "MANIFEST.json", "RELEASE.md"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _mechanisms(run_dir: Path) -> list[dict]:
    ledger = json.loads((run_dir / "privacy.json").read_text())
    return [{k: v for k, v in m.items() if k not in LEDGER_VOLATILE} for m in ledger["mechanisms"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_command, repo_root):
    """An uninterrupted run (after a warm-up run, so both see the same warm cache)."""
    root = tmp_path_factory.mktemp("faults")
    for name in ("warm", "ref"):
        subprocess.run(
            cli_command(OVERRIDES, root / name), cwd=repo_root, check=True, capture_output=True
        )
    run = root / "ref"
    rows = [json.loads(line) for line in (run / "timings.jsonl").read_text().splitlines()]
    return {
        "root": root,
        "release": _release(run),
        "mechanisms": _mechanisms(run),
        "epsilon": json.loads((run / "privacy.json").read_text())["epsilon_spent"],
        "seconds": {r["stage"]: r["seconds"] for r in rows},
    }


def _interrupted_stage(run_dir: Path) -> str | None:
    """The first stage without DONE after the kill (None: the run had finished)."""
    for stage in STAGES:
        if not (run_dir / stage / "DONE").exists():
            return stage
    return None


def test_sigkill_anywhere_then_rerun_gives_the_same_release(reference, cli_command, repo_root):
    rng = np.random.default_rng(20261203)
    hit: dict[str, int] = {}
    kills = 0
    for trial in range(TRIALS):
        stage = STAGES[trial % len(STAGES)]
        after = rng.uniform(0.05, 0.95) * reference["seconds"][stage]
        run = reference["root"] / f"trial{trial:02d}"
        proc = subprocess.Popen(
            cli_command(OVERRIDES, run),
            cwd=repo_root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Wait for the stage to start (its log line), then a random share of the time it
        # took in the uninterrupted run: the kill lands inside it whatever the start-up
        # costs and however loaded the machine is.
        log, marker = run / "__main__.log", f"stage {stage}: starting"
        while proc.poll() is None and marker not in (log.read_text() if log.exists() else ""):
            time.sleep(0.02)
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        where = _interrupted_stage(run)
        hit[where or "after the end"] = hit.get(where or "after the end", 0) + 1
        ledger_path = run / "privacy.json"
        ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
        on_record = {m["stage"] for m in ledger.get("mechanisms", [])}
        # Wherever noise was drawn (its traces exist), the mechanism is on record, with
        # its whole planned spend, even though the process died before finishing it.
        for noisy, traces in NOISE_TRACES.items():
            if any((run / noisy / t).exists() for t in traces):
                assert noisy in on_record, (trial, where, noisy)
        rerun = subprocess.run(
            cli_command(OVERRIDES, run), cwd=repo_root, capture_output=True, text=True
        )
        assert rerun.returncode == 0, (trial, where, rerun.stderr[-2000:])

        assert _release(run) == reference["release"], (trial, where)
        assert _mechanisms(run) == reference["mechanisms"], (trial, where)
        spent = json.loads((run / "privacy.json").read_text())["epsilon_spent"]
        assert spent == pytest.approx(reference["epsilon"], rel=1e-12), (trial, where)
        shutil.rmtree(run)
    # Every stage was interrupted at least once: the draws did reach inside each.
    assert all(hit.get(stage, 0) >= 1 for stage in STAGES), hit
    print(
        f"\nfault injection: {TRIALS} trials, {kills} SIGKILLs, interrupted stages {hit}; "
        f"every rerun gave the same release ({len(reference['release'])} files) and the "
        "same ledger: nothing lost, nothing double-counted"
    )

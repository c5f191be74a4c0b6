"""Shared fixtures: one data/model cache for the whole session, the composed configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from privimage.config.schema import Config
from privimage.config.store import config_dir, register_configs, to_config

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache per test session: datasets are decoded once, not once per test."""
    return tmp_path_factory.mktemp("privimage-cache")


def compose_config(overrides: list[str] | None = None):
    """Compose the Hydra config exactly as the CLI does (without running it)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def typed_config(overrides: list[str], cache: Path) -> Config:
    return to_config(compose_config([*overrides, f"cache_dir={cache}", "device=cpu"]))


def cli_command(overrides: list[str], run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """``python -m privimage`` with ``overrides`` in ``run_dir`` and the test cache."""
    return [
        sys.executable,
        "-m",
        "privimage",
        *overrides,
        f"cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m privimage <args>`` from the repository root, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "privimage", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# A smoke fine-tune that can be stopped and resumed: 12 logical steps at q = 1/6, a
# checkpoint every 3, and seeded DP noise so that a resumed run can be compared bit for
# bit with an uninterrupted one (secret-noise resume is tested in test_secret_noise.py).
RESUMABLE_FINETUNE = [
    "experiment=smoke",
    "stages=[finetune]",
    "finetune.epochs=2",
    "finetune.checkpoint_every_steps=3",
    "finetune.noise_multiplicity=1",
    "device=cpu",
    "privacy.reproducible_noise=true",
]


def pretrain_smoke(run_dir: Path, cache: Path) -> Path:
    """The smoke preset's query and pretraining in ``run_dir``; scenarios fine-tune copies."""
    from privimage.pipeline import run_pipeline

    run_pipeline(typed_config(["experiment=smoke", "stages=[query,pretrain]"], cache), run_dir)
    return run_dir


def copy_run(source: Path, tmp_path: Path, name: str) -> Path:
    """A copy of a run folder, to fine-tune without touching the original."""
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def jsonl_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until ``path`` has ``count`` lines while ``proc`` still runs (then kill it)."""
    deadline = time.monotonic() + timeout
    while len(jsonl_lines(path)) < count:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)

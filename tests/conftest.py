"""Shared fixtures: one data/model cache for the whole session, configs composed as the CLI
composes them, the command line, and the smoke preset's pretrained run.

Tests request these by argument; nothing here is imported by a test module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

from privimage.config import store
from privimage.config.schema import Config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root: the working directory of every ``python -m privimage`` run, so
    that the subprocess imports this checkout."""
    return REPO


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache per test session: datasets are decoded once, not once per test."""
    return tmp_path_factory.mktemp("privimage-cache")


@pytest.fixture(scope="session")
def compose(cache_dir) -> Callable[[Sequence[str]], Config]:
    """``compose(overrides)``: the typed, validated config (``privimage.compose``) on the
    CPU with the session's cache."""

    def make(overrides: Sequence[str] = ()) -> Config:
        return store.compose([*overrides, f"cache_dir={cache_dir}", "device=cpu"])

    return make


@pytest.fixture(scope="session")
def compose_dict() -> Callable[..., DictConfig]:
    """``compose_dict(overrides)``: the untyped config as Hydra composes it, before
    validation (``return_hydra_config=True`` adds the ``hydra`` node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def make(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
        store.register_configs()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=store.config_dir(), version_base="1.3"):
            return hydra_compose(
                config_name="config",
                overrides=list(overrides),
                return_hydra_config=return_hydra_config,
            )

    return make


@pytest.fixture(scope="session")
def cli_command(cache_dir) -> Callable[..., list[str]]:
    """``cli_command(overrides, run_dir, *extra, launcher=(python,))``: the command line of
    ``python -m privimage`` with ``overrides`` in ``run_dir`` and the session's cache."""

    def command(
        overrides: Sequence[str],
        run_dir: Path,
        *extra: str,
        launcher: Sequence[str] = (sys.executable,),
    ) -> list[str]:
        return [
            *launcher,
            "-m",
            "privimage",
            *overrides,
            f"cache_dir={cache_dir}",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]

    return command


@pytest.fixture(scope="session")
def run_cli(repo_root) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args, timeout=900)``: ``python -m privimage <args>`` from the repository
    root, as a user would run it."""

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "privimage", *args],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def resumable_finetune() -> tuple[str, ...]:
    """A smoke fine-tune that can be stopped and resumed: 12 logical steps at q = 1/6, a
    checkpoint every 3, and seeded DP noise so that a resumed run can be compared bit for
    bit with an uninterrupted one (secret-noise resume is tested in test_secret_noise.py)."""
    return (
        "experiment=smoke",
        "stages=[finetune]",
        "finetune.epochs=2",
        "finetune.checkpoint_every_steps=3",
        "finetune.noise_multiplicity=1",
        "device=cpu",
        "privacy.reproducible_noise=true",
    )


@pytest.fixture(scope="session")
def pretrain_smoke(compose) -> Callable[[Path], Path]:
    """``pretrain_smoke(run_dir)``: the smoke preset's query and pretraining in ``run_dir``
    (returned); scenarios fine-tune copies of it."""
    from privimage.pipeline import run_pipeline

    def pretrain(run_dir: Path) -> Path:
        run_pipeline(compose(["experiment=smoke", "stages=[query,pretrain]"]), run_dir)
        return run_dir

    return pretrain


@pytest.fixture
def copy_run(tmp_path) -> Callable[[Path, str], Path]:
    """``copy_run(source, name)``: a copy of a run folder in this test's ``tmp_path``, to
    fine-tune without touching the original."""

    def copy(source: Path, name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    return copy


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="session")
def jsonl_lines() -> Callable[[Path], list[str]]:
    """``jsonl_lines(path)``: the lines of a JSON-lines file ([] while it does not exist)."""
    return _lines


@pytest.fixture(scope="session")
def wait_for_lines() -> Callable[..., None]:
    """``wait_for_lines(path, count, proc)``: wait until ``path`` has ``count`` lines while
    ``proc`` still runs (then kill it)."""

    def wait(path: Path, count: int, proc: subprocess.Popen, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while len(_lines(path)) < count:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)

    return wait

"""Shared fixtures: one data/model cache for the whole session, the composed configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from privimage.__main__ import config_dir
from privimage.config import Config, register_configs, to_config

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


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m privimage <args>`` from the repository root, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "privimage", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

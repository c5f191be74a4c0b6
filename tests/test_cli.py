"""The command line: bad values end with one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "privimage",
            f"hydra.run.dir={tmp_path}/run",
            f"cache_dir={tmp_path}/cache",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["privacy.target_epsilon=0"], "privacy.target_epsilon=0.0 must be > 0"),
        (
            ["data=cifar10", "public=tinyimagenet", "data.path=/no/such/cifar10.tar.gz"],
            "/no/such/cifar10.tar.gz",
        ),
        (["data.source=imagenet9000"], "imagenet9000"),
        (["data=folder"], "data.path"),
    ],
)
def test_bad_value_ends_with_one_line(args, needle, tmp_path):
    proc = _run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_unknown_config_group_option_is_reported_by_hydra(tmp_path):
    proc = _run(["data=nosuchdataset"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "nosuchdataset" in proc.stderr and "mnist5k" in proc.stderr  # lists the choices

"""``privimage push``: what would go to the Hub, and the refusals, up to the upload call.

The upload itself needs the network and an account; here the Hub library runs for real
in offline mode and must come back as a one-line error.
"""

from __future__ import annotations

import json

import pytest

from privimage.errors import PrivImageError
from privimage.push import Upload, plan, push

DP_LEDGER = {"epsilon_spent": 9.9, "target_epsilon": 10.0, "noise_secret": True}


def _release(tmp_path, **ledger):
    release = tmp_path / "run" / "release"
    for folder in (release / "model", release / "synthetic" / "dataset"):
        folder.mkdir(parents=True)
        (folder / "README.md").write_text("---\nlicense: other\n---\n# card\n")
    (release / "privacy.json").write_text(json.dumps({**DP_LEDGER, **ledger}))
    return tmp_path / "run"


def test_a_dp_release_plans_the_model_and_the_dataset(tmp_path):
    run = _release(tmp_path)
    uploads = plan(run, model_repo="me/model", dataset_repo="me/data")
    assert uploads == [
        Upload(run / "release" / "model", "me/model", "model"),
        Upload(run / "release" / "synthetic" / "dataset", "me/data", "dataset"),
    ]
    assert plan(run, model_repo=None, dataset_repo="me/data")[0].repo_type == "dataset"


@pytest.mark.parametrize(
    ("ledger", "status"),
    [
        ({"noise_secret": False}, "seeded"),
        ({"differentially_private": False}, "none"),
        ({"epsilon_spent": 12.0}, "over_budget"),
    ],
)
def test_a_release_without_a_guarantee_is_refused(tmp_path, ledger, status):
    run = _release(tmp_path, **ledger)
    with pytest.raises(PrivImageError, match=f"no DP guarantee \\(privacy status '{status}'"):
        plan(run, model_repo="me/model", dataset_repo=None)


def test_bad_requests_are_one_line_errors(tmp_path):
    run = _release(tmp_path)
    for kwargs, words in [
        ({"model_repo": None, "dataset_repo": None}, "nothing to push"),
        ({"model_repo": "model", "dataset_repo": None}, "is not 'user/name'"),
    ]:
        with pytest.raises(PrivImageError, match=words) as e:
            plan(run, **kwargs)
        assert "\n" not in str(e.value)
    (run / "release" / "model" / "README.md").unlink()
    with pytest.raises(PrivImageError, match="has no README.md card"):
        plan(run, model_repo="me/model", dataset_repo=None)
    with pytest.raises(PrivImageError, match="finish the run first"):
        plan(tmp_path / "nowhere", model_repo="me/model", dataset_repo=None)


def test_offline_the_upload_stops_with_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    uploads = plan(_release(tmp_path), model_repo="me/model", dataset_repo=None)
    with pytest.raises(PrivImageError, match="cannot push while offline") as e:
        push(uploads, private=True)
    assert "\n" not in str(e.value)


def test_the_command_refuses_a_seeded_release_with_status_2(tmp_path, run_cli):
    run = _release(tmp_path, noise_secret=False)
    proc = run_cli("push", str(run), "--model-repo", "me/model", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: the release in") and proc.stderr.count("\n") == 1

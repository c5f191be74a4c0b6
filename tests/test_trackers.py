"""Experiment trackers in the training stages (privimage.io.trackers): a DP fine-tune's
TensorBoard events hold its loss and epsilon at every step, a resumed attempt shows each
step once, and a tracker that cannot run is a one-line error."""

from __future__ import annotations

import json

import pytest

from privimage.errors import ConfigError
from privimage.io.stats import StatsWriter
from privimage.io.trackers import open_tracker
from privimage.pipeline import run_pipeline

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(logs_dir, tag: str) -> list[tuple[int, float]]:
    events = event_accumulator.EventAccumulator(str(logs_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_resumed_attempt_shows_each_step_once(tmp_path):
    stats = tmp_path / "stats.jsonl"
    for first, last, offset in ((1, 5, 0.0), (4, 6, 100.0)):  # crashed after 5, resumed at 3
        tracker = open_tracker(
            "tensorboard",
            stage_dir=tmp_path,
            run_name="finetune",
            config={"lr": 0.1, "max_grad_norm": None},
            first_step=first,
            private=True,
        )
        writer = StatsWriter.resume(stats, after_step=first - 1, tracker=tracker)
        for step in range(first, last + 1):
            writer.write(step=step, loss=offset + step, epsilon=step / 10, dp=True, note=None)
        writer.close()
    # The second attempt's values from step 4 on; every step once, in the log and the file.
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    assert _scalars(tmp_path / "logs" / "finetune", "loss") == expected
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == expected
    events = event_accumulator.EventAccumulator(str(tmp_path / "logs" / "finetune"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epsilon", "loss"]  # no flags, no step


@pytest.mark.parametrize(
    "override,match",
    [
        ("finetune.tracker=neptune", r"finetune.tracker='neptune'; choose one of \['tensorboard'"),
        ("pretrain.tracker=comet", r"pretrain.tracker='comet'; choose one of"),
    ],
)
def test_an_unknown_tracker_is_a_one_line_error(compose, override, match):
    with pytest.raises(ConfigError, match=match) as exc:
        compose(["experiment=smoke", override])
    assert "\n" not in str(exc.value)


def test_a_tracker_whose_package_is_missing_says_what_to_install(compose, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="needs the wandb package; pip install wandb, or set"):
        compose(["experiment=smoke", "finetune.tracker=wandb"])


@pytest.mark.slow
def test_dp_fine_tuning_logs_loss_and_epsilon_at_every_step(tmp_path, compose, pretrain_smoke):
    run = pretrain_smoke(tmp_path / "run")
    run_pipeline(
        compose(["experiment=smoke", "stages=[finetune]", "finetune.tracker=tensorboard"]), run
    )
    stats = [
        json.loads(line) for line in (run / "finetune" / "stats.jsonl").read_text().splitlines()
    ]
    logs = run / "finetune" / "logs" / "finetune"
    loss, epsilon = _scalars(logs, "loss"), _scalars(logs, "epsilon")
    assert [s for s, _ in epsilon] == [r["step"] for r in stats] == list(range(1, len(stats) + 1))
    assert [v for _, v in epsilon] == pytest.approx([r["epsilon"] for r in stats], rel=1e-6)
    assert [v for _, v in loss] == pytest.approx(
        [r["loss"] for r in stats if r["loss"] is not None], rel=1e-6
    )
    # The last step's epsilon is the fine-tune's spend in the ledger, query included.
    ledger = json.loads((run / "privacy.json").read_text())
    assert epsilon[-1][1] == pytest.approx(ledger["epsilon_spent"], rel=1e-5)
    # The logs are private: nothing of them reaches release/.
    assert not any("tfevents" in p.name for p in (run / "release").rglob("*"))

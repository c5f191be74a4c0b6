"""The typed evaluation result: one reading of ``metrics.json`` for the report, the
results table and the CLI, and one wording of a run's privacy for all three."""

from __future__ import annotations

import json

import pytest

from privimage import report as report_module
from privimage.errors import DataError
from privimage.io.artifacts import (
    EVALUATION_NOTE,
    PRIVACY_STATES,
    Evaluation,
    guarantee,
    load_evaluation,
    privacy_status,
    save_evaluation,
)
from privimage.report import privacy_line, summary_line
from privimage.results import run_row


def _ledger(**extra) -> dict:
    return {
        "epsilon_spent": 0.987654,
        "target_epsilon": 1.0,
        "delta": 1e-5,
        "noise_secret": True,
        "mechanisms": [
            {"status": "completed", "details": {"steps": 10}},
            {
                "status": "completed",
                "details": {"trainable": "all", "trained_parameters": 5, "parameters": 5},
            },
        ],
        **extra,
    }


def _evaluation(ledger: dict | None) -> Evaluation:
    return Evaluation(
        fid=12.3456,
        precision=0.5,
        recall=0.25,
        downstream_accuracy=None,
        **Evaluation.privacy_fields(ledger),
        synthesizer="diffusion",
        synthetic="/runs/x/sample/samples.npz",
        fidelity={"fid": 12.3456},
        utility={"not_computed": "one class"},
        leakage={"near_copies": {"synthetic_count": 0}},
    )


def test_ledger_fields_and_privacy_state():
    ev = _evaluation(_ledger())
    assert (ev.epsilon_spent, ev.target_epsilon, ev.delta) == (0.987654, 1.0, 1e-5)
    assert ev.differentially_private is True and ev.noise_secret is True
    # The DP-SGD entry is the completed one that says what it trained.
    assert ev.dp_trained == {"trainable": "all", "trained_parameters": 5, "parameters": 5}
    assert ev.privacy == "dp"
    assert _evaluation(_ledger(noise_secret=False)).privacy == "seeded"
    none = _evaluation(
        _ledger(differentially_private=False, non_private=[{"description": "bnstat teacher"}])
    )
    assert none.privacy == "none" and none.non_private_steps == ["bnstat teacher"]
    unknown = _evaluation(None)
    assert unknown.privacy == "unknown"
    assert unknown.epsilon_spent is unknown.differentially_private is unknown.dp_trained is None
    assert unknown.non_private_steps == []


@pytest.mark.parametrize(
    ("ledger", "words"),
    [
        (_ledger(), "epsilon 0.988 of 1.0 (delta 1e-05)"),
        (_ledger(noise_secret=False), "epsilon 0.988 but NOT differentially private against"),
        (_ledger(differentially_private=False), ", NOT differentially private"),
        (_ledger(epsilon_spent=1.25), "epsilon 1.25 OVER the target 1"),
        (None, None),
    ],
)
def test_summary_and_report_say_the_same_privacy(ledger, words):
    ev = _evaluation(ledger)
    line = summary_line(ev)
    headline = "FID 12.35, precision 0.500, recall 0.250, downstream accuracy n/a"
    if words is None:  # nothing is known of the images' privacy, and nothing is claimed
        assert line == headline
    else:
        assert line.startswith(headline) and words in line
    report = privacy_line(ev)
    expected = {
        "dp": "ε = 0.988 spent of 1.0",
        "seeded": "NOT differentially private against anyone who knows",
        "none": "Privacy: none.",
        "over_budget": "NOT within budget.** ε = 1.25 spent exceeds the target 1",
        "unknown": "Privacy: no ledger",
    }[ev.privacy]
    assert expected in report
    if ev.privacy == "dp":
        assert "trained every parameter (5 of 5 parameters)" in report


LEDGERS = {
    "unknown": {},
    "none": _ledger(differentially_private=False, non_private=[{"description": "teacher"}]),
    "over_budget": _ledger(epsilon_spent=1.0 + 1e-6),
    "seeded": _ledger(noise_secret=False),
    "dp": _ledger(epsilon_spent=1.0 + 1e-12),  # within the ledger's rounding tolerance
}


@pytest.mark.parametrize("state", PRIVACY_STATES)
def test_the_ledger_the_evaluation_and_the_release_agree_on_privacy(state):
    ledger = LEDGERS[state]
    assert privacy_status(ledger) == state
    # The evaluation copies the ledger's fields and must classify them the same way.
    assert _evaluation(ledger or None).privacy == state
    headline = guarantee(ledger)
    claims_dp = "-differentially private with respect to" in headline
    assert claims_dp == (state == "dp"), headline


def test_a_missing_noise_flag_is_not_read_as_secret():
    # A ledger that does not say its noise was secret gets no guarantee.
    ledger = {k: v for k, v in _ledger().items() if k != "noise_secret"}
    assert privacy_status(ledger) == "seeded"


def test_file_round_trip_keeps_the_key_order(tmp_path):
    ev = _evaluation(_ledger())
    ev.seconds = {"fidelity": 1.5, "total": 1.5}
    save_evaluation(tmp_path / "evaluate", ev)
    raw = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    # The key order metrics.json had before it was typed.
    assert list(raw) == [
        "fid",
        "precision",
        "recall",
        "downstream_accuracy",
        "epsilon_spent",
        "target_epsilon",
        "delta",
        "differentially_private",
        "noise_secret",
        "non_private_steps",
        "dp_trained",
        "synthesizer",
        "synthetic",
        "fidelity",
        "utility",
        "leakage",
        "seconds",
        "note",
    ]
    assert load_evaluation(tmp_path) == ev
    assert load_evaluation(tmp_path / "elsewhere") is None


def test_an_older_file_without_some_keys_still_reads():
    ev = Evaluation.from_json({"fid": 3.0, "synthetic": "x.npz", "unknown_key": 1})
    assert ev.fid == 3.0 and ev.privacy == "unknown"
    assert ev.leakage == {} and ev.seconds == {} and ev.non_private_steps == []
    assert ev.note == EVALUATION_NOTE  # a field with a default keeps it


def test_the_results_table_says_which_run_has_no_evaluation(tmp_path):
    with pytest.raises(DataError, match="has no evaluate/metrics.json; run the evaluate stage"):
        run_row(tmp_path)


def _gmi_result(control_accuracy: float) -> dict:
    pixels = {"pixel_l2": {"median": 6.0, "p05": 4.0}, "ssim": {"median": 0.4}}
    row = {**pixels, "images": 40, "near_copies": 0, "nearer_than_heldout_median": 0.25}
    return {
        "evaluator": {"trained_on": "all 4000 sensitive training images", "heldout_accuracy": 0.97},
        "prior_only": {**row, "attack_accuracy": 0.125},
        "real/cnn": {**row, "attack_accuracy": control_accuracy, "classified_as_target": 1.0},
        "cnn": {**row, "attack_accuracy": 0.55, "classified_as_target": 0.975},
        "heldout_real": pixels,
    }


@pytest.mark.parametrize("control_accuracy", [0.9, 0.2])
def test_report_rows_of_the_gan_attack_and_its_failed_control(control_accuracy):
    section = "\n".join(report_module._gmi(_gmi_result(control_accuracy)))
    assert "trained on all 4000 sensitive training images; 0.970 on held-out" in section
    assert "| recovered from CNN trained on real data (control) | 40 | " in section
    assert "| recovered from CNN trained on synthetic data | 40 | 0.550 | 0.975 | 6.00 |" in section
    assert "| GAN prior alone (random latents) | 40 | 0.125 |  | 6.00 |" in section
    assert "| real held-out images (baseline) |  |  |  | 6.00 | 4.00 | 0.400 |  | 0.5 |" in section
    assert "![GAN-based inversion](gan_inversion.png)" in section
    # A control the attack cannot beat the prior on says the attack is too weak to judge by.
    assert ("recovered little from the control" in section) == (control_accuracy < 0.325)


def test_report_says_why_the_gan_attack_did_not_run():
    lines = report_module._gmi({"not_computed": "evaluate.gan_attack_images_per_class=0"})
    assert "Not computed: evaluate.gan_attack_images_per_class=0." in lines

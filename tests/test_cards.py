"""The Hugging Face cards beside the fine-tuned UNet and the synthetic dataset
(privimage.io.cards): they parse as the hub parses them, state the ledger's guarantee and
every mechanism, and carry nothing measured on the sensitive data."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import DatasetCard, ModelCard

from privimage.io.cards import write_dataset_card, write_model_card

MECHANISMS = [
    {
        "stage": "query",
        "name": "gaussian_histogram",
        "status": "completed",
        "noise_multiplier": 12.5,
        "sample_rate": 1.0,
        "steps": 1,
        "sensitivity": 1.0,
        "noise_secret": True,
        "details": {},
    },
    {
        "stage": "finetune",
        "name": "dp_sgd",
        "status": "completed",
        "noise_multiplier": 1.1,
        "sample_rate": 0.05,
        "steps": 60,
        "sensitivity": 1.0,
        "noise_secret": True,
        "details": {"trainable": "all", "trained_parameters": 5, "parameters": 5},
    },
]


def _run(tmp_path, **ledger):
    run = tmp_path / "run"
    (run / "finetune" / "pipeline").mkdir(parents=True)
    (run / "sample" / "dataset").mkdir(parents=True)
    base = {
        "epsilon_spent": 9.87654,
        "target_epsilon": 10.0,
        "delta": 1e-5,
        "accountant": "prv",
        "noise_secret": True,
        "differentially_private": True,
        "mechanisms": MECHANISMS,
        "non_private": [],
    }
    (run / "privacy.json").write_text(json.dumps({**base, **ledger}))
    return run


def test_cards_of_a_dp_run_parse_and_state_the_ledger(tmp_path, compose):
    cfg = compose(["experiment=smoke"])
    run = _run(tmp_path)
    model = ModelCard.load(write_model_card(run / "finetune" / "pipeline", cfg, run))
    data = DatasetCard.load(
        write_dataset_card(
            run / "sample" / "dataset", cfg, run, images=40, class_names=["zero", "one"]
        )
    )
    assert model.data.library_name == "diffusers" and "class-conditional" in model.data.tags
    assert data.data.task_categories == ["image-classification"]
    for card in (model, data):
        assert "differential-privacy" in card.data.tags
        assert "not-differentially-private" not in card.data.tags
        assert "(9.877, 1e-05)-differentially private" in card.text
        assert "composed by one `prv` accountant" in card.text
        assert "`query/gaussian_histogram` (completed): noise multiplier 12.5" in card.text
        assert "`finetune/dp_sgd`" in card.text and "every parameter (5 of 5" in card.text
        assert "target epsilon 10 at delta 1e-05" in card.text  # the settings
        # Nothing measured on the sensitive data: no FID or accuracy figures.
        assert "FID" not in card.text and "accuracy" not in card.text
    assert "40 labelled images, 2 classes (zero, one)" in data.text
    assert "model fine-tuned with DP-SGD" in model.text


@pytest.mark.parametrize(
    ("ledger", "words"),
    [
        ({"noise_secret": False}, "NOT differentially private against anyone who knows"),
        (
            {
                "differentially_private": False,
                "non_private": [{"stage": "finetune", "name": "x", "description": "no noise"}],
            },
            "NOT differentially private: the ledger records",
        ),
        ({"epsilon_spent": 12.0}, "NOT within budget: epsilon 12 exceeds the target 10"),
    ],
)
def test_a_card_without_a_guarantee_says_so(tmp_path, compose, ledger, words):
    cfg = compose(["experiment=smoke"])
    run = _run(tmp_path, **ledger)
    card = ModelCard.load(write_model_card(run / "finetune" / "pipeline", cfg, run))
    assert words in card.text and "not-differentially-private" in card.data.tags
    assert "fine-tuned without a DP guarantee" in card.text  # the title too
    assert "-differentially private with respect to" not in card.text

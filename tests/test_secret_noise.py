"""The DP randomness is secret: nothing in the run folder or its config regenerates it.

The attack these tests repeat was run on a real smoke run before the fix: the noisy
histogram minus ``default_rng(seed).normal(...)`` gave back the exact sensitive vote
counts, and fine-tuning again with the config's seed reproduced the released model bit
for bit. Under the default both must fail; under ``privacy.reproducible_noise=true`` (the
tests' switch) both succeed, which shows the attack is real and the switch works.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from privimage.dp import training as dp_training
from privimage.errors import ConfigError, PrivacyBudgetError
from privimage.io import seeding
from privimage.pipeline import run_pipeline
from privimage.stages import finetune

QUERY = ["experiment=smoke", "stages=[query]", "query.score_selection=false"]
# Six logical steps at q = 1/6, a checkpoint after every step.
FINETUNE = [
    "experiment=smoke",
    "stages=[finetune]",
    "finetune.noise_multiplicity=1",
    "finetune.checkpoint_every_steps=1",
]
REPRODUCIBLE = "privacy.reproducible_noise=true"


def _seed_noise(shape, *, seed, std):
    """Every way this project ever derived the query noise from the seed."""
    old = np.random.default_rng(seed).normal(0.0, std, size=shape)
    entropy = seeding.dp_entropy(purpose="query/gaussian_histogram", seed=seed, reproducible=True)
    new = seeding.numpy_generator(entropy).normal(0.0, std, size=shape)
    return {"seed (before the fix)": old, "reproducible_noise": new}


def _distance_to_integers(x):
    return float(np.abs(x - np.round(x)).max())


def _query(tmp_path, name, compose, *extra):
    run = tmp_path / name
    cfg = compose([*QUERY, *extra])
    run_pipeline(cfg, run)
    selection = json.loads((run / "query" / "selection.json").read_text())
    ledger = json.loads((run / "privacy.json").read_text())
    return cfg, np.load(run / "query" / "histogram_noisy.npy"), selection, ledger


@pytest.mark.slow
def test_the_query_noise_cannot_be_subtracted_from_a_default_run(tmp_path, compose):
    cfg, noisy, selection, ledger = _query(tmp_path, "default", compose)
    assert ledger["noise_secret"] is True
    assert [m["noise_secret"] for m in ledger["mechanisms"]] == [True]
    for how, noise in _seed_noise(noisy.shape, seed=cfg.seed, std=selection["noise_std"]).items():
        # Exact counts would be integers; the noise std is 10, so a wrong guess is off by
        # about 0.5 on the worst of 620 cells.
        assert _distance_to_integers(noisy - noise) > 0.1, how
    _, again, _, _ = _query(tmp_path, "default-again", compose)
    assert not np.allclose(noisy, again), "two runs with one config drew the same noise"


@pytest.mark.slow
def test_reproducible_noise_is_regenerable_and_says_so(tmp_path, compose):
    cfg, noisy, selection, ledger = _query(tmp_path, "seeded", compose, REPRODUCIBLE)
    noise = _seed_noise(noisy.shape, seed=cfg.seed, std=selection["noise_std"])
    counts = noisy - noise["reproducible_noise"]
    # The attack works here: the exact histogram, one vote per training image (top-1).
    assert _distance_to_integers(counts) < 1e-9
    assert round(counts.sum()) == 600
    assert ledger["noise_secret"] is False and ledger["mechanisms"][0]["noise_secret"] is False
    release = (tmp_path / "seeded" / "release" / "RELEASE.md").read_text()
    assert "NOT differentially private against anyone who knows the run's config" in release


@pytest.mark.slow
def test_a_query_stopped_after_its_draw_finishes_from_it(tmp_path, compose, monkeypatch):
    """Interrupted in the selection judge: the rerun finishes from the saved noisy
    histogram, so the query is released (and charged) once, not twice with fresh noise."""
    from privimage.stages import query

    run = tmp_path / "judged"
    cfg = compose([*QUERY, "query.score_selection=true"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(query, "_score_selection", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg, run)
    drawn = np.load(run / "query" / "histogram_noisy.npy")
    assert not (run / "query" / "DONE").exists()
    run_pipeline(cfg, run)
    assert np.array_equal(np.load(run / "query" / "histogram_noisy.npy"), drawn)
    ledger = json.loads((run / "privacy.json").read_text())
    assert [m["status"] for m in ledger["mechanisms"]] == ["completed"]
    assert [e["event"] for e in ledger["events"]] == ["begin", "complete", "measurement"]
    assert (run / "query" / "selection_score.json").exists()
    # Asked with other settings, the saved draw is not reused: the ledger refuses instead.
    with pytest.raises(PrivacyBudgetError):
        (run / "query" / "DONE").unlink()
        run_pipeline(compose([*QUERY, "query.noise_multiplier=20"]), run)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pretrain_smoke):
    """Query and pretraining once; each scenario fine-tunes a copy of this run."""
    return pretrain_smoke(tmp_path_factory.mktemp("secret-base"))


def _finetune(run_dir, compose, *extra):
    run_pipeline(compose([*FINETUNE, *extra]), run_dir)
    return UNet2DModel.from_pretrained(run_dir / "finetune" / "unet").state_dict()


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_dp_sgd_differs_between_default_runs_and_not_under_reproducible_noise(
    pretrained, tmp_path, copy_run, compose
):
    first = _finetune(copy_run(pretrained, "a"), compose)
    second = _finetune(copy_run(pretrained, "b"), compose)
    assert not _same(first, second), "the DP-SGD noise or masks follow the config"
    seeded = _finetune(copy_run(pretrained, "c"), compose, REPRODUCIBLE)
    seeded_again = _finetune(copy_run(pretrained, "d"), compose, REPRODUCIBLE)
    assert _same(seeded, seeded_again)
    assert not _same(first, seeded)
    ledger = json.loads((tmp_path / "c" / "privacy.json").read_text())
    assert ledger["noise_secret"] is False  # one seeded mechanism is enough


class Crash(Exception):
    """Stands in for kill -9 right after a checkpoint was written."""


def _crash_after_checkpoint(monkeypatch, step):
    # The private checkpoint is written by the DP training state (privimage.dp.training).
    saved = dp_training.torch_save

    def save_then_crash(obj, path):
        saved(obj, path)
        if obj.get("step") == step:
            raise Crash

    monkeypatch.setattr(dp_training, "torch_save", save_then_crash)


def _crashed(pretrained, copy_run, compose, monkeypatch, *extra):
    run_dir = copy_run(pretrained, "crashed")
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, step=2)
        with pytest.raises(Crash):
            _finetune(run_dir, compose, *extra)
    assert (run_dir / "finetune" / finetune.CHECKPOINT).exists()
    return run_dir


@pytest.mark.slow
def test_resume_continues_the_checkpointed_secret_streams(
    pretrained, copy_run, compose, monkeypatch
):
    crashed = _crashed(pretrained, copy_run, compose, monkeypatch)
    ckpt = torch.load(crashed / "finetune" / finetune.CHECKPOINT, weights_only=True)
    assert ckpt["reproducible_noise"] is False and ckpt["step"] == 2
    copies = [crashed, copy_run(crashed, "crashed-copy")]

    draws = []

    def spy(**kwargs):
        draws.append(kwargs)
        return seeding.dp_entropy(**kwargs)

    monkeypatch.setattr(finetune, "dp_entropy", spy)
    resumed = [_finetune(run, compose) for run in copies]
    assert draws == [], "a resumed run drew new DP randomness instead of the checkpoint's"
    # Both continued the very streams in the checkpoint, so they agree exactly; had either
    # drawn fresh entropy they would not.
    assert _same(*resumed)
    for run in copies:
        ledger = json.loads((run / "privacy.json").read_text())
        sgd = [m for m in ledger["mechanisms"] if m["name"] == "dp_sgd"]
        assert [(m["status"], m["noise_secret"]) for m in sgd] == [("completed", True)]
        events = [
            (e["event"], e.get("from_step")) for e in ledger["events"] if e["stage"] == "finetune"
        ]
        assert events == [("begin", None), ("resume", 2), ("complete", None)]
        assert not (run / "finetune" / finetune.CHECKPOINT).exists()
    # And they are not what the config's seed would give.
    seeded = _finetune(copy_run(pretrained, "seeded"), compose, REPRODUCIBLE)
    assert not _same(resumed[0], seeded)


@pytest.mark.slow
def test_a_restart_without_the_checkpoint_is_charged_as_a_second_release(
    pretrained, copy_run, compose, monkeypatch
):
    crashed = _crashed(pretrained, copy_run, compose, monkeypatch)
    first = json.loads((crashed / "privacy.json").read_text())
    sigma_first = next(m for m in first["mechanisms"] if m["name"] == "dp_sgd")["noise_multiplier"]
    (crashed / "finetune" / finetune.CHECKPOINT).unlink()
    _finetune(crashed, compose)
    ledger = json.loads((crashed / "privacy.json").read_text())
    sgd = [m for m in ledger["mechanisms"] if m["name"] == "dp_sgd"]
    assert [m["status"] for m in sgd] == ["abandoned", "completed"]
    assert sgd[0]["noise_multiplier"] == sigma_first
    # Calibrated on top of the abandoned attempt: more noise, the same total budget.
    assert sgd[1]["noise_multiplier"] > sigma_first
    assert ledger["epsilon_spent"] <= ledger["target_epsilon"] * (1 + 1e-9)
    assert ledger["epsilon_spent"] > first["epsilon_spent"] * 0.99
    restart = [e for e in ledger["events"] if e["event"] == "restart"]
    assert len(restart) == 1 and restart[0]["abandoned_attempt"] is True


@pytest.mark.slow
def test_under_reproducible_noise_a_restart_replays_the_same_mechanism(
    pretrained, copy_run, compose, monkeypatch
):
    crashed = _crashed(pretrained, copy_run, compose, monkeypatch, REPRODUCIBLE)
    (crashed / "finetune" / finetune.CHECKPOINT).unlink()
    restarted = _finetune(crashed, compose, REPRODUCIBLE)
    ledger = json.loads((crashed / "privacy.json").read_text())
    assert [m["status"] for m in ledger["mechanisms"] if m["name"] == "dp_sgd"] == ["completed"]
    straight = _finetune(copy_run(pretrained, "straight"), compose, REPRODUCIBLE)
    assert _same(restarted, straight)


@pytest.mark.slow
def test_a_checkpoint_is_not_resumed_on_other_weights_or_other_data(
    pretrained, copy_run, compose, monkeypatch
):
    crashed = _crashed(pretrained, copy_run, compose, monkeypatch)
    ledger_before = (crashed / "privacy.json").read_text()
    # Same shapes, other sensitive images: the split seed picks other training digits.
    with pytest.raises(ConfigError, match="data_key"):
        _finetune(crashed, compose, "data.split_seed=1")
    unet = crashed / "pretrain" / "unet"
    model = UNet2DModel.from_pretrained(unet)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(unet)
    with pytest.raises(ConfigError, match="pretrained_weights"):
        _finetune(crashed, compose)
    assert (crashed / "privacy.json").read_text() == ledger_before


def test_a_restart_that_cannot_fit_beside_its_abandoned_attempts_says_why(tmp_path):
    from privimage.dp.accounting import dpsgd_mechanism
    from privimage.dp.ledger import Ledger

    ledger = Ledger(tmp_path / "privacy.json", target_epsilon=1.0, delta=1e-5, accountant="rdp")
    attempt = dpsgd_mechanism(noise_multiplier=5.0, sample_rate=0.01, steps=10, max_grad_norm=1)
    ledger.begin(attempt)
    ledger.begin(attempt)  # no checkpoint: the first attempt is abandoned and still counts
    error = ledger.explain_over_budget(PrivacyBudgetError("nothing left"), stage="finetune")
    assert "1 earlier finetune attempt(s)" in str(error) and "charged in full" in str(error)
    assert "new run directory" in str(error) and "\n" not in str(error)


@pytest.mark.slow
def test_bookkeeping_and_hooks_fine_tune_to_the_same_model(pretrained, copy_run, compose):
    """The two clipping paths compute the same clipped sums: with the same (seeded) noise,
    masks and diffusion draws, the finished models agree to 1e-4 (float rounding only)."""
    fast = _finetune(
        copy_run(pretrained, "bk"),
        compose,
        REPRODUCIBLE,
        "finetune.grad_sample_mode=bookkeeping",
    )
    hooks = _finetune(
        copy_run(pretrained, "hooks"),
        compose,
        REPRODUCIBLE,
        "finetune.grad_sample_mode=hooks",
    )
    moved = {k: (fast[k] - hooks[k]).norm() / hooks[k].norm().clamp(min=1e-12) for k in hooks}
    worst = max(moved, key=moved.get)
    assert moved[worst] < 1e-4, f"{worst}: relative difference {moved[worst]:.2e}"
    # Not trivially equal because nothing moved: fine-tuning changed the pretrained weights.
    start = UNet2DModel.from_pretrained(pretrained / "pretrain" / "unet").state_dict()
    assert not _same(start, fast)


def test_public_streams_are_named_so_seeds_and_purposes_never_share_one():
    """The non-private fine-tune once seeded its diffusion stream with seed + 2, so seed
    1's stream was seed 3's; named streams keep every (seed, purpose, key) apart."""
    draw = lambda *a: torch.randn(4, generator=seeding.public_generator(*a))  # noqa: E731
    assert torch.equal(
        draw(1, "finetune/no_dp/diffusion", 5), draw(1, "finetune/no_dp/diffusion", 5)
    )
    seen = [
        draw(seed, purpose, step)
        for seed in (1, 2, 3)
        for purpose in ("finetune/no_dp/diffusion", "finetune/no_dp/batch")
        for step in (0, 1)
    ]
    assert len({tuple(x.tolist()) for x in seen}) == len(seen)
    a = seeding.public_rng(1, "finetune/no_dp/batch", 7).random(3)
    assert np.array_equal(a, seeding.public_rng(1, "finetune/no_dp/batch", 7).random(3))

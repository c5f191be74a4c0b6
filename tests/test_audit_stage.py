"""The one-run privacy audit end to end: the real DP-SGD passes, broken ones are caught.

Every audit here runs the smoke preset's DP-SGD loop on its sensitive images plus 1000
canaries with secret coins. The real mechanism must measure at or below its claim; no
noise, no clipping and a noise stream regenerable from the config (the bug privimage
once shipped) must each measure above it. The bound must equal jax-privacy's on the same
scores, and nothing of the audit may reach ``release/``.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from privimage.diffusion import formulation
from privimage.dp.audit import CanaryScoring, canary_images, with_canary_classes
from privimage.errors import ConfigError
from privimage.nets.models import build_unet
from privimage.pipeline import run_pipeline

CLAIM = 0.5


def test_canaries_are_flat_distinct_and_a_function_of_the_seed():
    a = canary_images(50, (1, 8, 8), seed=3)
    assert torch.equal(a, canary_images(50, (1, 8, 8), seed=3))
    assert not torch.equal(a, canary_images(50, (1, 8, 8), seed=4))
    levels = a.flatten(1)
    assert (levels == levels[:, :1]).all()  # one grey level per image
    assert levels[:, 0].unique().numel() == 50 and levels.abs().max() <= 1


def test_canary_rows_start_at_the_null_row_and_leave_the_classes_alone(compose):
    cfg = compose(["experiment=smoke"])
    model = build_unet(cfg.model, resolution=16, channels=1, num_classes=3).eval()
    grown = with_canary_classes(model, 5).eval()
    table, new = model.class_embedding.weight, grown.class_embedding.weight
    assert new.shape[0] == table.shape[0] + 5
    assert torch.equal(new[:3], table[:3]) and torch.equal(new[-1], table[-1])  # null last
    assert all(torch.equal(new[3 + i], table[-1]) for i in range(5))
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([0.1, -0.3])
    with torch.no_grad():
        for label in (0, 2, 3):  # a class, the last class, the null class
            before = model(x, t, class_labels=torch.full((2,), label)).sample
            after_label = label if label < 3 else 3 + 5
            after = grown(x, t, class_labels=torch.full((2,), after_label)).sample
            assert torch.equal(before, after)
    # An untrained canary is drawn as the null class is.
    with torch.no_grad():
        canary = grown(x, t, class_labels=torch.full((2,), 4)).sample
        null = grown(x, t, class_labels=torch.full((2,), 8)).sample
    assert torch.equal(canary, null)


def test_scoring_noise_is_fixed_so_equal_models_score_equal(compose):
    cfg = compose(["experiment=smoke"])
    model = with_canary_classes(build_unet(cfg.model, resolution=16, channels=1, num_classes=2), 4)
    images = canary_images(4, (1, 16, 16), seed=0)
    labels = 2 + torch.arange(4)
    scoring = CanaryScoring(spec=cfg.diffusion, sigmas=[2.0, 5.0], seed=0, batch_size=3)
    first = scoring.losses(model, images, labels)
    assert np.array_equal(first, scoring.losses(model, images, labels))
    assert first.shape == (4,) and np.isfinite(first).all()


def test_alignment_is_the_cosine_of_the_row_move_and_minus_the_loss_gradient(compose):
    cfg = compose(["experiment=smoke"])
    torch.manual_seed(0)
    net = build_unet(cfg.model, resolution=16, channels=1, num_classes=2)
    reference = with_canary_classes(net, 4).eval()
    images = canary_images(4, (1, 16, 16), seed=1)
    labels = 2 + torch.arange(4)
    sigmas = [2.0, 5.0]
    scoring = CanaryScoring(spec=cfg.diffusion, sigmas=sigmas, seed=0, batch_size=3)
    # The independent reference: torch.func's gradient of the canaries' fixed-noise losses
    # (seed 0's noise images) as a function of the class table alone.
    params = dict(reference.named_parameters())
    noise = torch.randn((len(sigmas), *images.shape), generator=torch.Generator().manual_seed(29))
    kind = formulation(cfg.diffusion)

    def losses(table: torch.Tensor) -> torch.Tensor:
        class Table(torch.nn.Module):  # the UNet with ``table`` as its class rows
            config = reference.config

            def forward(self, *args, **kw):
                swapped = {**params, "class_embedding.weight": table}
                return torch.func.functional_call(reference, swapped, args, kw)

        return sum(
            kind.fixed_noise_loss(Table(), images, labels, noise[j], s).sum()
            for j, s in enumerate(sigmas)
        )

    grad = torch.func.grad(losses)(params["class_embedding.weight"].detach())[labels].detach()
    move = torch.stack([-grad[0], grad[1], torch.zeros_like(grad[2]), torch.randn(grad.shape[1])])
    audited = copy.deepcopy(reference)
    with torch.no_grad():
        audited.class_embedding.weight[labels] += 1e-3 * move
    cos = scoring.row_alignment(reference, audited, images, labels)
    expected = torch.nn.functional.cosine_similarity(-grad, move, dim=1).double().numpy()
    np.testing.assert_allclose(cos[[0, 1, 3]], expected[[0, 1, 3]], atol=1e-4)
    assert cos[0] == pytest.approx(1, abs=1e-4) and cos[1] == pytest.approx(-1, abs=1e-4)
    assert cos[2] == 0  # a row that did not move
    # And the direction is the loss's: a small step down lowers it, one up raises it.
    drop = scoring.losses(reference, images, labels) - scoring.losses(audited, images, labels)
    assert drop[0] > 0 > drop[1]


@pytest.mark.parametrize(
    "override,match",
    [
        ("audit.guesses=2000", r"audit.guesses=2000 must be between 1 and audit.canaries"),
        ("audit.broken=no_coins", r"audit.broken='no_coins'; choose one of"),
        ("audit.epsilon=0", r"audit.epsilon=0.0 must be > 0"),
        ("audit.significance=1.5", r"audit.significance=1.5 must be in \(0, 1\)"),
    ],
)
def test_bad_audit_settings_are_one_line_errors(compose, override, match):
    with pytest.raises(ConfigError, match=match) as exc:
        compose(["experiment=smoke", override])
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, pretrain_smoke):
    return pretrain_smoke(tmp_path_factory.mktemp("audit-base"))


def _audit(smoke_run, tmp_path, compose, *overrides: str) -> tuple[dict, object]:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = compose(["experiment=smoke", "stages=[audit]", f"audit.epsilon={CLAIM}", *overrides])
    run_pipeline(cfg, run)
    result = json.loads((run / "audit" / "audit.json").read_text())
    print(
        f"audit {overrides or 'real mechanism'}: lower bound {result['lower_bound']:.3f} "
        f"({result['correct']} of {result['guesses']} guesses right)"
    )
    return result, run


@pytest.mark.slow
def test_the_real_mechanism_stays_within_its_claim(smoke_run, tmp_path, compose):
    result, run = _audit(smoke_run, tmp_path, compose)
    assert result["lower_bound"] <= CLAIM
    assert result["claimed_epsilon"] == CLAIM and result["canaries"] == 1000
    assert result["guesses"] >= 50 and result["largest_bound"] > 2.7
    assert result["noise_multiplier"] > 0 and result["noise_secret"]
    # The referee (jax-privacy, in the dev extra) computes the same bound.
    assert result["referee_epsilon"] == pytest.approx(result["lower_bound"], abs=1e-6)
    scores = np.load(run / "audit" / "scores.npz")
    assert scores["scores"].shape == (1000,) and scores["kept"].sum() == result["canaries_kept"]
    assert (run / "audit" / "scores.png").stat().st_size > 0
    # Private: listed in the ledger as a measurement, absent from release/.
    ledger = json.loads((run / "privacy.json").read_text())
    assert any(m["stage"] == "audit" for m in ledger["measurements"])
    released = [p.name for p in (run / "release").rglob("*")]
    assert not any("audit" in name or name == "scores.npz" for name in released)


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken",
    ["audit.broken=no_noise", "audit.broken=no_clipping", "privacy.reproducible_noise=true"],
)
def test_a_broken_mechanism_measures_above_its_claim(smoke_run, tmp_path, compose, broken):
    result, _ = _audit(smoke_run, tmp_path, compose, broken)
    assert result["lower_bound"] > CLAIM, result
    assert result["referee_epsilon"] == pytest.approx(result["lower_bound"], abs=1e-6)

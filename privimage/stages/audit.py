"""Stage audit: a measured lower bound on epsilon from one DP-SGD run.

After Steinke, Nasr and Jagielski 2023 ("Privacy auditing with one training run"). The
accountant's epsilon rests on the code doing what the accountant assumes; this stage
checks the whole, end to end, on the run's own sensitive data and DP-SGD loop
(:meth:`privimage.dp.training.DPTraining.train`, the loop that makes the released model):

1. ``audit.canaries`` out-of-distribution images (flat grey, one level each, from the
   public ``seed``), each with **its own label**: the pretrained UNet's class table grows
   by one row per canary, started at the null (unconditional) row and trained with the
   rest, so a canary's gradient has a direction no other record shares. A canary is a
   worst-case record: its loss is scaled by ``audit.canary_loss_scale``, so its gradient
   is far above any clipping norm, which a correct DP-SGD clips away (the scale then
   changes nothing) and a broken one lets through. A **secret coin** per canary (fresh OS
   entropy, never the seed) decides whether it is trained on.
2. DP-SGD with the run's settings (batch, epochs, clipping, learning rate, K, trainable
   parameters plus the class table) over the sensitive images and one slot per canary.
   A canary left out keeps its slot with weight 0
   (:meth:`~privimage.dp.training.DPTraining.train`): its gradient is exactly zero, so
   the step is the mechanism run on the sensitive data plus the kept canaries, while
   every random stream (Poisson masks, loss draws, noise) advances as if all slots were
   there. The noise is calibrated to the audit's own claim
   ``(audit.epsilon, privacy.delta)`` for DP-SGD alone, because m canaries cannot show
   more than about ``log(guesses / 3)``.
3. Each canary is scored against a reference: the audited EMA model with the canaries'
   class rows put back to what they would be without the canaries (their start, or,
   when the DP streams follow the config's seed (``privacy.reproducible_noise``), their
   values in a replay of the training with every canary out, which the adversary can
   run because it knows those streams: the replay's rows got exactly the same noise).
   The rest of the network, which every record moves, is the same on both sides. The
   score (``audit.score``) is, by default, the cosine between how the canary's row moved
   and the way down its denoising loss in the reference (fixed noise levels
   ``audit.score_sigmas``, fixed noise images from the seed):
   :meth:`privimage.dp.audit.CanaryScoring.row_alignment`. ``audit.score=loss`` scores how far
   that loss fell instead; under Adam a row that only noise moved travels about as far
   as a trained one, so the loss drop ranks such rows among the trained ones more often.
4. The top ``audit.guesses`` scores are guessed "in"; :func:`privimage.dp.audit.
   epsilon_lower_bound` turns the right guesses into the largest epsilon they refute at
   ``1 - audit.significance`` confidence. ``jax-privacy`` (the dev extra), when
   installed, computes the same bound as a referee.

The real mechanism must give a bound at or below the claim. ``audit.broken`` (tests only:
``no_noise``, ``no_clipping``) and ``privacy.reproducible_noise=true`` (a noise stream
anyone with the config regenerates) break it, and the bound must then exceed the claim.

Privacy: the audit trains on the sensitive data, so the ledger lists it as a
measurement, and nothing of it is released (``RELEASE`` is empty). A killed audit starts
over: it spends nothing of the run's budget.

Reads ``pretrain/unet`` and the sensitive training split. Writes ``audit/``:
``audit.json`` (claim, bound, counts, settings), ``scores.npz`` (scores and coins),
``scores.png`` (the two score histograms), ``stats.jsonl`` (the audit run's losses).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from privimage import data
from privimage.config.schema import Config
from privimage.dp import accounting
from privimage.dp.audit import (
    CanaryScoring,
    canary_images,
    epsilon_lower_bound,
    with_canary_classes,
)
from privimage.dp.ledger import run_ledger
from privimage.dp.training import (
    STREAMS,
    DPTraining,
    Processes,
    dp_sgd_schedule,
    prepare_for_dp_sgd,
    select_trainable,
)
from privimage.errors import ConfigError
from privimage.io import artifacts
from privimage.io.artifacts import (
    AUDIT_RESULT,
    AUDIT_STAGE,
    Stage,
    mark_done,
    read_done_json,
    require_upstream,
    stage_dir,
)
from privimage.io.atomic import save_npz, write_json
from privimage.io.seeding import dp_entropy, numpy_generator
from privimage.io.stats import STATS
from privimage.nets.models import check_same_diffusion, load_unet
from privimage.runtime import cache_root, resolve_device, seed_everything

log = logging.getLogger(__name__)

STAGE = AUDIT_STAGE
RESULT_FILE = AUDIT_RESULT
# Nothing of the audit leaves the run: its model saw the sensitive data outside the budget.
RELEASE: dict = {}


def _dp_sgd(
    cfg: Config,
    model: UNet2DModel,
    dataset: TensorDataset,
    *,
    mechanism: accounting.Mechanism,
    noise_multiplier: float,
    entropy: dict[str, int],
    device: torch.device,
    stats_path: Path,
) -> torch.nn.Module:
    """One DP-SGD run of the run's loop on ``dataset``; returns its EMA model."""
    state = DPTraining.build(
        cfg,
        copy.deepcopy(model),
        dataset,
        noise_multiplier=noise_multiplier,
        entropy=entropy,
        ckpt=None,  # a killed audit starts over
        procs=Processes(),
        device=device,
    )
    if cfg.audit.broken == "no_clipping":
        # Book-keeping clips with its own norm; the optimizer's (for the noise) stays C.
        state.dp_model.max_grad_norm = math.inf
    state.train(
        cfg,
        mechanism=mechanism,
        prior=[],
        start=0,
        stats_path=stats_path,
        save_checkpoint=lambda step: None,  # a killed audit starts over
        procs=Processes(),
        device=device,
    )
    return state.ema.module


def run(cfg: Config, run_dir: Path) -> Path:
    """Audit the run's DP-SGD with canaries; see the module docstring."""
    started = time.perf_counter()
    pretrain_dir = require_upstream(run_dir, "pretrain", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    au = cfg.audit
    _check(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    # Recorded before the sensitive data is read; nothing of the audit is released.
    run_ledger(cfg, run_dir).record_measurement(
        stage=STAGE, name="one_run_audit", description=_measurement(cfg)
    )
    train = data.load(cfg.data, cache_dir=cache_root(cfg.cache_dir)).train
    n, m = len(train), au.canaries
    mechanism = _claimed_mechanism(cfg, num_records=n + m)
    sigma = 0.0 if au.broken == "no_noise" else mechanism.noise_multiplier
    model, num_classes, trained = _canary_model(cfg, pretrain_dir, m)
    canaries = canary_images(m, tuple(train.images.shape[1:]), seed=cfg.seed)
    canary_labels = num_classes + torch.arange(m)
    # The coins are the auditor's secret in every setting, broken or not.
    coins = numpy_generator(dp_entropy(purpose="audit/coins", seed=0, reproducible=False))
    kept = torch.from_numpy(coins.random(m) < 0.5)
    log.info(
        "audit: %d sensitive images + %d canaries (%d kept), q=%.5f, %d steps, noise "
        "multiplier %.4f for the claim epsilon %g at delta %.1e%s",
        n,
        m,
        int(kept.sum()),
        mechanism.sample_rate,
        mechanism.steps,
        sigma,
        au.epsilon,
        cfg.privacy.delta,
        "" if au.broken == "none" else f" (BROKEN on purpose: {au.broken})",
    )
    audited, reference, reference_kind = _train_audited(
        cfg,
        model,
        train,
        canaries,
        canary_labels,
        kept,
        mechanism=mechanism,
        sigma=sigma,
        num_classes=num_classes,
        out=out,
        device=device,
    )
    scores, losses = _scores(cfg, reference, audited, canaries, canary_labels, device)
    keep = kept.numpy()
    bound = epsilon_lower_bound(
        scores[keep],
        scores[~keep],
        guesses=au.guesses,
        significance=au.significance,
        delta=cfg.privacy.delta,
    )
    result = _result(
        cfg,
        bound,
        scores,
        keep,
        mechanism=mechanism,
        sigma=sigma,
        reference_kind=reference_kind,
        sensitive_images=n,
        trained=trained,
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    save_npz(out / "scores.npz", scores=scores, kept=keep, **losses)
    write_json(out / RESULT_FILE, result)
    _plot(out / "scores.png", scores, keep, bound, result)
    log.info("audit: %s", summary_line(result))
    mark_done(out)
    return out


def _result(
    cfg: Config,
    bound: dict,
    scores: np.ndarray,
    keep: np.ndarray,
    *,
    mechanism: accounting.Mechanism,
    sigma: float,
    reference_kind: str,
    sensitive_images: int,
    trained: dict,
) -> dict:
    """audit.json: the bound, the claim it tests, and how the audited run was trained."""
    au, ft = cfg.audit, cfg.finetune
    return {
        "claimed_epsilon": au.epsilon,
        "delta": cfg.privacy.delta,
        "lower_bound": bound["epsilon"],
        "confidence": 1 - au.significance,
        "canaries": len(keep),
        "canaries_kept": int(keep.sum()),
        "guesses": bound["guesses"],
        "correct": bound["correct"],
        "largest_bound": bound["largest"],
        "threshold": bound["threshold"],
        "referee_epsilon": _referee(scores[keep], scores[~keep], bound, au, cfg.privacy.delta),
        "broken": au.broken,
        "noise_secret": not cfg.privacy.reproducible_noise,
        "reference": reference_kind,
        "noise_multiplier": sigma,
        "claimed_noise_multiplier": mechanism.noise_multiplier,
        "sample_rate": mechanism.sample_rate,
        "steps": mechanism.steps,
        "max_grad_norm": ft.max_grad_norm,
        "noise_multiplicity": ft.noise_multiplicity,
        "lr": ft.lr,
        "sensitive_images": sensitive_images,
        **trained,
        "score": au.score,
        "score_sigmas": list(au.score_sigmas),
        "canary_loss_scale": au.canary_loss_scale,
    }


def _claimed_mechanism(cfg: Config, *, num_records: int) -> accounting.Mechanism:
    """The DP-SGD mechanism whose claim (audit.epsilon, no prior spend) is audited."""
    ft = cfg.finetune
    sample_rate, steps = dp_sgd_schedule(
        num_records=num_records, batch_size=ft.batch_size, epochs=ft.epochs
    )
    claimed_sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=cfg.audit.epsilon,
        delta=cfg.privacy.delta,
        sample_rate=sample_rate,
        steps=steps,
        prior=[],
        accountant=cfg.privacy.accountant,
    )
    return accounting.dpsgd_mechanism(
        noise_multiplier=claimed_sigma,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=ft.max_grad_norm,
    )


def _measurement(cfg: Config) -> str:
    return (
        f"a DP-SGD run at epsilon {cfg.audit.epsilon:g} on the sensitive training images "
        f"plus {cfg.audit.canaries} canaries, to measure a lower bound on epsilon; "
        "nothing of it is released"
    )


def _check(cfg: Config) -> None:
    ft = cfg.finetune
    if not ft.dp:
        raise ConfigError(
            "the audit measures DP-SGD, and this run has finetune.dp=false; set finetune.dp=true"
        )
    if cfg.audit.broken == "no_clipping" and ft.grad_sample_mode != "bookkeeping":
        raise ConfigError(
            "audit.broken=no_clipping needs finetune.grad_sample_mode=bookkeeping (the hooks "
            f"path clips and noises with one norm); this run has {ft.grad_sample_mode!r}"
        )


def _canary_model(cfg: Config, pretrain_dir: Path, m: int):
    """The pretrained UNet with ``m`` canary classes, ready for DP-SGD; its number of real
    classes, and which parameters train."""
    pretrained, trained_with = load_unet(pretrain_dir / artifacts.UNET)
    check_same_diffusion(trained_with, cfg.diffusion, pretrain_dir / artifacts.UNET)
    num_classes = pretrained.config.num_class_embeds - 1
    model = with_canary_classes(pretrained, m)
    prepare_for_dp_sgd(model)
    trainable = (
        None if cfg.finetune.trainable is None else [*cfg.finetune.trainable, "class_embedding"]
    )
    return model, num_classes, select_trainable(model, trainable)


def _train_audited(
    cfg, model, train, canaries, canary_labels, kept, *, mechanism, sigma, num_classes, out, device
):
    """DP-SGD with the kept canaries in, and the reference the scores compare against."""
    n, m = len(train), len(canaries)
    images = torch.cat([train.as_float(), canaries])
    labels = torch.cat([train.labels, canary_labels])

    def slots(weights: torch.Tensor) -> TensorDataset:
        weights = weights.float() * cfg.audit.canary_loss_scale
        return TensorDataset(images, labels, torch.cat([torch.ones(n), weights]))

    reproducible = cfg.privacy.reproducible_noise
    entropy = {
        name: dp_entropy(purpose=f"audit/{name}", seed=cfg.seed, reproducible=reproducible)
        for name in STREAMS
    }
    train_with = {
        "mechanism": mechanism,
        "noise_multiplier": sigma,
        "entropy": entropy,
        "device": device,
    }
    audited = _dp_sgd(cfg, model, slots(kept), stats_path=out / STATS, **train_with)
    # The reference is the audited model with each canary's class row put back to what it
    # would be had the canary been left out, so the score isolates the canary's own
    # direction: the rest of the network, which every record moves, is the same in both.
    if reproducible:
        # The adversary knows the streams: it reruns the training with every canary out,
        # whose rows then got exactly the noise the audited rows got.
        replay = out / "replay_stats.jsonl"
        without = _dp_sgd(cfg, model, slots(torch.zeros(m)), stats_path=replay, **train_with)
        reference_kind = "canary rows from a replay with every canary out (streams known)"
    else:
        without = model  # rows at their start: the pretrained null row
        reference_kind = "canary rows at their start"
    reference = copy.deepcopy(audited)
    rows = slice(num_classes, num_classes + m)
    with torch.no_grad():
        reference.class_embedding.weight[rows] = without.class_embedding.weight[rows].to(
            reference.class_embedding.weight.device
        )
    return audited, reference, reference_kind


def _scores(cfg, reference, audited, canaries, canary_labels, device):
    """Every canary's score (``audit.score``), and for the loss score both models' losses."""
    scoring = CanaryScoring(
        spec=cfg.diffusion, sigmas=list(cfg.audit.score_sigmas), seed=cfg.seed, device=device
    )
    if cfg.audit.score == "alignment":
        log.info("audit: scoring canaries (row alignment)")
        return scoring.row_alignment(reference, audited, canaries, canary_labels), {}
    before, after = (
        scoring.losses(net, canaries, canary_labels)
        for net in tqdm((reference, audited), desc="audit: scoring canaries")
    )
    return before - after, {"loss_before": before, "loss_after": after}


def _referee(ins, outs, bound: dict, au, delta: float) -> float | None:
    """jax-privacy's one-run bound on the same scores and threshold (None: not installed)."""
    try:
        from jax_privacy.auditing import CanaryScoreAuditor, Explicit
    except ImportError:
        return None
    if delta <= 0:
        return None  # the referee needs delta > 0
    return float(
        CanaryScoreAuditor(ins, outs).epsilon_one_run(
            au.significance, delta, threshold_strategy=Explicit(bound["threshold"])
        )
    )


def summary_line(result: dict) -> str:
    """The audit's headline in one line (CLI, log, report)."""
    line = (
        f"claimed epsilon {result['claimed_epsilon']:g} (delta {result['delta']:g}), measured "
        f"lower bound {result['lower_bound']:.3f} at {result['confidence']:.0%} confidence "
        f"from {result['canaries']} canaries ({result['correct']} of {result['guesses']} "
        f"guesses right; at most {result['largest_bound']:.2f} measurable)"
    )
    if result["broken"] != "none":
        line += f"; DP-SGD broken on purpose: {result['broken']}"
    if not result["noise_secret"]:
        line += "; noise regenerable from the config"
    return line


def _plot(path: Path, scores: np.ndarray, keep: np.ndarray, bound: dict, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[~keep], bins=bins, alpha=0.6, label=f"left out ({int((~keep).sum())})")
    ax.hist(scores[keep], bins=bins, alpha=0.6, label=f"trained on ({int(keep.sum())})")
    ax.axvline(bound["threshold"], color="k", lw=1, ls="--", label="guess 'in' above")
    ax.set_xlabel("canary score: loss drop against the reference")
    ax.set_ylabel("canaries")
    ax.set_title(
        f"claim eps {result['claimed_epsilon']:g}: bound {result['lower_bound']:.2f} "
        f"({result['correct']}/{result['guesses']} right)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_result(run_dir: Path) -> dict | None:
    """``audit/audit.json`` of a finished audit, or None."""
    return read_done_json(run_dir, STAGE, RESULT_FILE)


SPEC = Stage(name=STAGE, run=run)

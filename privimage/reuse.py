"""Stages shared between runs by content: an epsilon sweep computes query and pretraining once.

Neither the semantic query nor pretraining depends on the run's total budget: the query's
noise is set by ``query.noise_multiplier`` (or its own ``query.epsilon`` share) and
pretraining reads only public data and the query's released selection. With
``reuse_dir`` set, such a stage is keyed on everything it does depend on (its settings,
the upstream key, the datasets' content keys, the seed); the first run that needs it
computes it as usual and publishes a copy under ``<reuse_dir>/<stage>/<key>/``, and every
later run with the same key copies that folder in instead of recomputing it.

The query's copy is the same release (same noisy histogram, same selection), so each
run's ledger records its spend exactly as if the run had made it: once per run, before
the files arrive, and the run's budget check applies as usual. Runs of a sweep are
alternatives; publishing several of them composes their budgets.

A lock file per key makes concurrent jobs (a SLURM array) wait for the one computing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from privimage import data
from privimage.config.schema import Config
from privimage.data.cache import cache_key
from privimage.io.artifacts import DONE, mark_done, stage_dir

log = logging.getLogger(__name__)

# The stages whose output does not depend on privacy.target_epsilon.
SHAREABLE = ("query", "pretrain")


def stage_key(cfg: Config, stage: str) -> str:
    """The content key of ``stage``'s output under ``cfg`` (everything it depends on)."""
    if stage == "query":
        spec = {
            "data": data.content_key(cfg.data),
            "public": data.content_key(cfg.public),
            "query": asdict(cfg.query),
            # The query's noise is calibrated at the run's delta when query.epsilon is set.
            "delta": cfg.privacy.delta,
            "accountant": cfg.privacy.accountant,
            # Whether the shared copy's noise was secret; a run adopting it records that.
            "reproducible_noise": cfg.privacy.reproducible_noise,
        }
    elif stage == "pretrain":
        semantic = cfg.pretrain.public_subset == "semantic"
        spec = {
            "query": stage_key(cfg, "query") if semantic else None,
            # Other subsets read the sensitive class names (not images) from here.
            "data": data.content_key(cfg.data),
            "public": data.content_key(cfg.public),
            "pretrain": asdict(cfg.pretrain),
            "model": asdict(cfg.model),
            "diffusion": asdict(cfg.diffusion),
        }
    else:
        raise ValueError(f"stage {stage!r} is not shareable; only {SHAREABLE}")
    return cache_key({"stage": stage, "seed": cfg.seed, "version": 1, **spec})


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _link_or_copy(src: str, dst: str) -> None:
    # Finished stage files are never modified in place (writes replace them), so a hard
    # link is as safe as a copy and costs no disk; copies across file systems.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_stage(src: Path, dst: Path) -> None:
    """Copy a finished stage folder, its DONE marker last (written by the caller)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(DONE))


def run_shared(cfg: Config, run_dir: Path, stage: str, module: ModuleType) -> tuple[str, str]:
    """Run ``stage`` through the shared store; returns ``("computed" | "reused", key)``.

    A module may define ``adopt(cfg, run_dir, copy_in)`` to record what taking over a
    finished output means for the run (the query records its privacy spend around the
    copy); otherwise the folder is just copied in.
    """
    key = stage_key(cfg, stage)
    shared = Path(os.path.expanduser(cfg.reuse_dir)) / stage / key
    with _locked(shared.parent / f"{key}.lock"):
        if (shared / DONE).exists():
            out = stage_dir(run_dir, stage)

            def copy_in() -> None:
                _copy_stage(shared, out)

            adopt: Callable | None = getattr(module, "adopt", None)
            if adopt is not None:
                adopt(cfg, run_dir, copy_in)
            else:
                copy_in()
            mark_done(out)
            log.info("stage %s: reused %s", stage, shared)
            return "reused", key
        module.run(cfg, run_dir)
        tmp = shared.with_name(f".{key}.tmp")
        _copy_stage(stage_dir(run_dir, stage), tmp)
        mark_done(tmp)
        shutil.rmtree(shared, ignore_errors=True)
        tmp.rename(shared)
        log.info("stage %s: shared as %s for later runs", stage, shared)
        return "computed", key

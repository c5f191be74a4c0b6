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
from pathlib import Path

from privimage.config.schema import Config
from privimage.data.cache import cache_key
from privimage.io.artifacts import DONE, Stage, mark_done, stage_dir

log = logging.getLogger(__name__)


def stage_key(cfg: Config, spec: Stage, *, spec_of: Callable[[str], Stage]) -> str:
    """The content key of ``spec``'s output under ``cfg``: what the stage declares it
    depends on (``Stage.inputs``) and the keys of the stages upstream of it (``spec_of``
    names them; the pipeline's stage list)."""
    if spec.inputs is None:
        raise ValueError(f"stage {spec.name!r} depends on the privacy budget; not shared")
    parts = spec.inputs(cfg)
    for up in spec.upstream(cfg):
        parts[up] = stage_key(cfg, spec_of(up), spec_of=spec_of)
    return cache_key({"stage": spec.name, "seed": cfg.seed, "version": 2, **parts})


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


def run_shared(
    cfg: Config, run_dir: Path, spec: Stage, *, spec_of: Callable[[str], Stage]
) -> tuple[str, str]:
    """Run ``spec`` through the shared store; returns ``("computed" | "reused", key)``.

    A stage's ``adopt(cfg, run_dir, copy_in)`` records what taking over a finished output
    means for the run (the query records its privacy spend around the copy); without
    one, the folder is just copied in.
    """
    stage = spec.name
    key = stage_key(cfg, spec, spec_of=spec_of)
    shared = Path(os.path.expanduser(cfg.reuse_dir)) / stage / key
    with _locked(shared.parent / f"{key}.lock"):
        if (shared / DONE).exists():
            out = stage_dir(run_dir, stage)

            def copy_in() -> None:
                _copy_stage(shared, out)

            if spec.adopt is not None:
                spec.adopt(cfg, run_dir, copy_in)
            else:
                copy_in()
            mark_done(out)
            log.info("stage %s: reused %s", stage, shared)
            return "reused", key
        spec.run(cfg, run_dir)
        tmp = shared.with_name(f".{key}.tmp")
        _copy_stage(stage_dir(run_dir, stage), tmp)
        mark_done(tmp)
        shutil.rmtree(shared, ignore_errors=True)
        tmp.rename(shared)
        log.info("stage %s: shared as %s for later runs", stage, shared)
        return "computed", key

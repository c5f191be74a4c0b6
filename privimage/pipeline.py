"""Run the requested stages in order, skipping those whose ``DONE`` marker exists, then
rebuild ``release/`` (privimage.io.release) from what the finished stages declare
releasable."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

from privimage import data, reuse
from privimage.config.schema import Config
from privimage.config.store import save_run_config
from privimage.errors import ConfigError
from privimage.io import artifacts
from privimage.io.artifacts import STAGES, is_done, stage_dir
from privimage.io.cards import run_summary
from privimage.io.release import write_release
from privimage.runtime import cache_root
from privimage.stages import stage_spec

log = logging.getLogger(__name__)

# Stages that share their work among torchrun / accelerate-launch processes.
MULTI_PROCESS_STAGES = {"pretrain", "finetune"}


def run_pipeline(cfg: Config, run_dir: Path) -> Path:
    """Run ``cfg.stages`` (in pipeline order) inside ``run_dir``; returns ``run_dir``.

    Checks that every dataset can be found before any stage starts, so a wrong path
    fails in a second rather than after an hour of pretraining.
    """
    run_dir = Path(run_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One writer of the run's shared files under torchrun.
    main_process = int(os.environ.get("RANK", "0")) == 0
    if world > 1 and not set(cfg.stages) <= MULTI_PROCESS_STAGES:
        # The other stages are single-process; several copies of the query would each
        # spend the budget on the same run.
        raise ConfigError(
            f"{world} processes were launched (WORLD_SIZE={world}) but only pretraining and "
            f"DP fine-tuning run on many; launch with stages=[pretrain] or stages=[finetune], "
            f"and run stages={list(cfg.stages)} without torchrun"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    data.check_available(cfg.data)
    if cfg.synthesizer == "diffusion":  # bnstat reads no public data
        data.check_available(cfg.public)
    if any(_reads_sensitive(cfg, s) for s in cfg.stages if not is_done(run_dir, s)):
        # Decode (and cache) the sensitive images before the first stage, so a corrupt
        # file or a one-class dataset fails in seconds, not after the query classifier
        # has trained; the stages then read the cached copy. Decoding is no mechanism:
        # nothing leaves the run, and each budget check still precedes its mechanism.
        sensitive = data.load(cfg.data, cache_dir=cache_root(cfg.cache_dir), progress=main_process)
        data.check_classes(sensitive, cfg.data, key="data")
        del sensitive
    save_run_config(cfg, run_dir)

    for name in (s for s in STAGES if s in cfg.stages):
        stage = stage_spec(cfg, name)
        if is_done(run_dir, name):
            # A stage may refuse to be skipped when its finished output answers another
            # question than the one asked now.
            stage.check_done(cfg, run_dir)
            log.info("stage %s: already done (%s), skipped", name, stage_dir(run_dir, name))
            continue
        log.info("stage %s: starting", name)
        start = time.perf_counter()
        record: dict = {"stage": name}
        if cfg.reuse_dir and stage.inputs is not None and world == 1:
            spec_of = functools.partial(stage_spec, cfg)
            how, key = reuse.run_shared(cfg, run_dir, stage, spec_of=spec_of)
            record.update(how=how, key=key)
        else:
            stage.run(cfg, run_dir)
        seconds = time.perf_counter() - start
        log.info("stage %s: done in %.1f s", name, seconds)
        # Wall time per finished stage, for `privimage report` (a resumed stage appends
        # the time of the attempt that finished it); one writer under torchrun.
        if main_process:
            with (run_dir / artifacts.TIMINGS).open("a") as f:
                f.write(json.dumps({**record, "seconds": round(seconds, 1)}) + "\n")
    if main_process:
        write_release(run_dir, release_declarations(cfg), summary=run_summary(cfg))
    return run_dir


def _reads_sensitive(cfg: Config, stage: str) -> bool:
    """Whether ``stage`` reads the sensitive images: pretraining only for their class
    names when it skips the query's selection, diffusion sampling never."""
    if stage == "pretrain":
        return cfg.pretrain.public_subset != "semantic"
    if stage == "sample":
        return cfg.synthesizer == "bnstat"
    return True


def release_declarations(cfg: Config) -> dict:
    """Every stage's declared outputs (its ``RELEASE``, or ``release_outputs(cfg)``)."""
    return {name: stage_spec(cfg, name).release(cfg) for name in STAGES}


def shared_key(cfg: Config, stage: str) -> str:
    """The key under which runs share ``stage``'s output (privimage.reuse)."""
    spec_of = functools.partial(stage_spec, cfg)
    return reuse.stage_key(cfg, spec_of(stage), spec_of=spec_of)

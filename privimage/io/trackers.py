"""Experiment trackers for the training stages, through Accelerate's tracker interface.

Pretraining hands the tracker's name to its ``Accelerator(log_with=...)``. DP fine-tuning
runs its own processes, so it opens the same Accelerate tracker class here, on the main
process only. TensorBoard and mlflow write under the stage's ``logs/`` folder, which is
never released (the fine-tuning loss is computed on the sensitive images without noise,
like ``stats.jsonl``); wandb sends what it logs to its service.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from privimage.errors import ConfigError

log = logging.getLogger(__name__)

#: Trackers a training stage can log to (``pretrain.tracker``, ``finetune.tracker``).
TRACKERS = ("tensorboard", "wandb", "mlflow")
LOGS = "logs"


def check_tracker(kind: str | None, *, key: str) -> None:
    """A one-line error for an unknown tracker, or one whose package is not installed."""
    if kind is None:
        return
    if kind not in TRACKERS:
        raise ConfigError(f"{key}={kind!r}; choose one of {list(TRACKERS)} or null")
    if importlib.util.find_spec(kind) is None:
        raise ConfigError(
            f"{key}={kind} needs the {kind} package; pip install {kind}, or set {key}=null"
        )


def open_tracker(
    kind: str | None,
    *,
    stage_dir: Path,
    run_name: str,
    config: dict[str, Any],
    first_step: int,
    private: bool,
):
    """An Accelerate tracker that logs from ``first_step`` on, or None without one.

    A resumed stage replays the steps after its checkpoint, so TensorBoard is told to hide
    the crashed attempt's events from ``first_step`` on (its ``purge_step``): every step
    is then shown once. ``private``: what will be logged was computed on the sensitive
    data without noise (a warning when it leaves the machine).
    """
    if kind is None:
        return None
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    # Accelerate's trackers log through its logger, which needs its process state; with a
    # process group already started (a multi-process fine-tune), it only reads it.
    PartialState()
    logging_dir = Path(stage_dir) / LOGS
    cls = LOGGER_TYPE_TO_CLASS[kind]
    if kind == "tensorboard":
        tracker = cls(run_name, logging_dir, purge_step=first_step)
    elif kind == "mlflow":
        tracker = cls(experiment_name=run_name, logging_dir=str(logging_dir))
    else:
        tracker = cls(run_name)
    if private and kind != "tensorboard":
        log.warning(
            "%s.tracker=%s: the logged loss is computed on the sensitive images without "
            "noise and is not covered by the DP guarantee; keep that tracker's store as "
            "private as the run folder",
            run_name,
            kind,
        )
    tracker.main_process_only = False  # opened on the main process only
    tracker.start()
    tracker.store_init_configuration(config)
    return tracker

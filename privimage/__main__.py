"""Command-line entry point (``privimage`` and ``python -m privimage``): the only Hydra code.

Composes the config, builds the typed :class:`~privimage.config.schema.Config`, and runs the
requested stages in Hydra's run directory. Errors meant for the user are printed as one
line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from privimage.config.store import config_dir, register_configs, to_config
from privimage.errors import PrivImageError
from privimage.io.artifacts import load_evaluation
from privimage.report import summary_line

log = logging.getLogger("privimage")


def _task(cfg: DictConfig) -> None:
    from privimage.pipeline import run_pipeline

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        typed = to_config(cfg)
        run_pipeline(typed, run_dir)
    except PrivImageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as e:
        print(f"error: invalid config: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one summary for a torchrun / accelerate-launch job, from process 0
    evaluation = load_evaluation(run_dir)
    if evaluation is not None:
        print(f"privimage: {summary_line(evaluation)}")
    if "audit" in typed.stages:
        from privimage.stages import audit

        result = audit.read_result(run_dir)
        if result is not None:
            print(f"privimage: audit: {audit.summary_line(result)} (private: not in release/)")
    print(f"privimage: outputs in {run_dir}; share only {run_dir / 'release'}")


def main() -> None:
    # `privimage report <runs...>` and `privimage push <run> ...`: no Hydra, no stages.
    if sys.argv[1:2] in (["report"], ["push"]):
        import importlib

        module = {"report": "privimage.results", "push": "privimage.push"}[sys.argv[1]]
        try:
            sys.exit(importlib.import_module(module).cli(sys.argv[2:]))
        except PrivImageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    register_configs()
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_task)()


if __name__ == "__main__":
    main()

"""Command-line entry point (``privimage`` and ``python -m privimage``): the only Hydra code.

Composes the config, builds the typed :class:`~privimage.config.Config`, and runs the
requested stages in Hydra's run directory. Errors meant for the user are printed as one
line and exit with status 2.
"""

from __future__ import annotations

import json
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
from privimage.io import artifacts

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
    metrics = run_dir / "evaluate" / artifacts.METRICS
    if metrics.exists():
        print(f"privimage: {summary_line(json.loads(metrics.read_text()))}")
    if "audit" in typed.stages:
        from privimage.stages import audit

        result = audit.read_result(run_dir)
        if result is not None:
            print(f"privimage: audit: {audit.summary_line(result)} (private: not in release/)")
    print(f"privimage: outputs in {run_dir}; share only {run_dir / 'release'}")


def summary_line(m: dict) -> str:
    """The headline numbers of ``evaluate/metrics.json`` in one line."""

    def num(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    line = (
        f"FID {num(m.get('fid'), '.2f')}, precision {num(m.get('precision'), '.3f')}, "
        f"recall {num(m.get('recall'), '.3f')}, "
        f"downstream accuracy {num(m.get('downstream_accuracy'), '.3f')}"
    )
    if m.get("differentially_private") is False:
        line += ", NOT differentially private"
    elif m.get("noise_secret") is False:
        line += (
            f", epsilon {m['epsilon_spent']:.3f} but NOT differentially private against anyone "
            "who knows the config (privacy.reproducible_noise=true)"
        )
    elif m.get("epsilon_spent") is not None:
        line += (
            f", epsilon {m['epsilon_spent']:.3f} of {m['target_epsilon']} (delta {m['delta']:g})"
        )
    return line


def main() -> None:
    if sys.argv[1:2] == ["report"]:  # `privimage report <runs...>`: no Hydra, no stages
        from privimage.results import cli

        try:
            sys.exit(cli(sys.argv[2:]))
        except PrivImageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    register_configs()
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_task)()


if __name__ == "__main__":
    main()

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

from privimage.config import register_configs, to_config
from privimage.errors import PrivImageError

log = logging.getLogger("privimage")


def config_dir() -> str:
    """``conf/`` beside the package (a checkout or editable install), or $PRIVIMAGE_CONF."""
    override = os.environ.get("PRIVIMAGE_CONF")
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "conf"
    return str(path)


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
    metrics = run_dir / "evaluate" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        print(
            f"privimage: FID {m['fid']:.2f}, downstream accuracy {m['downstream_accuracy']:.3f}, "
            f"epsilon {m['epsilon_spent']:.3f} of {m['target_epsilon']} (delta {m['delta']:g})"
        )
    print(f"privimage: outputs in {run_dir}")


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_task)()


if __name__ == "__main__":
    main()

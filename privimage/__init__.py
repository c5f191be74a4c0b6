"""privimage: a sensitive image dataset in, a synthetic one with an (ε, δ)-DP guarantee out.

The public API, for notebooks and scripts (the CLI, ``python -m privimage``, is the
other entry)::

    from privimage import compose, run_pipeline
    cfg = compose(["experiment=demo"])          # the typed, validated config
    run_pipeline(cfg, "runs/demo")              # query, pretrain, finetune, sample, evaluate

The names below load on first use, so ``import privimage`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("privimage")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

# name -> module that defines it
_API = {
    "Config": "privimage.config.schema",
    "compose": "privimage.config.store",
    "to_config": "privimage.config.store",
    "load_group": "privimage.config.store",
    "group_options": "privimage.config.store",
    "run_pipeline": "privimage.pipeline",
    "load_unet": "privimage.nets.models",
    "sample_batch": "privimage.diffusion",
    "to_uint8": "privimage.diffusion",
    "run_row": "privimage.results",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'privimage' has no attribute {name!r}")

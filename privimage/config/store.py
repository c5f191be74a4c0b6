"""Hydra's side of the config: the schemas registered with its ConfigStore, and the typed
:class:`~privimage.config.schema.Config` built (and validated) from a composed config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from privimage.config.schema import Config
from privimage.config.validate import validate


def register_configs() -> None:
    """Register the root schema (``config_schema`` in ``conf/config.yaml``'s defaults), so
    Hydra type-checks every group's YAML against its dataclass."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=Config)


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Build the typed :class:`Config` from a composed Hydra config (ignores ``hydra``)."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True)
    else:
        container = dict(cfg)
    container.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(Config), container)
    typed: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if typed.privacy.epsilon is not None:
        typed.privacy.target_epsilon = typed.privacy.epsilon
    validate(typed)
    return typed


def config_dir() -> str:
    """``conf/`` beside the package (a checkout or editable install), or $PRIVIMAGE_CONF."""
    override = os.environ.get("PRIVIMAGE_CONF")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "conf"
    return str(path)


def compose(overrides: list[str] | None = None) -> Config:
    """The typed, validated config of ``overrides`` (``["experiment=demo", ...]``), composed
    as the CLI composes it, for notebooks, benches and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=list(overrides or [])))

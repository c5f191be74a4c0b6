"""Hydra's side of the config: the schemas registered with its ConfigStore, the typed
:class:`~privimage.config.schema.Config` built (and validated) from a composed config, and
one group's preset on its own (:func:`load_group`) for benches and notebooks, and the
config a finished run ran with (:func:`load_run_config`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from privimage.config.schema import Config
from privimage.config.validate import validate
from privimage.errors import ConfigError
from privimage.io.artifacts import RUN_CONFIG
from privimage.io.atomic import write_text


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


def group_options(group: str) -> list[str]:
    """The presets of config group ``group``: the names of ``conf/<group>/*.yaml``, sorted."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def load_group(group: str, name: str) -> Any:
    """One group's preset as a run would see it, typed, without composing a whole run.

    ``conf/<group>/<name>.yaml`` merged onto the group's node of :class:`Config` (the
    dataclass of that field, with the root schema's defaults: ``public`` is a
    :class:`~privimage.config.schema.DataConfig` that defaults to the glyphs). Nothing
    across groups is checked, so a bench may load ``data=cifar10`` beside the default
    public set, which :func:`compose` would refuse.

    Args:
        group: A config group with a schema (``data``, ``public``, ``model``, ``bnstat``,
            ...), not ``experiment`` or ``sweep``.
        name: The preset, e.g. ``tiny28`` for ``conf/model/tiny28.yaml``.

    Returns:
        The group's dataclass instance, e.g. a ``ModelConfig`` for ``model``.

    Raises:
        ConfigError: An unknown group or preset, or a preset that does not fit its schema.
    """
    schema = OmegaConf.structured(Config)
    node = schema.get(group) if group in schema else None
    if not isinstance(node, DictConfig):
        groups = [k for k in schema if isinstance(schema.get(k), DictConfig)]
        raise ConfigError(f"no config group {group!r} with a schema; choose one of {groups}")
    path = Path(config_dir()) / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no {group} preset {name!r} in {path.parent}; choose one of {group_options(group)}"
        )
    try:
        return OmegaConf.to_object(OmegaConf.merge(node, OmegaConf.load(path)))
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from err


def save_run_config(cfg: Config, run_dir: str | Path) -> None:
    """The run folder's ``config.yaml``: every setting, resolved, for people and
    :func:`load_run_config`."""
    text = yaml.safe_dump(asdict(cfg), sort_keys=False)
    write_text(Path(run_dir) / RUN_CONFIG, text)


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The typed config a run ran with, with dotted ``overrides`` (``["sample.batch_size=8"]``)
    on top: the run folder's ``config.yaml`` (which the pipeline writes), else Hydra's
    ``.hydra/config.yaml``. The pipeline's copy comes first: it is resolved, where Hydra's
    copy of a sweep job keeps interpolations such as ``${hydra:sweep.dir}`` that resolve
    only inside Hydra."""
    run_dir = Path(run_dir)
    # Hydra names its copy of the composed config the same.
    for path in (run_dir / RUN_CONFIG, run_dir / ".hydra" / RUN_CONFIG):
        if path.exists():
            try:
                raw = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides or []))
                return to_config(raw)
            except (OmegaConfBaseException, yaml.YAMLError) as e:
                raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    raise ConfigError(
        f"{run_dir} has no {RUN_CONFIG} or .hydra/config.yaml; pass a run folder (the "
        "hydra.run.dir of a privimage run)"
    )

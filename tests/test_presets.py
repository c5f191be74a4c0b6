"""Every preset and config option composes into a valid typed config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, typed_config

from privimage.__main__ import config_dir
from privimage.config import Config
from privimage.errors import ConfigError

CONF = Path(config_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment, tmp_path):
    cfg = typed_config([f"experiment={experiment}"], tmp_path)
    assert isinstance(cfg, Config)
    assert cfg.name == experiment


@pytest.mark.parametrize(
    "group",
    ["data", "public", "model", "privacy", "query", "pretrain", "finetune", "sample", "evaluate"],
)
def test_every_group_option_composes(group, tmp_path):
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group in ("data", "public"):
            overrides.append(f"{group}.path=/some/where")
            # Keep the pair shape-compatible: the public set must match the sensitive one.
            other = "public" if group == "data" else "data"
            probe = compose_config(overrides)
            overrides += [
                f"{other}.resolution={probe[group].resolution}",
                f"{other}.channels={probe[group].channels}",
                "model=nano",
            ]
        typed_config(overrides, tmp_path)


def test_cifar10_with_tinyimagenet_composes(tmp_path):
    cfg = typed_config(["data=cifar10", "public=tinyimagenet"], tmp_path)
    assert (cfg.data.source, cfg.public.source) == ("cifar10", "tinyimagenet")
    assert cfg.data.resolution == cfg.public.resolution == 32


@pytest.mark.parametrize(
    "override,needle",
    [
        ("privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
        ("privacy.epsilon=0", "privacy.epsilon"),
        ("privacy.epsilon=inf", "privacy.epsilon"),
        ("query.epsilon=10", "query.epsilon"),
        ("query.epsilon=-0.5", "query.epsilon"),
        ("finetune.noise_multiplicity=0", "finetune.noise_multiplicity"),
        ("finetune.checkpoint_every_steps=0", "finetune.checkpoint_every_steps"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("data.source=nosuchdata", "nosuchdata"),
        ("public.resolution=32", "public"),
        ("model.norm_num_groups=7", "norm_num_groups"),
        ("stages=[query,train]", "train"),
    ],
)
def test_bad_values_are_one_line_config_errors(override, needle, tmp_path):
    with pytest.raises(ConfigError) as e:
        typed_config([override], tmp_path)
    message = str(e.value)
    assert needle in message and "\n" not in message


def test_epsilon_shorthand_sets_the_target(tmp_path):
    cfg = typed_config(["data=cifar10", "public=tinyimagenet", "privacy.epsilon=1"], tmp_path)
    assert cfg.privacy.target_epsilon == 1.0
    assert typed_config([], tmp_path).privacy.target_epsilon == 10.0


def test_query_epsilon_share_calibrates_the_query_noise(tmp_path):
    from privimage.privacy import epsilon_spent, query_mechanism
    from privimage.stages.query import query_noise_multiplier

    cfg = typed_config(["query.epsilon=0.5"], tmp_path)
    sigma = query_noise_multiplier(cfg)
    spent = epsilon_spent([query_mechanism(noise_multiplier=sigma, top_k=1)], delta=1e-5)
    assert 0.5 - 0.005 <= spent <= 0.5
    assert query_noise_multiplier(typed_config([], tmp_path)) == 10.0

"""Every preset and config option composes into a valid typed config."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from privimage.config.schema import Config
from privimage.config.store import config_dir
from privimage.errors import ConfigError

CONF = Path(config_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment, compose):
    cfg = compose([f"experiment={experiment}"])
    assert isinstance(cfg, Config)
    assert cfg.name == experiment


@pytest.mark.parametrize(
    "group",
    [
        "data",
        "public",
        "model",
        "diffusion",
        "privacy",
        "query",
        "pretrain",
        "finetune",
        "sample",
        "evaluate",
    ],
)
def test_every_group_option_composes(group, compose, compose_dict):
    """Each option's typed group holds exactly what its YAML file sets."""
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group in ("data", "public"):
            overrides.append(f"{group}.path=/some/where")
            # Keep the pair shape-compatible: the public set must match the sensitive one.
            other = "public" if group == "data" else "data"
            probe = compose_dict(overrides)
            overrides += [
                f"{other}.resolution={probe[group].resolution}",
                f"{other}.channels={probe[group].channels}",
                "model=nano",
            ]
        typed = asdict(getattr(compose(overrides), group))
        expected = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
        if group in ("data", "public"):
            expected["path"] = "/some/where"
        assert expected, f"{group}/{option}.yaml sets nothing"
        assert {key: typed[key] for key in expected} == expected, f"{group}={option}"


def test_cifar10_with_tinyimagenet_composes(compose):
    cfg = compose(["data=cifar10", "public=tinyimagenet"])
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
        ("diffusion.formulation=vp", "diffusion.formulation"),
        ("diffusion.sigma_min=100", "diffusion.sigma_min"),
        ("diffusion.low_noise_fraction=1", "diffusion.low_noise_fraction"),
        ("diffusion.low_noise_fraction=-0.1", "diffusion.low_noise_fraction"),
        ("sample.sampler=ddim", "sample.sampler"),
        ("sample.guidance_scale=-1", "sample.guidance_scale"),
        ("pretrain.grid_sampler=ddim", "pretrain.grid_sampler"),
        ("pretrain.grid_num_inference_steps=0", "pretrain.grid_num_inference_steps"),
        ("pretrain.grid_guidance_scale=-1", "pretrain.grid_guidance_scale"),
        ("pretrain.mixed_precision=fp8", "pretrain.mixed_precision"),
        ("pretrain.tracker=wandb", "pretrain.tracker"),
        ("pretrain.label_dropout=1", "pretrain.label_dropout"),
        ("pretrain.gradient_accumulation_steps=0", "pretrain.gradient_accumulation_steps"),
        ("evaluate.classifiers=[cnn,svm]", "evaluate.classifiers"),
        ("evaluate.classifiers=[cnn,cnn]", "evaluate.classifiers"),
        ("evaluate.classifier_arch=vit", "evaluate.classifier_arch"),
        ("evaluate.validation_fraction=1", "evaluate.validation_fraction"),
        ("evaluate.reference_images.cpu=0", "evaluate.reference_images.cpu"),
        ("evaluate.weight_decays=[-1]", "evaluate.weight_decays"),
        ("evaluate.near_copy_threshold=2", "evaluate.near_copy_threshold"),
        ("evaluate.near_copy_neighbours=1", "evaluate.near_copy_neighbours"),
    ],
)
def test_bad_values_are_one_line_config_errors(override, needle, compose):
    with pytest.raises(ConfigError) as e:
        compose([override])
    message = str(e.value)
    assert needle in message and "\n" not in message


def test_epsilon_shorthand_sets_the_target(compose):
    cfg = compose(["data=cifar10", "public=tinyimagenet", "privacy.epsilon=1"])
    assert cfg.privacy.target_epsilon == 1.0
    assert compose([]).privacy.target_epsilon == 10.0


def test_query_epsilon_share_calibrates_the_query_noise(compose):
    from privimage.dp.accounting import epsilon_spent, query_mechanism
    from privimage.stages.query import query_noise_multiplier

    cfg = compose(["query.epsilon=0.5"])
    sigma = query_noise_multiplier(cfg)
    spent = epsilon_spent([query_mechanism(noise_multiplier=sigma, top_k=1)], delta=1e-5)
    assert 0.5 - 0.005 <= spent <= 0.5
    assert query_noise_multiplier(compose([])) == 10.0


# Parameter budgets (millions) per preset: tests sized, CPU sized, and PrivImage/DPDM's
# compact 1.8M-3.8M range at 32x32.
MODEL_SIZES = {
    "nano": (28, 1, 0.1, 0.3),
    "lean28": (28, 1, 0.6, 0.8),
    "tiny28": (28, 1, 0.9, 1.3),
    "small28": (28, 1, 2.0, 3.0),
    "tiny32": (32, 3, 1.4, 1.9),
    "small32": (32, 3, 3.4, 4.0),
}


def test_every_model_preset_has_a_size_entry():
    assert sorted(MODEL_SIZES) == _options("model")


@pytest.mark.parametrize("preset", sorted(MODEL_SIZES))
def test_every_model_preset_is_dp_trainable(preset, compose):
    """GroupNorm only, a null class for guidance, and Opacus' validator finds nothing."""
    import torch
    from opacus.validators import ModuleValidator

    from privimage.nets.models import build_unet, count_parameters

    resolution, channels, lo, hi = MODEL_SIZES[preset]
    cfg = compose([f"model={preset}"])
    model = build_unet(cfg.model, resolution=resolution, channels=channels, num_classes=10)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.config.num_class_embeds == 11
    assert lo <= count_parameters(model) / 1e6 <= hi
    out = model(
        torch.zeros(2, channels, resolution, resolution),
        torch.zeros(2),
        class_labels=torch.tensor([0, 10]),
    )
    assert out.sample.shape == (2, channels, resolution, resolution)

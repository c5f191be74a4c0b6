"""The query classifier: a CIFAR-style ResNet, trained once per public dataset and reused."""

from __future__ import annotations

import pytest
import torch

from privimage import data
from privimage.nets.models import ResNet, build_classifier
from privimage.stages.query import _classifier_key, query_classifier


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_resnet_classifier_shapes(size, channels):
    model = build_classifier("resnet", in_channels=channels, num_classes=7, width=8)
    assert isinstance(model, ResNet)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown classifier arch"):
        build_classifier("vgg", in_channels=1, num_classes=2, width=8)


@pytest.mark.slow
def test_query_classifier_is_trained_once_and_reused(cache_dir, compose):
    cfg = compose(["experiment=smoke"])
    public = data.load(cfg.public, cache_dir=cache_dir, progress=False)
    first, top1 = query_classifier(cfg, public, torch.device("cpu"))
    saved = cache_dir / "query_classifiers" / f"{_classifier_key(cfg)}.pt"
    stamp = saved.stat().st_mtime_ns
    second, top1_again = query_classifier(cfg, public, torch.device("cpu"))
    assert saved.stat().st_mtime_ns == stamp, "the cached classifier was retrained"
    assert top1_again == top1 and 0.0 <= top1 <= 1.0
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_classifier_key_follows_the_public_data_and_its_own_settings(compose):
    base = _classifier_key(compose(["experiment=smoke"]))
    # Same public images and settings: same key, whatever the sensitive side does.
    assert base == _classifier_key(
        compose(["experiment=smoke", "privacy.epsilon=1", "data.max_train_images=300"])
    )
    for change in (
        "public.max_train_images=100",
        "query.classifier_epochs=2",
        "query.classifier_arch=cnn",
        "query.classifier_augment=strong",
        "query.classifier_hflip=true",
    ):
        assert base != _classifier_key(compose(["experiment=smoke", change])), change


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_augmentation_is_seeded_in_range_and_changes_images(channels):
    import torch

    from privimage.nets.classifier import strong_augment

    x = torch.rand(16, channels, 32, 32) * 2 - 1
    a = strong_augment(x, torch.Generator().manual_seed(0), hflip=True)
    b = strong_augment(x, torch.Generator().manual_seed(0), hflip=True)
    c = strong_augment(x, torch.Generator().manual_seed(1), hflip=True)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x).abs().mean() > 0.05
    # A flat image stays flat (crops and flips move nothing); only its tone changes.
    flat = strong_augment(torch.zeros(4, channels, 8, 8), torch.Generator(), hflip=False)
    assert torch.allclose(flat, flat[:, :1, :1, :1].expand_as(flat), atol=1e-6)


def test_unknown_augmentation_is_refused(compose):
    from privimage.errors import ConfigError
    from privimage.nets.classifier import train_classifier

    with pytest.raises(ConfigError, match="query.classifier_augment"):
        compose(["experiment=smoke", "query.classifier_augment=mixup"])
    import torch

    with pytest.raises(ValueError, match="augment"):
        train_classifier(
            torch.zeros(4, 1, 8, 8),
            torch.zeros(4, dtype=torch.long),
            num_classes=2,
            width=8,
            epochs=1,
            batch_size=4,
            lr=1e-3,
            device=torch.device("cpu"),
            seed=0,
            augment="mixup",
        )

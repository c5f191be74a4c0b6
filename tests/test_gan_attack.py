"""The GAN-based model-inversion attack (GMI): its positive and negative controls.

A DCGAN prior trained on the public glyphs, real MNIST classifiers, and an independent
evaluation classifier trained on the other half of MNIST, as GMI measures attack
accuracy.
"""

from __future__ import annotations

import pytest
import torch

from privimage import data, load_group
from privimage.metrics import gan_attack
from privimage.metrics.gan_attack import gan_inversion, public_gan
from privimage.nets.classifier import predict_logits, train_classifier
from privimage.nets.models import build_classifier

GAN_STEPS = 1200


@pytest.fixture(scope="module")
def prior(cache_dir):
    spec = load_group("public", "glyphs")
    public = data.load(spec, cache_dir=cache_dir, progress=False)
    return spec, public, public_gan(spec, public, cache_dir=cache_dir, steps=GAN_STEPS, seed=0)


@pytest.fixture(scope="module")
def halves(cache_dir):
    """MNIST 5k's training split, shuffled, in two disjoint halves (it is sorted by label)."""
    train = data.load(load_group("data", "mnist5k"), cache_dir=cache_dir, progress=False).train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    half = len(order) // 2
    return train.subset(order[:half]), train.subset(order[half:])


def _classifier(split, *, width, seed):
    return train_classifier(
        split.as_float(),
        split.labels,
        num_classes=10,
        width=width,
        epochs=6,
        batch_size=64,
        lr=3e-3,
        device=torch.device("cpu"),
        seed=seed,
        progress=False,
    )


def test_the_attack_recovers_what_a_classifier_knows_and_nothing_from_a_random_one(prior, halves):
    _, _, (gen, disc) = prior
    attacked = _classifier(halves[0], width=16, seed=0)
    evaluator = _classifier(halves[1], width=32, seed=1)
    torch.manual_seed(5)
    untrained = build_classifier("cnn", in_channels=1, num_classes=10, width=16).eval()

    def attack_accuracy(classifier) -> float:
        recovered = gan_inversion(
            classifier, gen, disc, num_classes=10, images_per_class=4, steps=200, seed=0
        )
        assert recovered.images.dtype == torch.uint8 and recovered.images.shape == (40, 1, 28, 28)
        logits = predict_logits(evaluator, recovered.as_float(), batch_size=256, device="cpu")
        return float((logits.argmax(1) == recovered.labels).float().mean())

    # The positive control: what a real-data classifier knows of each digit comes back,
    # recognisable to a classifier that never saw the same images.
    assert attack_accuracy(attacked) >= 0.6
    # The negative control: a random classifier holds no digits to recover.
    assert attack_accuracy(untrained) <= 0.3


def test_the_prior_is_cached_on_the_public_data(prior, cache_dir, monkeypatch):
    spec, public, (gen, _) = prior
    saved = sorted((cache_dir / "gan_priors").glob("*.pt"))  # other tests' priors too
    assert saved

    def no_training(*args, **kwargs):
        raise AssertionError("the cached prior was trained again")

    monkeypatch.setattr(gan_attack, "train_gan", no_training)
    again, _ = public_gan(spec, public, cache_dir=cache_dir, steps=GAN_STEPS, seed=0)
    assert sorted((cache_dir / "gan_priors").glob("*.pt")) == saved
    for a, b in zip(gen.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    # Another number of steps is another prior: it is trained, not confused with this one.
    with pytest.raises(AssertionError, match="trained again"):
        public_gan(spec, public, cache_dir=cache_dir, steps=GAN_STEPS + 1, seed=0)

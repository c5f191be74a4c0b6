"""Where the randomness of every differentially private mechanism comes from.

The adversary of differential privacy knows everything about a run except the random
draws of its mechanisms: the code, the config, the seed, every released file. So the
Gaussian noise of the query, the Poisson masks of DP-SGD and its gradient noise are drawn
from **fresh operating-system entropy** (:func:`secrets.randbits`) at the start of each
mechanism, never from ``cfg.seed``. The entropy is kept nowhere but in the fine-tuning
checkpoint (as generator states), which is private and deleted when the stage finishes.

Randomness the guarantee does not depend on (pretraining on public data, the samplers,
the evaluation) stays a function of ``cfg.seed``, so sampling stays reproducible. The
draws inside the DP-SGD loss (timesteps, diffusion noise, label dropout) are secret too:
they are consumed in batch order, so known values would depend on which other records
the secret Poisson mask picked, and one record more or less would then change every
example's gradient, not only its own.

``privacy.reproducible_noise=true`` derives the DP randomness from the seed instead. It
exists for tests that need bit-identical runs: such a run is NOT differentially private
against anyone who knows its config, and its ledger says so (``"noise_secret": false``).
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

# 128 bits: far beyond any search over seeds (torch generators take 64 of them).
ENTROPY_BITS = 128


def _purpose_word(purpose: str) -> int:
    # A stable 64-bit word per purpose (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:8], "little")


def dp_entropy(*, purpose: str, seed: int, reproducible: bool) -> int:
    """The entropy of one DP random stream (``purpose`` names it, e.g. ``"finetune/noise"``).

    Args:
        purpose: Which mechanism and stream the entropy is for; distinct purposes give
            independent streams.
        seed: ``cfg.seed``, used only when ``reproducible`` is true.
        reproducible: ``privacy.reproducible_noise``; true derives the entropy from the
            seed (tests only: NOT differentially private against anyone with the config).

    Returns:
        A non-negative integer of :data:`ENTROPY_BITS` bits.
    """
    if reproducible:
        words = np.random.SeedSequence([int(seed) % 2**64, _purpose_word(purpose)])
        state = words.generate_state(ENTROPY_BITS // 32, dtype=np.uint32)
        return int.from_bytes(state.tobytes(), "little")
    return secrets.randbits(ENTROPY_BITS)


def numpy_generator(entropy: int) -> np.random.Generator:
    """A NumPy generator seeded with all of ``entropy``."""
    return np.random.default_rng(np.random.SeedSequence(entropy))


def torch_generator(entropy: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with 64 bits mixed from all of ``entropy``."""
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    seed = int(state[0]) | (int(state[1]) << 32)
    return torch.Generator(device=device).manual_seed(seed)


# Randomness that the guarantee does not depend on: seeded streams, named like the DP ones,
# so two purposes (or two seeds) never share a stream the way additive offsets did.


def public_words(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    """The seed sequence of the public stream ``purpose`` at ``keys`` (e.g. the step)."""
    return np.random.SeedSequence([int(seed) % 2**64, _purpose_word(purpose), *map(int, keys)])


def public_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(public_words(seed, purpose, *keys))


def public_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    return _seeded_torch(public_words(seed, purpose, *keys))


def _seeded_torch(words: np.random.SeedSequence) -> torch.Generator:
    """A CPU torch generator seeded with 64 bits of ``words`` (the public streams' form)."""
    state = words.generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def step_generator(*, seed: int, step: int, process: int, micro: int) -> torch.Generator:
    """Pretraining's stream of one micro-batch (diffusion noise, label dropout).

    It predates the named streams above and keeps its form, so pretrained weights stay
    what they were; the seed sequence's length (four words) keeps it apart from them.
    """
    return _seeded_torch(np.random.SeedSequence([seed, step, process, micro]))

"""CLIP zero-shot semantic function for the query stage (``query.method=clip``), via open_clip.

PrivImage's semantic query needs, for every sensitive image, scores over the classes of the
PUBLIC dataset; the top-k of those scores feed the DP histogram. The default semantic function
is a classifier trained on the public set. This module is the training-free alternative: CLIP
zero-shot classification. Each public class name becomes a text prompt
(``"a photo of a {}."`` -> ``"a photo of a golden retriever."``), CLIP's text tower embeds the
prompts and its image tower embeds the sensitive images, and the score of class ``j`` for image
``i`` is ``logit_scale * cos(image_i, text_j)`` -- the same logits CLIP's own zero-shot
classifier uses, so their softmax/top-k is CLIP's prediction.

Weights come from a LOCAL file (``query.clip_weights``), never from a download. privimage runs
on machines without network, and a run must be reproducible from its config: a pretrained
*tag* (``pretrained="openai"``) would make open_clip fetch whatever the hub serves at that
moment. So open_clip only builds the architecture named by ``query.clip_model`` from its
built-in config, and the state dict is read from the given path. The text tokenizer must be
offline too: open_clip's ``SimpleTokenizer`` ships its BPE vocabulary inside the package, while
models that use a Hugging Face tokenizer (SigLIP, CLIPA, MetaCLIP-2 "worldwide", the
RoBERTa/XLM-R/mT5/NLLB text towers) would fetch it from the hub and are refused.

Preprocessing follows open_clip's evaluation transform for square images: bicubic resize to
the model's input size, values in [0, 1], then the model's mean/std. A model created without a
pretrained tag carries only open_clip's default (OpenAI) mean/std, so when every known
pretrained tag of the architecture agrees on other statistics (MobileCLIP, PE-Core, ...), those
are used instead; otherwise the OpenAI statistics.

A trap worth knowing: OpenAI's original weights (and the LAION-400M ones) were trained with
QuickGELU. Their state dicts have the same shapes as the GELU variant, so they load into e.g.
``ViT-B-32`` without error but score worse; use ``ViT-B-32-quickgelu`` for them.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from privimage.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ClipScorer", "load_clip"]

_MODEL_KEY = "query.clip_model"
_WEIGHTS_KEY = "query.clip_weights"
_PROMPT_KEY = "query.clip_prompt"

# Examples in messages: architectures whose tokenizer and tower code work offline.
_OFFLINE_EXAMPLES = "ViT-B-32, ViT-B-16, ViT-L-14"


def load_clip(
    model_name: str, weights: str | os.PathLike | None, *, device: torch.device
) -> ClipScorer:
    """Build open_clip architecture ``model_name`` and load the local state dict ``weights``.

    Args:
        model_name: An open_clip built-in architecture (``open_clip.list_models()``), e.g.
            ``"ViT-B-32"``; ``"ViT-B/32"`` is accepted as well.
        weights: Path to the model's state dict (``open_clip_pytorch_model.bin``, ``.pt``,
            ``.pth`` or ``.safetensors``). Nothing is ever downloaded.
        device: Where the model runs.

    Raises:
        ConfigError: one line naming ``query.clip_weights`` or ``query.clip_model`` when the
            weights are missing, unreadable or do not fit the architecture, or the
            architecture is unknown or cannot run offline.
    """
    if weights is None:
        raise ConfigError(
            f"query.method=clip needs {_WEIGHTS_KEY}, a local open_clip weights file for "
            f"{_MODEL_KEY}={model_name} (nothing is downloaded); e.g. on a machine with network "
            f"save open_clip_pytorch_model.bin from the hub repo "
            f"laion/CLIP-ViT-B-32-laion2B-s34B-b79K (for {_MODEL_KEY}=ViT-B-32), copy it here "
            f"and set {_WEIGHTS_KEY}=/path/to/open_clip_pytorch_model.bin"
        )
    name = _check_model_name(model_name)
    path = _check_weights_path(weights, name)

    # pretrained=None: build from the built-in config only (no tag lookup, no download).
    # pretrained_text/pretrained_image=False: towers from timm / HF must not fetch their own
    # base weights either; everything comes from `path` below.
    with _quiet_random_init_warning():
        model = open_clip.create_model(
            name,
            pretrained=None,
            pretrained_text=False,
            pretrained_image=False,
            device=device,
        )
    try:
        # open_clip's loader: reads .bin/.pt (weights_only) and .safetensors, strips a DDP
        # "module." prefix, converts third-party layouts and interpolates position embeddings,
        # then load_state_dict(strict=True).
        with warnings.catch_warnings():
            # torch's note on OpenAI's TorchScript .pt files; the ConfigError below says more.
            warnings.filterwarnings("ignore", "'torch.load' received a zip file", UserWarning)
            open_clip.load_checkpoint(model, str(path), strict=True, device="cpu")
    except RuntimeError as e:
        if "Error(s) in loading state_dict" in str(e):
            raise ConfigError(_mismatch_message(model, path, name)) from None
        raise ConfigError(_unreadable_message(path, name, e)) from None
    except Exception as e:  # unpickling, safetensors header, zip errors: not a state dict
        raise ConfigError(_unreadable_message(path, name, e)) from None

    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    mean, std = _normalisation_stats(model, name)
    size = open_clip.get_model_preprocess_cfg(model).get("size", model.visual.image_size)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    log.info("CLIP %s loaded from %s (input %dx%d)", name, path, height, width)
    return ClipScorer(
        model, tokenizer, name=name, image_size=(height, width), mean=mean, std=std, device=device
    )


class ClipScorer:
    """A loaded CLIP model that scores images against class-name prompts (zero-shot)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        name: str,
        image_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = name
        self.device = torch.device(device)
        self._size = image_size
        # Square for every open_clip CLIP architecture; the int is what callers need.
        self.image_size: int = image_size[0]
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] ``(N, C, H, W)`` images -> the model's normalised ``(N, 3, S, S)`` input."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            # CLIP only knows RGB; grey is R = G = B.
            x = x.expand(-1, 3, -1, -1)
        x = (x + 1.0) / 2.0
        if tuple(x.shape[-2:]) != self._size:
            x = F.interpolate(
                x, size=self._size, mode="bicubic", align_corners=False, antialias=True
            )
            # open_clip's own transform resizes uint8 PIL images, so its bicubic overshoot is
            # clipped to [0, 255]; clamp to match rather than feed out-of-range ringing.
            x = x.clamp(0.0, 1.0)
        return (x - self._mean) / self._std

    @torch.no_grad()  # not inference_mode: callers may modify the returned tensor in place
    def text_embeddings(self, texts: list[str], *, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings ``(len(texts), D)`` on the model's device."""
        chunks = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(N, D)`` of one batch of [-1, 1] images."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    @torch.no_grad()
    def class_logits(
        self,
        images: torch.Tensor,
        class_names: list[str],
        *,
        prompt: str = "a photo of a {}.",
        batch_size: int = 256,
        progress: bool = True,
    ) -> torch.Tensor:
        """Zero-shot logits of ``images`` over ``class_names``.

        Args:
            images: float ``(N, C, H, W)`` in [-1, 1] with ``C`` 1 or 3 and ``H == W``
                (privimage's ``ImageSplit.as_float()``); may live on any device.
            class_names: Human-readable public class names, e.g. ``"golden retriever"``.
            prompt: Template with one ``{}`` for the class name (``query.clip_prompt``).
            batch_size: Images (and prompts) per forward pass.
            progress: Show a tqdm bar ("CLIP query").

        Returns:
            float32 ``(N, len(class_names))`` on the CPU: ``logit_scale * cos(image, prompt)``.
        """
        texts = _prompts(prompt, class_names)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be square, got {tuple(images.shape[-2:])}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")

        self.model.eval()
        text = self.text_embeddings(texts, batch_size=batch_size)
        scale = self.model.logit_scale.exp().float()
        out = torch.empty(len(images), len(texts), dtype=torch.float32)
        with tqdm(total=len(images), desc="CLIP query", unit="img", disable=not progress) as bar:
            for i in range(0, len(images), batch_size):
                batch = images[i : i + batch_size]
                out[i : i + len(batch)] = (scale * self.image_embeddings(batch) @ text.T).cpu()
                bar.update(len(batch))
        return out


def _prompts(prompt: str, class_names: list[str]) -> list[str]:
    if not class_names:
        raise ValueError("class_names is empty")
    if "{}" not in prompt:
        raise ConfigError(
            f"{_PROMPT_KEY}={prompt!r} has no {{}} for the class name; "
            f'e.g. set {_PROMPT_KEY}="a photo of a {{}}."'
        )
    try:
        return [prompt.format(name) for name in class_names]
    except (IndexError, KeyError, ValueError):
        # e.g. "{0} {1}" or "{name}": str.format wants more than the one class name.
        raise ConfigError(
            f"{_PROMPT_KEY}={prompt!r} must contain exactly one {{}} and no other braces "
            f'(write {{{{ }}}} for literal ones); e.g. "a photo of a {{}}."'
        ) from None


def _check_model_name(model_name: str) -> str:
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"{_MODEL_KEY}={model_name} is an open_clip hub/folder reference, which privimage "
            f"does not load; set {_MODEL_KEY} to the architecture name (e.g. ViT-B-32) and "
            f"{_WEIGHTS_KEY} to the weights file"
        )
    # open_clip's create_model accepts OpenAI-style "ViT-B/32"; the registry says "ViT-B-32".
    name = model_name.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"e.g. {_OFFLINE_EXAMPLES}"
        raise ConfigError(
            f"{_MODEL_KEY}={model_name} is not an open_clip architecture; {hint} "
            f"(all: open_clip.list_models())"
        )
    text_cfg = cfg.get("text_cfg", {})
    # Same test get_tokenizer applies: an hf_tokenizer_name (or a SigLIP name) means a
    # Hugging Face tokenizer fetched from the hub; an hf_model_name text tower fetches its
    # config from the hub even without weights.
    if (
        text_cfg.get("hf_tokenizer_name")
        or text_cfg.get("hf_model_name")
        or "siglip" in (name.lower())
    ):
        raise ConfigError(
            f"{_MODEL_KEY}={model_name} needs a Hugging Face tokenizer/text model from the hub, "
            f"which privimage never contacts; choose an architecture with open_clip's built-in "
            f"CLIP tokenizer, e.g. {_OFFLINE_EXAMPLES}"
        )
    return name


def _check_weights_path(weights: str | os.PathLike, name: str) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"{_WEIGHTS_KEY}={weights} is a directory; set it to the weights file inside, "
            f"e.g. {path / 'open_clip_pytorch_model.bin'}"
        )
    if not path.is_file():
        raise ConfigError(
            f"{_WEIGHTS_KEY}={weights} does not exist; set it to a local open_clip weights file "
            f"(.bin, .pt or .safetensors) for {_MODEL_KEY}={name}"
        )
    # Absolute, so no relative name can ever be mistaken for something else downstream.
    return path.resolve()


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "Model initialized randomly" warning: the weights load right after."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")

    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _normalisation_stats(model, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for ``name``: the pretrained tags' when they all agree, else the model's."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    default = (
        tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )
    # The tag table is static package data (no network). We do not know which tag the local
    # file came from, but for most architectures every tag shares one mean/std.
    stats = set()
    for tag in open_clip.list_pretrained_tags_by_model(name):
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        stats.add(
            (
                tuple(tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                tuple(tag_cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            )
        )
    if len(stats) == 1:
        return stats.pop()
    if len(stats) > 1:
        log.warning(
            "%s's pretrained tags use different normalisations; using mean=%s std=%s",
            name,
            default[0],
            default[1],
        )
    return default


def _unreadable_message(path: Path, name: str, err: Exception) -> str:
    detail = " ".join(str(err).split())
    if "TorchScript" in detail:
        return (
            f"{_WEIGHTS_KEY}={path} is a TorchScript archive (OpenAI's original CLIP .pt), "
            f"which privimage does not execute; use the open_clip state dict of the same weights "
            f"(open_clip_pytorch_model.bin, e.g. hub repo timm/vit_base_patch32_clip_224.openai "
            f"with {_MODEL_KEY}=ViT-B-32-quickgelu)"
        )
    return (
        f"{_WEIGHTS_KEY}={path} could not be read as a state dict ({type(err).__name__}: "
        f"{detail[:160]}); give an open_clip weights file (.bin, .pt or .safetensors) for "
        f"{_MODEL_KEY}={name}"
    )


def _mismatch_message(model: torch.nn.Module, path: Path, name: str) -> str:
    """One line saying how the file differs from ``name`` and which built-ins it looks like."""
    try:
        # Only on this error path: read the file again to describe the difference (the
        # reader load_checkpoint uses; not re-exported at open_clip's top level).
        from open_clip.factory import load_state_dict

        state = load_state_dict(str(path), device="cpu")
    except Exception:
        state = {}
    diff = ""
    if state:
        expected = model.state_dict()
        counts = {
            "missing": sum(k not in state for k in expected),
            "unexpected": sum(k not in expected for k in state),
            "misshapen": sum(
                k in expected and tuple(v.shape) != tuple(expected[k].shape)
                for k, v in state.items()
            ),
        }
        parts = [f"{n} {what}" for what, n in counts.items() if n]
        diff = f" ({', '.join(parts)} tensors)" if parts else ""
    looks = _guess_architectures(state, exclude=name)
    hint = f"they look like {' or '.join(looks)}; " if looks else ""
    return (
        f"{_WEIGHTS_KEY}={path} does not fit {_MODEL_KEY}={name}{diff}; {hint}"
        f"set {_MODEL_KEY} to the architecture the weights were trained as"
    )


def _guess_architectures(state: dict, *, exclude: str, limit: int = 4) -> list[str]:
    """Built-in plain-ViT CLIP configs whose shapes match a state dict (best effort)."""
    try:
        conv = state["visual.conv1.weight"]  # (width, 3, patch, patch)
        n_pos = state["visual.positional_embedding"].shape[0]
        embed_dim = state["text_projection"].shape[1]
        text_width = state["token_embedding.weight"].shape[1]
    except (KeyError, IndexError, AttributeError):
        return []

    def depth(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return 1 + max((int(m.group(1)) for k in state if (m := pat.match(k))), default=-1)

    vision_layers = depth("visual.transformer.resblocks.")
    text_layers = depth("transformer.resblocks.")
    patch = conv.shape[-1]
    # Position embeddings cover the patch grid plus (usually) one class token.
    grid = math.isqrt(n_pos - 1) if math.isqrt(n_pos - 1) ** 2 == n_pos - 1 else math.isqrt(n_pos)
    found = []
    for cand in open_clip.list_models():
        cfg = open_clip.get_model_config(cand)
        v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if cand == exclude or "timm_model_name" in v or "hf_model_name" in t:
            continue
        size = v.get("image_size")
        if (
            v.get("width") == conv.shape[0]
            and v.get("patch_size") == patch
            and v.get("layers") == vision_layers
            and (size if isinstance(size, int) else None) == grid * patch
            and cfg.get("embed_dim") == embed_dim
            and t.get("width") == text_width
            and t.get("layers") == text_layers
        ):
            found.append(cand)
    return found[:limit]

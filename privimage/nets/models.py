"""Model builders: the class-conditional diffusion UNet and the small classifiers.

Everything that is trained with DP (the UNet) uses GroupNorm only: BatchNorm mixes
examples within a batch, which breaks per-example clipping and so the DP guarantee.
Classifiers trained on public or synthetic data only may use BatchNorm.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import nn
from torch.optim.swa_utils import AveragedModel

from privimage.config.schema import DiffusionConfig, ModelConfig
from privimage.errors import ConfigError
from privimage.io.atomic import drop_json_keys

DIFFUSION_FILE = "diffusion.json"


def build_unet(
    cfg: ModelConfig, *, resolution: int, channels: int, num_classes: int
) -> UNet2DModel:
    """Build the class-conditional UNet.

    One extra class embedding (index ``num_classes``) is reserved as the null class for
    classifier-free guidance, so checkpoints keep their shape when guidance is added.
    """
    levels = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg.attention:
        # Attention at the lowest resolution only, where it is cheap.
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=num_classes + 1,
        add_attention=cfg.attention,
        dropout=cfg.dropout,
    )


def save_unet(model: UNet2DModel, path: Path, *, diffusion: DiffusionConfig) -> None:
    """``save_pretrained`` plus ``diffusion.json``: what the network's output means.

    The folder loads in any diffusers code with ``UNet2DModel.from_pretrained(path)``;
    ``diffusion.json`` tells how to precondition and sample it (EDM or DDPM).
    """
    path = Path(path)
    model.save_pretrained(path)
    # diffusers keeps the folder a model was loaded from as ``_name_or_path`` and writes
    # it back: a path on the data owner's machine that a released model must not carry.
    drop_json_keys(path / "config.json", "_name_or_path")
    (path / DIFFUSION_FILE).write_text(json.dumps(asdict(diffusion), indent=2) + "\n")


def weight_files(path: Path) -> list[Path]:
    """The weight files of a folder written by :func:`save_unet` (safetensors, else .bin)."""
    path = Path(path)
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


def load_unet(path: Path) -> tuple[UNet2DModel, DiffusionConfig]:
    """Load a UNet saved by :func:`save_unet` and its diffusion formulation.

    A folder without ``diffusion.json`` (a ``UNet2DModel`` saved by other diffusers code)
    is read as DDPM epsilon prediction, the diffusers convention.
    """
    path = Path(path)
    model = UNet2DModel.from_pretrained(path)
    spec_file = path / DIFFUSION_FILE
    if not spec_file.exists():
        return model, DiffusionConfig(formulation="ddpm")
    saved = json.loads(spec_file.read_text())
    known = {f.name for f in fields(DiffusionConfig)}
    return model, DiffusionConfig(**{k: v for k, v in saved.items() if k in known})


def check_same_diffusion(saved: DiffusionConfig, wanted: DiffusionConfig, where: Path) -> None:
    """Refuse to continue or sample a UNet under another formulation than it was trained with."""
    if asdict(saved) != asdict(wanted):
        diff = ", ".join(
            f"diffusion.{k}={v} (run has {getattr(wanted, k)})"
            for k, v in asdict(saved).items()
            if getattr(wanted, k) != v
        )
        raise ConfigError(
            f"{where} was trained with {diff}; use the same diffusion settings "
            "(e.g. diffusion=ddpm) or retrain that stage"
        )


class SmallCNN(nn.Module):
    """A compact VGG-style classifier for 8-64 px images.

    Used as the semantic query function (trained on public data), as the downstream
    classifier (trained on synthetic data) and as the evaluation's real-data reference.
    None of these is trained with DP (the reference is a measurement for the data owner,
    never released), so BatchNorm is allowed and speeds up convergence.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def ema_decay_at(updates: int, decay: float) -> float:
    """EMA decay with warm-up after ``updates`` earlier updates: min(decay, (1 + n) / (10 + n)).

    Short runs (a few hundred steps, as on a CPU) would otherwise save weights that are
    still mostly the random initialisation: 0.999^184 = 0.83. diffusers' ``EMAModel``
    warms up the same way.
    """
    return min(decay, (1 + updates) / (10 + updates))


class EMA(AveragedModel):
    """The exponential moving average of a model's weights, for sampling and saving.

    torch's ``AveragedModel`` (``.module`` is the averaged copy, ``update_parameters``
    takes a step) with the warm-up of :func:`ema_decay_at`: the first update copies the
    weights, update n + 1 keeps ``ema_decay_at(n)`` of the average. What is ours is only
    that schedule (torch's ``get_ema_multi_avg_fn`` has a fixed decay) and reading the
    checkpoints written before the EMA was an ``AveragedModel``.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        def average(ema: list, current: list, n_averaged: torch.Tensor) -> None:
            torch._foreach_lerp_(ema, current, 1.0 - ema_decay_at(int(n_averaged), decay))

        super().__init__(model, multi_avg_fn=average)
        self.requires_grad_(False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Checkpoints from before hold the averaged module's own weights; their count of
        # updates is the training step, which the caller sets (see ``resume``).
        if "n_averaged" not in state_dict:
            state_dict = {f"module.{k}": v for k, v in state_dict.items()}
            state_dict["n_averaged"] = torch.tensor(0, dtype=torch.long)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def resume(self, state_dict: dict | None, *, updates: int) -> None:
        """Load a checkpoint's average (if given) taken over ``updates`` optimizer steps."""
        if state_dict is not None:
            self.load_state_dict(state_dict)
        self.n_averaged.fill_(int(updates))


def _contiguous_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def make_opacus_safe(model: nn.Module) -> nn.Module:
    """Make every conv/linear layer see contiguous inputs.

    diffusers' attention blocks hand channels_last tensors to the next convolution, and
    Opacus' hook-based per-sample gradients for conv layers silently come out as zeros for
    such inputs. A forward pre-hook runs before Opacus' forward hook captures the
    activation, so making the input contiguous here fixes what Opacus records without
    touching installed packages. Idempotent.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not getattr(m, "_privimage_contig", False):
            m.register_forward_pre_hook(_contiguous_inputs)
            m._privimage_contig = True
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016, Sec. 4.2): 3x3 stem, three stages of basic
    blocks at widths ``w, 2w, 4w`` (stride 2 between stages), global average pooling.

    The shape PrivImage uses for its semantic query function on ImageNet32; here it is
    trained on public data (the query), synthetic data (downstream), or, as the bnstat
    teacher, on sensitive data without DP, where its BatchNorm statistics are the point.
    It is never trained with DP, so BatchNorm is fine.
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, width: int = 32, blocks_per_stage: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(cin, cout, stride))
                cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x)))


CLASSIFIER_ARCHS = ("resnet", "cnn")


def build_classifier(arch: str, *, in_channels: int, num_classes: int, width: int) -> nn.Module:
    """``"resnet"`` (:class:`ResNet`, one block per stage) or ``"cnn"`` (:class:`SmallCNN`)."""
    if arch == "resnet":
        return ResNet(in_channels=in_channels, num_classes=num_classes, width=width)
    if arch == "cnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
    raise ValueError(f"unknown classifier arch {arch!r}; choose one of {CLASSIFIER_ARCHS}")

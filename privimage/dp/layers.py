"""Per-example gradient norms and clipped sums of single layers, from activations alone.

Pure functions of a layer's input activation ``a`` and the gradient ``g`` of the loss
with respect to its output, both with ``N = B * K`` rows, where the K rows of example i
are rows ``i*K .. i*K + K-1`` (noise multiplicity: K diffusion-noise draws of one image).
An *example's* gradient is the sum over its K rows and over all positions of the row
gradients, so every norm here is the norm of that sum, never K row norms.

Two ways to get an example's squared gradient norm (Bu et al. 2022, mixed ghost clipping):

* **instantiate**: form each example's weight gradient ``g_i^T a_i`` (a batched matmul
  with the FLOPs of one ordinary weight gradient) and take its norm;
* **ghost**: ``||g_i^T a_i||^2 = <a_i a_i^T, g_i g_i^T>`` over the ``K*T`` positions
  of the example, which never forms the ``d_out x d_in`` gradient and is cheaper when
  there are few positions (time embeddings, attention at 7x7).

:func:`plan_layer` picks the cheaper one per layer from the shapes. The clipped sum
``sum_i w_i g_i^T a_i`` is then either a weighted sum of the instantiated gradients, or
one ordinary weight-gradient computation with each row's output gradient scaled by its
example's weight (book-keeping, Bu et al. 2023): no second backward pass through the
network in either case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from privimage.errors import ConfigError

# Layers whose parameters these functions cover; anything else with trainable
# parameters is refused by the book-keeping wrapper.
SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)


def check_noise_multiplicity(noise_multiplicity: int) -> int:
    """K as an int, or a one-line error unless K >= 1."""
    if noise_multiplicity < 1:
        raise ConfigError(f"finetune.noise_multiplicity={noise_multiplicity} must be >= 1")
    return int(noise_multiplicity)


def examples_in(rows: int, noise_multiplicity: int) -> int:
    """How many examples ``rows`` batch rows hold, K consecutive rows each: the one layout
    both DP-SGD engines (Opacus hooks and book-keeping) read."""
    if rows % noise_multiplicity:
        raise RuntimeError(
            f"{rows} batch rows are not a multiple of noise_multiplicity={noise_multiplicity}"
            "; feed batches through privimage.dp.dpsgd.repeat_for_noise_draws"
        )
    return rows // noise_multiplicity


# Per-example gradients are kept (rather than recomputing a weighted weight gradient)
# while they take at most this many times the memory of the layer's activation and output
# gradient. The stored gradients grow while the backward pass frees activations, so on
# the UNet presets the peak stays that of the forward pass (bench/dp_step.py measures it).
KEEP_GRADS_FACTOR = 8.0


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's norms and clipped sum are computed.

    ``norm``: ``"instantiate"`` or ``"ghost"`` (see module docstring).
    ``keep``: ``"grads"`` keeps the per-example gradients until the clipping weights are
    known (no recomputation, memory ``B * params``); ``"inputs"`` keeps the activation
    and output gradient and recomputes one weighted weight gradient (memory of the two
    tensors, FLOPs of one weight gradient).
    """

    norm: str
    keep: str
    positions: int  # K * T: positions of one example (rows x spatial or sequence)


def _matrix_shapes(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[int, int, int]:
    """(d_in, d_out, positions per row) of a Linear or Conv2d seen as a matmul."""
    if isinstance(module, nn.Conv2d):
        d_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return d_in, module.out_channels, g.shape[2] * g.shape[3]
    rows = a.shape[0]
    return module.in_features, module.out_features, a.numel() // (rows * module.in_features)


def plan_layer(module: nn.Module, a: torch.Tensor, g: torch.Tensor, *, examples: int) -> LayerPlan:
    """The norm method for a Linear or Conv2d, and what to keep for the clipped sum.

    Costs are multiply-adds for the batch: instantiating is ``B * d_out * d_in * KT``,
    ghost is ``B * (KT)^2 * (d_in + d_out)``. Instantiated per-example gradients that are
    kept make the clipped sum a cheap weighted sum, while a ghost norm still needs one
    weighted weight-gradient afterwards (the FLOPs of instantiating): so whenever the
    per-example gradients fit (at most :data:`KEEP_GRADS_FACTOR` times the memory of the
    activation and output gradient that recomputation would keep instead), they are
    instantiated and kept; otherwise the cheaper norm is taken and the sum recomputed.
    """
    d_in, d_out, t = _matrix_shapes(module, a, g)
    positions = (a.shape[0] // examples) * t
    inst = float(examples) * d_out * d_in * positions
    ghost = float(examples) * positions**2 * (d_in + d_out)
    grads_memory = examples * d_out * d_in
    if grads_memory <= KEEP_GRADS_FACTOR * (a.numel() + g.numel()):
        norm, keep = "instantiate", "grads"
    else:
        norm, keep = ("ghost" if ghost < inst else "instantiate"), "inputs"
    return LayerPlan(norm=norm, keep=keep, positions=positions)


def check_supported(module: nn.Module) -> None:
    """Refuse layer settings whose gradients these functions do not reproduce."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ConfigError(
                f"book-keeping clipping supports Conv2d with groups=1, zero padding and "
                f"numeric padding; {module} has groups={module.groups}, padding_mode="
                f"{module.padding_mode!r}, padding={module.padding!r}; use "
                "finetune.grad_sample_mode=hooks"
            )
    elif isinstance(module, nn.Embedding) and (
        module.sparse or module.scale_grad_by_freq or module.max_norm is not None
    ):
        raise ConfigError(
            f"book-keeping clipping supports dense Embedding without max_norm or "
            f"scale_grad_by_freq, not {module}; use finetune.grad_sample_mode=hooks"
        )


# ---- Linear -------------------------------------------------------------------------


def _linear_mats(a: torch.Tensor, g: torch.Tensor, examples: int):
    """(B, K*T, d_in) and (B, K*T, d_out): an example's positions side by side."""
    return a.reshape(examples, -1, a.shape[-1]), g.reshape(examples, -1, g.shape[-1])


def linear_grads(module: nn.Linear, a, g, *, examples: int) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{"weight": (B, d_out, d_in), "bias": (B, d_out)}``."""
    a, g = _linear_mats(a, g, examples)
    out = {"weight": torch.bmm(g.transpose(1, 2), a)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def linear_ghost_norm2(module: nn.Linear, a, g, *, examples: int) -> torch.Tensor:
    """Squared per-example gradient norm (weight and bias) without forming the gradients."""
    a, g = _linear_mats(a, g, examples)
    if a.shape[1] == 1:
        # One position: the outer product's norm is the product of the norms.
        norm2 = a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    else:
        norm2 = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    if module.bias is not None:
        norm2 = norm2 + g.sum(1).pow(2).sum(1)
    return norm2


def linear_weighted_sum(module: nn.Linear, a, g, row_weights) -> dict[str, torch.Tensor]:
    """``sum_r w_r g_r^T a_r``: the weight gradient with each row's output gradient scaled."""
    d_in, d_out = a.shape[-1], g.shape[-1]
    gw = (g.reshape(g.shape[0], -1, d_out) * row_weights[:, None, None]).reshape(-1, d_out)
    out = {"weight": gw.t() @ a.reshape(-1, d_in)}
    if module.bias is not None:
        out["bias"] = gw.sum(0)
    return out


# ---- Conv2d -------------------------------------------------------------------------


def _conv_mats(module: nn.Conv2d, a, g, examples: int):
    """Unfolded input (B, K, d_in, T) and output gradient (B, K, d_out, T)."""
    cols = F.unfold(
        a,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )
    rows = a.shape[0]
    k = rows // examples
    return (
        cols.reshape(examples, k, cols.shape[1], cols.shape[2]),
        g.reshape(examples, k, g.shape[1], -1),
    )


def _conv_grads_grouped(module: nn.Conv2d, a, g, examples: int) -> torch.Tensor:
    """One grouped convolution weight-gradient with a group per example: the batch is
    laid out as channels (``B * C_in``), each example's K rows become the convolution's
    batch, over which the weight gradient sums. Any stride, padding or dilation."""
    rows, c_in, h, w = a.shape
    k = rows // examples
    c_out, h_out, w_out = g.shape[1:]
    a_grouped = a.reshape(examples, k, c_in, h, w).transpose(0, 1)
    a_grouped = a_grouped.reshape(k, examples * c_in, h, w)
    g_grouped = g.reshape(examples, k, c_out, h_out, w_out).transpose(0, 1)
    g_grouped = g_grouped.reshape(k, examples * c_out, h_out, w_out)
    weight = torch.nn.grad.conv2d_weight(
        a_grouped,
        (examples * c_out, c_in, *module.kernel_size),
        g_grouped,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=examples,
    )
    return weight.reshape(examples, *module.weight.shape)


def conv2d_grads(module: nn.Conv2d, a, g, *, examples: int) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{"weight": (B, *weight.shape), "bias": (B, d_out)}``.

    On CPUs the grouped weight-gradient is the fastest of the forms tried (unfold +
    batched matmul, one batched matmul per kernel offset over shifted views of the padded
    input), though still slower than the ordinary weight gradient at 8x8 and 16x16;
    ``bench/dp_step.py --per-layer`` shows its share of a step.
    """
    out = {"weight": _conv_grads_grouped(module, a, g, examples)}
    if module.bias is not None:
        out["bias"] = g.sum((2, 3)).reshape(examples, -1, g.shape[1]).sum(1)
    return out


def conv2d_ghost_norm2(module: nn.Conv2d, a, g, *, examples: int) -> torch.Tensor:
    """Squared per-example gradient norm via the (K*T)x(K*T) Gram matrices."""
    cols, gm = _conv_mats(module, a, g, examples)
    b, k, d_in, t = cols.shape
    cols = cols.transpose(2, 3).reshape(b, k * t, d_in)
    gm_t = gm.transpose(2, 3).reshape(b, k * t, gm.shape[2])
    norm2 = (torch.bmm(cols, cols.transpose(1, 2)) * torch.bmm(gm_t, gm_t.transpose(1, 2))).sum(
        (1, 2)
    )
    if module.bias is not None:
        norm2 = norm2 + gm.sum((1, 3)).pow(2).sum(1)
    return norm2


def conv2d_weighted_sum(module: nn.Conv2d, a, g, row_weights) -> dict[str, torch.Tensor]:
    """One ordinary convolution weight gradient, each row's output gradient scaled."""
    gw = g * row_weights[:, None, None, None]
    out = {
        "weight": torch.nn.grad.conv2d_weight(
            a,
            module.weight.shape,
            gw,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
        )
    }
    if module.bias is not None:
        out["bias"] = gw.sum((0, 2, 3))
    return out


# ---- GroupNorm ----------------------------------------------------------------------


def group_norm_grads(module: nn.GroupNorm, a, g, *, examples: int) -> dict[str, torch.Tensor]:
    """Per-example affine gradients, (B, C) each: cheap enough to always instantiate.

    The normalised activation is recomputed (one fused kernel; on CPUs faster than
    gathering the group statistics separately).
    """
    dims = tuple(range(2, a.dim()))
    k = a.shape[0] // examples
    out = {}
    if module.weight is not None:
        normalized = F.group_norm(a, module.num_groups, eps=module.eps)
        out["weight"] = (g * normalized).sum(dims).reshape(examples, k, -1).sum(1)
    if module.bias is not None:
        out["bias"] = g.sum(dims).reshape(examples, k, -1).sum(1)
    return out


# ---- Embedding ----------------------------------------------------------------------


def embedding_norm2(module: nn.Embedding, idx, g, *, examples: int) -> torch.Tensor:
    """Squared norm of each example's embedding gradient: rows with the same index add up.

    ``idx`` holds one index per row (class labels); the rows of one example may use
    different indices (e.g. label dropout drawn per row), so the norm is
    ``sum_{j,l} [idx_j == idx_l] <g_j, g_l>`` over the example's K rows.
    """
    idx = idx.reshape(examples, -1)
    gm = g.reshape(examples, idx.shape[1], -1)
    if module.padding_idx is not None:
        gm = gm * (idx != module.padding_idx)[..., None]
    same = (idx[:, :, None] == idx[:, None, :]).to(gm.dtype)
    return (same * torch.bmm(gm, gm.transpose(1, 2))).sum((1, 2))


def embedding_weighted_sum(module: nn.Embedding, idx, g, row_weights) -> dict[str, torch.Tensor]:
    """The embedding gradient with each row's output gradient scaled by its weight."""
    idx = idx.reshape(-1)
    gw = g.reshape(idx.shape[0], -1) * row_weights[:, None]
    if module.padding_idx is not None:
        gw = gw * (idx != module.padding_idx)[:, None]
    weight = torch.zeros_like(module.weight).index_add_(0, idx, gw.to(module.weight.dtype))
    return {"weight": weight}

"""Book-keeping DP-SGD: exact clipped per-example gradient sums in one backward pass.

Opacus' hook path materialises one gradient per row (``B*K`` copies of every parameter)
and lets autograd compute the ordinary, unclipped weight gradients as well, which are
thrown away. :class:`BookKeeping` instead (Bu et al. 2023, "book-keeping"; with the
per-layer choice of Bu et al. 2022, "mixed ghost clipping"):

1. runs the forward pass with the parameters' ``requires_grad`` switched off, so the
   backward pass computes only the gradients that flow between layers, never the
   weight gradients; a forward hook keeps each layer's input and makes its output part
   of the graph;
2. during that one backward pass, as each layer's output gradient arrives, computes each
   example's squared gradient norm for that layer (:mod:`privimage.dp.layers`: ghost
   norm or instantiated per-example gradients, whichever is cheaper for its shapes), and
   keeps either the per-example gradients or the layer's input and output gradient;
3. when the backward pass ends (an autograd-engine callback), forms every example's
   clipping weight ``min(1, C / (||g_i|| + 1e-6))`` (Opacus' formula) from its total norm
   over all layers, and writes the clipped sum ``sum_i w_i g_i`` to ``p.grad``.

Opacus' fast-gradient-clipping optimizer (:class:`BookKeepingDPOptimizer`, a subclass of
its ``DPOptimizerFastGradientClipping``) then adds the Gaussian noise to that sum, scales
it and steps; its accountant hook counts the step. Nothing of Opacus is copied or patched.

Noise multiplicity: the K rows of example i (rows ``i*K .. i*K+K-1``) form one example;
its gradient is the gradient of its K-averaged loss, and that one gradient is clipped.
Every trainable parameter must belong to a supported layer (Conv2d, Linear, GroupNorm,
Embedding); anything else is refused when the wrapper is built.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus.optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizerFastGradientClipping,
)
from torch import nn

from privimage.dp import layers as L
from privimage.errors import ConfigError, PrivImageError

# Opacus' clipping formula (DPOptimizer and its fast-gradient-clipping module), so both
# paths clip identically.
_EPS = 1e-6


@dataclass
class _Layer:
    """One layer with trainable parameters and what its backward pass left behind."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    plan: L.LayerPlan | None = None
    activation: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] | None = None

    def clear(self) -> None:
        self.activation = self.output_grad = self.grads = None


class BookKeeping(nn.Module):
    """Wraps a model so that ``loss.backward()`` leaves the clipped per-example sum in ``p.grad``.

    Args:
        module: The model (no BatchNorm; every trainable parameter in a supported layer).
        max_grad_norm: Clipping norm C of one example's whole gradient.
        noise_multiplicity: K: consecutive rows per example.
        loss_reduction: ``"mean"`` if the loss is the mean over the ``B*K`` rows (then
            each example's gradient is that of its K-averaged loss), ``"sum"`` if it is the
            sum of the row losses (divided by K here for the same per-example gradient).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        max_grad_norm: float,
        noise_multiplicity: int = 1,
        loss_reduction: str = "mean",
    ) -> None:
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'")
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplicity = L.check_noise_multiplicity(noise_multiplicity)
        self.loss_reduction = loss_reduction
        self._layers: list[_Layer] = []
        covered: set[int] = set()
        for name, m in module.named_modules():
            params = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
            if not params:
                continue
            if not isinstance(m, L.SUPPORTED):
                raise ConfigError(
                    f"book-keeping clipping has no per-example norm for {name} "
                    f"({type(m).__name__}); use finetune.grad_sample_mode=hooks"
                )
            L.check_supported(m)
            layer = _Layer(name=name, module=m, params=params)
            self._layers.append(layer)
            covered.update(id(p) for p in params.values())
            m.register_forward_hook(self._make_forward_hook(layer))
        missing = [
            n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered
        ]
        if missing:  # a parameter shared by two modules, or registered oddly
            raise ConfigError(f"book-keeping clipping does not cover {missing}")
        self._capturing = False
        self._callback_queued = False
        self._examples = 0
        self._norm2: torch.Tensor | None = None
        # The per-example norms of the last backward pass: a debugging aid only (they are
        # computed from sensitive data without noise and must never be released).
        self.last_norms: torch.Tensor | None = None
        # Set to {} to record the seconds each layer's norm work and the final clipped sum
        # take (bench/dp_step.py --per-layer); None costs nothing.
        self.timings: dict[str, float] | None = None

    # ---- what the wrapper covers ----------------------------------------------------

    def covered_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter whose per-example gradient enters the norm, by qualified name."""
        for layer in self._layers:
            for n, p in layer.params.items():
                yield (f"{layer.name}.{n}" if layer.name else n), p

    def plans(self) -> dict[str, L.LayerPlan]:
        """Each layer's norm method and what it keeps, as chosen on the first backward pass."""
        return {layer.name: layer.plan for layer in self._layers if layer.plan is not None}

    # ---- forward ----------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        params = [p for layer in self._layers for p in layer.params.values()]
        for layer in self._layers:
            layer.clear()
        # A new pass: whatever a failed backward pass left behind is dropped.
        self._callback_queued = False
        self._norm2 = None
        self._capturing = True
        # Without requires_grad the backward pass skips every weight gradient; the hooks
        # below keep the graph alive through each layer's output instead.
        for p in params:
            p.requires_grad_(False)
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in params:
                p.requires_grad_(True)
            self._capturing = False

    def _make_forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not self._capturing:
                return None
            if layer.activation is not None:
                raise PrivImageError(
                    f"{layer.name} ran twice in one forward pass; book-keeping clipping "
                    "needs each layer once per pass (use finetune.grad_sample_mode=hooks)"
                )
            layer.activation = inputs[0].detach()
            if not output.requires_grad:
                # A layer whose inputs carry no gradient (the first convolution, the
                # embeddings): its output becomes a leaf of the graph so that its output
                # gradient is still computed.
                output.requires_grad_(True)
            output.register_hook(self._make_backward_hook(layer))
            return None

        return hook

    # ---- backward ---------------------------------------------------------------------

    def _make_backward_hook(self, layer: _Layer):
        def hook(grad: torch.Tensor) -> None:
            if self.timings is None:
                self._on_output_grad(layer, grad.detach())
                return
            with self._timed(layer.name, grad.device):
                self._on_output_grad(layer, grad.detach())

        return hook

    @contextlib.contextmanager
    def _timed(self, key: str, device: torch.device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def _on_output_grad(self, layer: _Layer, g: torch.Tensor) -> None:
        a = layer.activation
        b = L.examples_in(a.shape[0], self.noise_multiplicity)
        if not self._callback_queued:
            # Clipping weights need every layer's norm: finish once the pass is over.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
            self._examples = b
            self._norm2 = torch.zeros(b, device=g.device, dtype=torch.float32)
        m = layer.module
        if isinstance(m, nn.GroupNorm):
            layer.grads = L.group_norm_grads(m, a, g, examples=b)
            norm2 = sum(_row_norm2(v) for v in layer.grads.values())
            layer.activation = None
        elif isinstance(m, nn.Embedding):
            norm2 = L.embedding_norm2(m, a, g, examples=b)
            layer.output_grad = g
        else:
            if layer.plan is None:
                layer.plan = L.plan_layer(m, a, g, examples=b)
            conv = isinstance(m, nn.Conv2d)
            if layer.plan.norm == "ghost":
                ghost_fn = L.conv2d_ghost_norm2 if conv else L.linear_ghost_norm2
                norm2 = ghost_fn(m, a, g, examples=b)
            else:
                grads_fn = L.conv2d_grads if conv else L.linear_grads
                grads = grads_fn(m, a, g, examples=b)
                norm2 = sum(_row_norm2(v) for v in grads.values())
            # plan_layer keeps gradients only where it instantiates them.
            if layer.plan.keep == "grads":
                layer.grads = grads
                layer.activation = None
            else:
                layer.output_grad = g
        self._norm2 += norm2.float()

    def _scale(self) -> float:
        # Row gradients arrive scaled by the reduction: 1/(B*K) for a mean over rows. One
        # example's gradient (of its K-averaged loss) is the sum of its rows times this.
        if self.loss_reduction == "mean":
            return float(self._examples)
        return 1.0 / self.noise_multiplicity

    def _finish(self) -> None:
        if self.timings is None:
            self._finish_pass()
            return
        with self._timed("(clipped sum of all layers)", self._norm2.device):
            self._finish_pass()

    def _finish_pass(self) -> None:
        self._callback_queued = False
        scale = self._scale()
        norms = self._norm2.sqrt() * scale
        self.last_norms = norms
        weights = (self.max_grad_norm / (norms + _EPS)).clamp(max=1.0) * scale
        row_weights = weights.repeat_interleave(self.noise_multiplicity)
        for layer in self._layers:
            clipped = self._clipped_sum(layer, weights, row_weights)
            layer.clear()
            if clipped is None:
                continue  # the layer took no part in the loss
            for n, p in layer.params.items():
                value = clipped[n].to(p.dtype).reshape(p.shape)
                p.grad = value if p.grad is None else p.grad + value
        self._norm2 = None

    @staticmethod
    def _clipped_sum(layer: _Layer, weights, row_weights) -> dict[str, torch.Tensor] | None:
        m = layer.module
        if layer.grads is not None:  # per-example gradients kept: weigh and add them
            return {
                n: torch.tensordot(weights.to(v.dtype), v, dims=([0], [0]))
                for n, v in layer.grads.items()
            }
        if layer.output_grad is None:
            return None
        a, g = layer.activation, layer.output_grad
        rw = row_weights.to(g.dtype)
        if isinstance(m, nn.Conv2d):
            return L.conv2d_weighted_sum(m, a, g, rw)
        if isinstance(m, nn.Linear):
            return L.linear_weighted_sum(m, a, g, rw)
        return L.embedding_weighted_sum(m, a, g, rw)


def _row_norm2(v: torch.Tensor) -> torch.Tensor:
    """Squared norm of each example's slice (vector_norm: one fused pass, no temporary;
    several times faster on CPUs than pow-then-sum or an einsum)."""
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1, dtype=torch.float32).square()


class StepCounting:
    """Mixin for Opacus optimizers: counts the logical steps that were noised and applied
    (physical batches that only accumulate do not count)."""

    steps_taken = 0

    def pre_step(self, closure=None) -> bool:
        took = super().pre_step(closure)
        if took:
            self.steps_taken += 1
        return took


class _StepCounting(StepCounting):
    """Step counting, and the step of an empty Poisson batch (pure noise)."""

    def noise_only_step(self) -> None:
        """No example: the clipped sum is zero and the step adds only noise."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.step()


class BookKeepingDPOptimizer(_StepCounting, DPOptimizerFastGradientClipping):
    """Opacus' fast-gradient-clipping optimizer: ``p.grad`` already holds the clipped sum
    (written by :class:`BookKeeping`); it adds noise ``N(0, (sigma C)^2)``, divides by the
    expected batch size and steps."""


class DistributedBookKeepingDPOptimizer(_StepCounting, DistributedDPOptimizerFastGradientClipping):
    """The same over several processes: rank 0 adds the noise once for the whole logical
    batch, then the clipped, noised sums are all-reduced (Opacus' distributed optimizer)."""

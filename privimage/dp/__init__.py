"""Differential-privacy machinery that is not accounting: fast per-example clipping.

:mod:`privimage.dp.layers` holds the per-layer math (per-example gradient norms from
activations and output gradients, and clipped sums), :mod:`privimage.dp.bookkeeping` the
module wrapper that runs it inside one backward pass and hands Opacus' fast-gradient-
clipping optimizer the clipped sum to noise.
"""

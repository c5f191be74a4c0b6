"""Differential privacy: accounting, the run's ledger, and DP-SGD.

:mod:`~privimage.dp.accounting` composes the mechanisms' history with one Opacus
accountant and calibrates sigma (pure functions); :mod:`~privimage.dp.ledger` keeps the
run's ``privacy.json`` on top of it. :mod:`~privimage.dp.dpsgd` makes a model private
with stock Opacus and noise multiplicity K; :mod:`~privimage.dp.layers` holds the
per-layer math of fast clipping (per-example gradient norms from activations and output
gradients, and clipped sums) and :mod:`~privimage.dp.bookkeeping` the module wrapper that
runs it inside one backward pass. :mod:`~privimage.dp.training` is the DP-SGD loop shared
by fine-tuning and the audit, :mod:`~privimage.dp.audit` the audit's math.
"""

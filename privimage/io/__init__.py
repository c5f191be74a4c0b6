"""Files and randomness every stage shares: DP seeding and the release boundary.

The target home (see DESIGN.md) of atomic writes, artifact names, the ledger and
checkpoints as well; for now it holds :mod:`privimage.io.seeding` and
:mod:`privimage.io.release`.
"""

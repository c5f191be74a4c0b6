"""Typed configuration: ``schema`` (dataclasses, imports nothing of privimage's),
``validate`` (one-line errors) and ``store`` (Hydra's side: ``to_config``, ``compose``,
``load_group`` for one group's preset, and a run folder's ``config.yaml``)."""

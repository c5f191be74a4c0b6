"""Typed configuration: ``schema`` (dataclasses, imports nothing of privimage's),
``validate`` (one-line errors) and ``store`` (Hydra registration, ``to_config``)."""

"""Every dataset source by its ``data.source`` name (:data:`SOURCES`), and the lookup."""

from __future__ import annotations

from privimage.data.hub import Hub
from privimage.data.sources import (
    Cifar10,
    Digits,
    Folder,
    Glyphs,
    Mnist5k,
    Source,
    Tar,
    TinyImageNet,
)
from privimage.errors import ConfigError

_REGISTRY: dict[str, Source] = {
    s.name: s
    for s in (Mnist5k(), Digits(), Glyphs(), Cifar10(), TinyImageNet(), Folder(), Tar(), Hub())
}
SOURCES: frozenset[str] = frozenset(_REGISTRY)


def get_source(name: str) -> Source:
    """The source called ``name``.

    Raises:
        ConfigError: (one line) listing the known sources.
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"source={name!r} is not a known dataset source; "
            f"choose one of {', '.join(sorted(SOURCES))}"
        )
    return _REGISTRY[name]

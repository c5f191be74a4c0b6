"""How a class name becomes a folder name, for every stage that writes or reads image
folders: kept below ``data`` and ``io.artifacts`` so both can use it."""

from __future__ import annotations

import re


def safe_name(name: str) -> str:
    """A class name made safe as a folder name (the sample stage's folder names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"

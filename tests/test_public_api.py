"""The public API (``privimage/__init__.py``): every name resolves to the object its
module defines, loads lazily, and shows in ``dir(privimage)``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import privimage
from privimage import _API


@pytest.mark.parametrize("name", sorted(_API))
def test_each_name_resolves_to_its_defining_module(name):
    module, _, attr = _API[name].partition(":")
    obj = getattr(privimage, name)
    assert obj is getattr(importlib.import_module(module), attr or name)
    # Where the object says where it was defined, it is the module the table names.
    if hasattr(obj, "__module__") and callable(obj):
        assert obj.__module__ == module
    assert name in dir(privimage) and name in privimage.__all__


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        privimage.nope  # noqa: B018


def test_import_privimage_loads_no_torch():
    probe = "import sys, privimage; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False"

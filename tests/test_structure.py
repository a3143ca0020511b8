"""The house rules: a cheap CLI start, a root that exports the public API only, registries without plugins."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import patchcsra


def test_cli_starts_without_torch():
    code = "import sys, patchcsra.cli; print('torch' in sys.modules, 'timm' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "False"]
    v = subprocess.run([sys.executable, "-m", "patchcsra", "--version"], capture_output=True, text=True, check=True)
    assert v.stdout.strip() == f"patchcsra {patchcsra.__version__}"


def test_root_exports_the_api_and_shadows_no_submodule():
    names = set(patchcsra.__all__) - {"__version__"}
    assert len(names) <= 20
    for n in names:
        assert getattr(patchcsra, n) is not None
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"patchcsra.{n}")
    assert callable(patchcsra.sweep) and importlib.import_module("patchcsra.grid").sweep is patchcsra.sweep
    with pytest.raises(AttributeError):
        patchcsra.not_a_name  # noqa: B018


@pytest.mark.parametrize("module,register,args", [
    ("patchcsra.heads.base", "register_adapter", ("timm",)),
    ("patchcsra.bench", "register_case", ("demo",)),
])
def test_a_registered_name_cannot_be_taken_twice(module, register, args):
    m = importlib.import_module(module)
    importlib.import_module("patchcsra.heads")  # the package face registers the built-in adapters
    deco = getattr(m, register)(*args, **({"priority": 1, "matches": lambda _: False} if "adapter" in register else {}))
    with pytest.raises(ValueError, match="already registered"):
        deco(lambda *a: None)


def test_dataset_formats_cannot_be_registered_twice():
    from patchcsra.data import register_format

    with pytest.raises(ValueError, match="'voc' is already registered"):
        register_format("voc", detect=lambda p: False, open=lambda *a, **k: None)


def test_registries_do_not_import_their_plugins():
    for path in ("patchcsra/heads/base.py", "patchcsra/data/base.py"):
        src = (importlib.import_module("pathlib").Path(patchcsra.__file__).parents[1] / path).read_text()
        for plugin in ("fx", "timm", "torchvision", "trained", "coco", "voc", "folder", "manifest"):
            assert f"from . import {plugin}" not in src and f"from .{plugin} import" not in src, (path, plugin)

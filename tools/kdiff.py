"""Loads k-diffusion's `sampling.py` and `external.py` by file.

The installed package's `__init__` imports training-only modules that fail; the two files we
need only use `utils.append_dims`/`append_zero`-style helpers, so `utils` is loaded too, with
torchvision stubbed when it is missing."""

import importlib.util
import os
import sys
import types


def _package_dir():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion")
    return list(spec.submodule_search_locations)[0]


def _stub_torchvision():
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")
        tv.transforms, tr.functional = tr, fn
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})


def load():
    """Returns (sampling, external) modules."""
    root = _package_dir()
    _stub_torchvision()
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    sys.modules["k_diffusion"] = pkg
    mods = {}
    for name in ("utils", "sampling", "external"):
        spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", os.path.join(root, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"k_diffusion.{name}"] = mod
        spec.loader.exec_module(mod)
        setattr(pkg, name, mod)
        mods[name] = mod
    return mods["sampling"], mods["external"]

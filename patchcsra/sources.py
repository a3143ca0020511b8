"""Model sources -> ``nn.Module``.

Accepted ``spec`` forms (see :func:`load`):

* ``timm:NAME`` -- any timm model, ``timm:hf-hub:org/name`` too; pretrained weights by default.
* ``torchvision:NAME`` -- a torchvision classification model; ``weights=`` takes a weights enum
  name (``IMAGENET1K_V2``, ``ResNet50_Weights.IMAGENET1K_V2``, ``DEFAULT``) or a file.
* a file:
  - state dict (``.pt/.pth/.bin/.th/.ckpt/.safetensors``) with ``arch=`` (a timm/torchvision spec
    or ``package.module:factory`` for your own class). Checkpoints are accepted as people save
    them: nested under ``state_dict``/``model``/``ema``..., ``module.`` (DataParallel) and
    ``_orig_mod.`` (torch.compile) prefixes, tensors saved on GPU, another number of classes;
  - TorchScript archive (its head is found from its graph when patched) -- only with ``trust=True``;
  - ``torch.export`` archive (``.pt2``) -- only with ``trust=True``: both carry code that runs when
    the model is loaded or called, and PyTorch's security policy treats them as programs;
  - a whole pickled ``nn.Module`` -- only with ``trust=True``, because unpickling runs code;
  - a model written by ``patchcsra patch`` (TorchScript or ``.pt2``): returned as
    :class:`PatchedArchive`, whose ``lam`` can be changed.

Every failure is a :class:`~patchcsra.errors.SourceError` whose one-line message names the
file or name and what to pass instead.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .errors import SourceError, TrustError
from .heads.base import set_eval

__all__ = ["load", "parse_spec", "SCHEMES", "PatchedArchive", "TrainedArchive", "load_state_dict_file", "build_arch",
           "META_FILE"]


META_FILE = "patchcsra.json"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".th", ".ckpt", ".tar", ".safetensors")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "network", "module",
                "state_dict_ema", "model_ema", "ema", "ema_state_dict")


class _Archive(nn.Module):
    """A model read back from a file patchcsra wrote; ``patchcsra_meta`` holds the file's record."""

    def __init__(self, module: nn.Module, meta: dict) -> None:
        super().__init__()
        self.module = module
        self.patchcsra_meta = meta

    def train(self, mode: bool = True) -> "_Archive":
        """Archives are inference models: only eval mode is passed on to the module."""
        self.training = mode
        if not mode:
            set_eval(self.module)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


class PatchedArchive(_Archive):
    """A patched model read back from a ``patchcsra patch`` file; its ``lam`` can be changed."""

    @property
    def lam(self) -> float:
        return float(self.module._lam)

    @lam.setter
    def lam(self, value: float) -> None:
        from .patcher import check_lam

        with torch.no_grad():
            self.module._lam.fill_(check_lam(value))


class TrainedArchive(_Archive):
    """A model written by ``patchcsra train-head`` (its ``model.pt``)."""


def _archive(module: nn.Module, meta: Optional[dict]) -> nn.Module:
    if not meta:
        return module
    if meta.get("kind") == "trained-head":
        return TrainedArchive(module, meta)
    return PatchedArchive(module, meta)


def load(spec: Union[str, os.PathLike], *, pretrained: bool = True, weights: Optional[str] = None,
         arch: Optional[str] = None, trust: bool = False, num_classes: Optional[int] = None,
         **model_kwargs: Any) -> nn.Module:
    """Load a classifier from a name or a file, in eval mode on the CPU.

    Args:
        spec: ``timm:NAME``, ``torchvision:NAME``, or a path (see module docstring).
        pretrained: fetch the library's pretrained weights (timm/torchvision names only).
        weights: torchvision weights enum name, or a state-dict file to load into the named model.
        arch: architecture for a state-dict file: ``timm:NAME``, ``torchvision:NAME`` or
            ``package.module:factory``.
        trust: allow files that run code when loaded or called: a whole pickled module, a
            TorchScript or ``torch.export`` archive (yours from ``patchcsra patch``/``train-head`` too).
        num_classes: classes of the checkpoint's head; inferred from the state dict when omitted.
        **model_kwargs: passed to the model constructor (e.g. ``img_size=`` for timm ViTs).
    """
    s = os.fspath(spec)
    scheme, name = parse_spec(s)
    if scheme is not None:
        model = _LIBRARIES[scheme](name, pretrained, weights, num_classes, model_kwargs)
    else:
        model = _load_file(Path(s), arch=arch, trust=trust, num_classes=num_classes, model_kwargs=model_kwargs)
    if not isinstance(model, PatchedArchive):
        src = dict(getattr(model, "patchcsra_source", None) or {})
        src.update(spec=s, arch=arch, weights=None if weights is None else str(weights))
        try:
            model.patchcsra_source = src
        except (AttributeError, RuntimeError, TypeError):  # some ScriptModules refuse new attributes
            pass
    return set_eval(model)


# ----------------------------------------------------------------------------- names
#: the library schemes of a model spec (``scheme:NAME``); anything else is a file or ``module:factory``
SCHEMES = ("timm", "torchvision")


def parse_spec(spec: Union[str, os.PathLike]) -> tuple[Optional[str], str]:
    """``'timm:resnet50'`` -> ``('timm', 'resnet50')``; anything else -> ``(None, spec)`` (a path or an arch)."""
    s = os.fspath(spec)
    scheme, sep, name = s.partition(":")
    return (scheme, name) if sep and scheme in SCHEMES else (None, s)


def _close(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    return f"; did you mean: {', '.join(close)}?" if close else ""


def _load_timm(name: str, pretrained: bool, weights: Optional[str], num_classes: Optional[int],
               kwargs: dict) -> nn.Module:
    import timm

    if not name:
        raise SourceError("'timm:' needs a model name, e.g. timm:resnet50")
    if not name.startswith("hf-hub:"):
        arch_name = timm.models.split_model_name_tag(name)[0]
        if not timm.is_model(arch_name):
            raise SourceError(f"timm:{name}: unknown timm model{_close(name, timm.list_models())}")
    model = _from_weights_file(weights, lambda n: _create_timm(name, False, n, kwargs), f"timm:{name}", num_classes)
    if model is not None:
        return model
    if weights is not None:
        raise SourceError(f"weights={weights!r}: for timm models give a state-dict file, or a tag in the "
                          "name (timm:resnet50.a1_in1k)")
    return _create_timm(name, pretrained, num_classes, kwargs)


def _create_timm(name: str, pretrained: bool, num_classes: Optional[int], kwargs: dict) -> nn.Module:
    import timm

    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as e:  # noqa: BLE001
        if pretrained:
            raise SourceError(f"timm:{name}: could not get pretrained weights ({type(e).__name__}: "
                              f"{_first_line(e)}); pass pretrained=False (CLI --no-pretrained) or "
                              "weights=FILE") from e
        raise SourceError(f"timm:{name}: could not build the model ({type(e).__name__}: {_first_line(e)})") from e


def _load_torchvision(name: str, pretrained: bool, weights: Optional[str], num_classes: Optional[int],
                      kwargs: dict) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise SourceError(f"torchvision:{name}: unknown torchvision classification model{_close(name, names)}")
    model = _from_weights_file(weights, lambda n: _create_tv(name, None, n, kwargs), f"torchvision:{name}",
                               num_classes)
    if model is not None:
        return model
    enum = None
    if weights is not None or pretrained:
        enum = _tv_weights(name, weights or "DEFAULT")
    model = _create_tv(name, enum, num_classes, kwargs)
    if enum is not None:
        model.patchcsra_source = {"categories": list(enum.meta.get("categories") or []),
                                  "weights": str(enum)}
    return model


#: scheme -> ``loader(name, pretrained, weights, num_classes, model_kwargs)``
_LIBRARIES = {"timm": _load_timm, "torchvision": _load_torchvision}


def _tv_weights(name: str, weights: str):
    import torchvision

    enum_cls = torchvision.models.get_model_weights(name)
    key = weights.split(".")[-1]
    if key == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[key]
    except KeyError:
        raise SourceError(f"weights={weights!r} is not a weights name of torchvision:{name}; choose one of "
                          f"{', '.join(['DEFAULT'] + [w.name for w in enum_cls])}, or give a file") from None


def _create_tv(name: str, enum, num_classes: Optional[int], kwargs: dict) -> nn.Module:
    import torchvision

    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    try:
        return torchvision.models.get_model(name, weights=enum, **kw)
    except Exception as e:  # noqa: BLE001
        if enum is not None:
            raise SourceError(f"torchvision:{name}: could not get weights {enum} ({type(e).__name__}: "
                              f"{_first_line(e)}); pass pretrained=False (CLI --no-pretrained) or "
                              "weights=FILE") from e
        raise SourceError(f"torchvision:{name}: could not build the model ({type(e).__name__}: {_first_line(e)})") from e


def _from_weights_file(weights: Optional[str], build, spec: str, num_classes: Optional[int]) -> Optional[nn.Module]:
    """The named model with a state-dict file's weights, or None when ``weights`` is not a file."""
    path = _weights_file(weights)
    if path is None:
        return None
    return _fit_state_dict(build, load_state_dict_file(path), path, spec, num_classes)


def _weights_file(weights: Optional[str]) -> Optional[Path]:
    if weights is None:
        return None
    p = Path(weights)
    if p.suffix.lower() in STATE_DICT_SUFFIXES or os.sep in str(weights) or p.exists():
        if not p.exists():
            raise SourceError(f"weights file {weights}: no such file")
        return p
    return None


# ----------------------------------------------------------------------------- files
def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else ""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names) and any(
        "/code/" in n for n in names)


def _read_meta(extra: dict) -> Optional[dict]:
    raw = extra.get(META_FILE)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


#: archive kind -> ``load(path, extra_files) -> nn.Module`` (``extra_files`` is filled with the stored records)
_ARCHIVE_LOADERS = {
    "torch.export": lambda path, extra: torch.export.load(str(path), extra_files=extra).module(),
    "TorchScript": lambda path, extra: torch.jit.load(str(path), map_location="cpu", _extra_files=extra),
}


def _load_file(path: Path, *, arch: Optional[str], trust: bool, num_classes: Optional[int],
               model_kwargs: dict) -> nn.Module:
    if not path.exists():
        hint = ""
        if os.sep not in str(path) and not path.suffix:
            hint = f"; for a model name write timm:{path} or torchvision:{path}"
        raise SourceError(f"{path}: no such file{hint}")
    if path.is_dir():
        raise SourceError(f"{path} is a directory; give a checkpoint file or a timm:/torchvision: name")
    kind = "torch.export" if path.suffix.lower() == ".pt2" else "TorchScript" if _is_torchscript(path) else None
    if kind is not None:
        if not trust:
            raise TrustError(f"{path} is a {kind} archive: it carries code that runs when it is loaded or called "
                             "(PyTorch treats such files as programs), so it is refused: pass trust=True (CLI "
                             "--trust) if you wrote it (e.g. with 'patchcsra patch') or trust its source")
        extra = {META_FILE: ""}
        try:
            module = _ARCHIVE_LOADERS[kind](path, extra)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{path}: not a readable {kind} archive ({type(e).__name__}: {_first_line(e)})") from e
        return _archive(module, _read_meta(extra))
    obj = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
        sd = _extract_state_dict(obj, path)
        if arch is None:
            raise SourceError(f"{path} holds a state dict ({len(sd)} tensors) and no architecture; pass "
                              "arch='timm:NAME', 'torchvision:NAME' or 'package.module:factory' (CLI --arch)")
        return _fit_state_dict(lambda n: build_arch(arch, n, model_kwargs), sd, path, arch, num_classes)
    raise SourceError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _check_checkpoint_bytes(path: Path) -> None:
    """A torch checkpoint is a zip archive (torch.save) or a pickle (legacy); anything else is refused here,
    so that garbage is not reported as 'pickled Python objects'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise SourceError(f"{path}: cannot read the file ({type(e).__name__}: {e.strerror or e})") from None
    if not head:
        raise SourceError(f"{path}: the file is empty; give a checkpoint saved with torch.save")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise SourceError(f"{path}: not a readable PyTorch checkpoint (neither a torch.save zip archive nor a "
                          "pickle); give a file saved with torch.save or a .safetensors file")


def _torch_load(path: Path, trust: bool) -> Any:
    if path.suffix.lower() == ".safetensors":
        return load_state_dict_file(path)
    _check_checkpoint_bytes(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise TrustError(
                f"{path} holds pickled Python objects ({_first_line(e)[:120]}); unpickling runs code from "
                "the file, so it is refused: pass trust=True (CLI --trust) only if you trust its source, "
                "or save model.state_dict() and pass arch=") from None
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{path}: unpickling failed ({type(e).__name__}: {_first_line(e)}); the classes it "
                          "names must be importable") from e


def load_state_dict_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` state dict (on CPU) from a checkpoint file, unwrapped and unprefixed."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{path}: not a readable safetensors file ({type(e).__name__}: {_first_line(e)})") from e
    else:
        _check_checkpoint_bytes(path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise TrustError(f"{path} is not a plain state dict (it holds pickled Python objects); "
                             "load it with trust=True as a whole model, or re-save model.state_dict()") from None
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _extract_state_dict(obj, path)


def _extract_state_dict(obj: dict, path: Path) -> dict[str, Tensor]:
    for _ in range(3):  # descend into {'state_dict': {...}}, {'model': {'state_dict': ...}}, ...
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    from timm.models import clean_state_dict  # DDP 'module.' / torch.compile '_orig_mod.' prefixes, either order

    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise SourceError(f"{path} holds no tensors under any of the keys {', '.join(_NESTED_KEYS)}")
    return {k: v.detach().to("cpu") for k, v in clean_state_dict(sd).items()}


def _import_module(mod_name: str, arch: str):
    try:
        return importlib.import_module(mod_name)
    except ImportError:
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:  # a user's own module next to where they run the tool: looked for last, and only now
            sys.path.append(cwd)
        try:
            return importlib.import_module(mod_name)
        except ImportError as e:
            raise SourceError(f"arch={arch!r}: cannot import module {mod_name!r} ({_first_line(e)}); "
                              "put it on PYTHONPATH or name its file: 'path/to/file.py:factory'") from e
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)  # a stray ./matplotlib.py must never shadow a library later


def _module_from_file(path: Path, arch: str):
    """Import a user's architecture file (the user named it, so its code runs, as ``import`` would)."""
    if not path.is_file():
        raise SourceError(f"arch={arch!r}: {path} does not exist; give the .py file that defines the factory")
    name = "patchcsra_user_arch_" + hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise SourceError(f"arch={arch!r}: importing {path} failed ({type(e).__name__}: {_first_line(e)})") from e
    return module


def build_arch(arch: str, num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None) -> nn.Module:
    """An untrained model from an architecture spec (``timm:``, ``torchvision:``, ``pkg.mod:factory``,
    ``path/to/file.py:factory``)."""
    kw = dict(model_kwargs or {})
    scheme, name = parse_spec(arch)
    if scheme is not None:
        return _LIBRARIES[scheme](name, False, None, num_classes, kw)
    mod_name, sep, attr = arch.rpartition(":")
    if not sep or not mod_name or not attr:
        raise SourceError(f"arch={arch!r}: give 'timm:NAME', 'torchvision:NAME', 'package.module:factory' "
                          "or 'path/to/file.py:factory'")
    if mod_name.endswith(".py"):
        module = _module_from_file(Path(mod_name).expanduser(), arch)
    else:
        module = _import_module(mod_name, arch)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SourceError(f"arch={arch!r}: {mod_name} has no callable {attr!r}")
    if num_classes is not None:
        kw["num_classes"] = num_classes
    try:
        model = factory(**kw)
    except TypeError as e:
        raise SourceError(f"arch={arch!r}: calling {attr}({', '.join(f'{k}=' for k in kw)}) failed ({_first_line(e)})") from e
    if not isinstance(model, nn.Module):
        raise SourceError(f"arch={arch!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model


def _fit_state_dict(build, sd: dict[str, Tensor], path: Path, arch: str,
                    num_classes: Optional[int]) -> nn.Module:
    model = build(num_classes)
    msd = model.state_dict()
    if num_classes is None:
        n = _head_classes(sd, msd)
        if n is not None:
            try:
                model = build(n)
                msd = model.state_dict()
            except SourceError:
                pass
    missing = [k for k in msd if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in msd]
    shapes = [k for k in sd if k in msd and tuple(sd[k].shape) != tuple(msd[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: file {tuple(sd[k].shape)} vs model "
                         f"{tuple(msd[k].shape)})")
        raise SourceError(f"{path} does not fit arch {arch}: {', '.join(parts)} keys; check --arch")
    model.load_state_dict(sd, strict=False)
    return model


def _head_classes(sd: dict[str, Tensor], msd: dict[str, Tensor]) -> Optional[int]:
    """Number of classes of the checkpoint when only the classifier's output size differs."""
    mism = [k for k in sd if k in msd and sd[k].shape != msd[k].shape]
    if not mism or len(mism) > 4:
        return None
    outs = {int(sd[k].shape[0]) for k in mism}
    same_rest = all(sd[k].ndim == msd[k].ndim and sd[k].shape[1:] == msd[k].shape[1:] for k in mism)
    return outs.pop() if len(outs) == 1 and same_rest else None

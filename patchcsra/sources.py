"""Model sources -> ``nn.Module``.

Accepted ``spec`` forms (see :func:`load`):

* ``timm:NAME`` -- any timm model, ``timm:hf-hub:ORG/NAME``, ``timm:ORG/NAME`` (the same: a Hugging Face hub
  repo in timm's format) and ``timm:local-dir:PATH`` too; pretrained weights by default. ``hf-hub:ORG/NAME``
  is timm's spelling of a hub repo and is accepted as it is.
* ``hf:ORG/NAME`` -- a ``transformers`` image classifier (``AutoModelForImageClassification``) from the hub.
* a folder: timm's hub format (``config.json`` naming its ``architecture`` + ``model.safetensors``, as
  ``timm.models.push_to_hub`` / ``save_for_hf`` write it) or a ``transformers`` ``save_pretrained`` folder
  (``config.json`` naming a ``*ForImageClassification`` architecture).
* ``ORG/NAME`` that is no file here -- a hub repo: its ``config.json`` says whether timm or transformers reads it.
* ``torchvision:NAME`` -- a torchvision classification model; ``weights=`` takes a weights enum
  name (``IMAGENET1K_V2``, ``ResNet50_Weights.IMAGENET1K_V2``, ``DEFAULT``) or a file.
* a file:
  - state dict (``.pt/.pth/.bin/.th/.ckpt/.safetensors``) with ``arch=`` (a timm/torchvision spec
    or ``package.module:factory`` for your own class). Checkpoints are accepted as people save
    them: nested under ``state_dict``/``model``/``ema``..., ``module.`` (DataParallel) and
    ``_orig_mod.`` (torch.compile) prefixes, tensors saved on GPU, another number of classes;
  - a training checkpoint as timm's ``train.py`` writes it (``arch``, ``args`` -- an ``argparse.Namespace``,
    read as data, never run --, ``state_dict``, ``state_dict_ema``): its ``arch`` is the architecture unless
    ``arch=`` says otherwise, ``ema=True`` takes the EMA weights;
  - an official CSRA checkpoint (``classifier.multi_head.{h}.head.weight`` on a torchvision ResNet):
    its ResNet with a :class:`~patchcsra.training.heads.CSRAHead` (H heads, their temperatures, λ from the
    file name's ``lam0.1`` or 0.1, the official default);
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

import argparse
import difflib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

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
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")
#: the only Python objects a checkpoint may hold besides tensors and containers (timm's train.py saves its
#: ``args``); they are rebuilt as data (``torch.load(weights_only=True)``), no code of the file runs
SAFE_GLOBALS = (argparse.Namespace,)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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
         arch: Optional[str] = None, trust: bool = False, num_classes: Optional[int] = None, ema: bool = False,
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
        ema: take a checkpoint's EMA weights (``state_dict_ema``, ``model_ema``, ``ema``...) instead of its
            model weights (timm's ``validate.py --use-ema``).
        **model_kwargs: passed to the model constructor (e.g. ``img_size=`` for timm ViTs).

    The model carries ``patchcsra_source`` (spec, arch, weights and ``family``, the architecture's name as
    its library knows it, e.g. ``resnet18``): the fixed λ (:func:`patchcsra.patcher.default_lam`) depends on
    that family, never on the file format it came in.
    """
    s = os.fspath(spec)
    scheme, name = parse_spec(s)
    if scheme is not None:
        model = _LIBRARIES[scheme](name, pretrained, weights, num_classes, model_kwargs)
    elif _looks_like_hub_name(s):
        model = _load_hub_name(s, pretrained, num_classes, model_kwargs)
    else:
        model = _load_file(Path(s), arch=arch, trust=trust, num_classes=num_classes, model_kwargs=model_kwargs,
                           ema=ema)
    if not isinstance(model, PatchedArchive):
        src = dict(getattr(model, "patchcsra_source", None) or {})
        src.setdefault("family", model_family(model, name if scheme in ("timm", "torchvision") else arch))
        src.update(spec=s, arch=src.get("arch") or arch, weights=None if weights is None else str(weights))
        try:
            model.patchcsra_source = src
        except (AttributeError, RuntimeError, TypeError):  # some ScriptModules refuse new attributes
            pass
    return set_eval(model)


def model_family(model: nn.Module, name: Optional[str] = None) -> str:
    """The architecture's name, lower case: a timm/torchvision name (``resnet18``), else the model's class --
    the original class of a TorchScript module, the library modules a ``torch.export`` graph came from."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"]).lower()
    if name:
        n = str(name).split(":")[-1].strip().lower()
        return n.split("/")[-1].split(".")[0] or n
    original = getattr(model, "original_name", None)  # torch.jit.ScriptModule: the scripted/traced class
    if isinstance(original, str) and original and type(model).__name__.startswith("Recursive"):
        return original.lower()
    graph = getattr(model, "graph", None)
    if graph is not None and hasattr(graph, "nodes") and type(model).__name__ == "GraphModule":
        fam = _export_family(graph)
        if fam:
            return fam
    return type(model).__name__.lower()


def _export_family(graph) -> Optional[str]:
    """The timm/torchvision model module (``resnet``, ``vision_transformer``) most of a graph's nodes came from."""
    import collections

    seen: collections.Counter = collections.Counter()
    for node in graph.nodes:
        for _, kind in (node.meta.get("nn_module_stack") or {}).values():
            parts = str(getattr(kind, "__module__", kind)).split(".")
            for lib in ("timm", "torchvision"):
                if lib in parts and "models" in parts:
                    i = parts.index("models")
                    if i + 1 < len(parts):
                        seen[parts[i + 1].lstrip("_")] += 1
    return seen.most_common(1)[0][0] if seen else None


# ----------------------------------------------------------------------------- names
#: the library schemes of a model spec (``scheme:NAME``); anything else is a file or ``module:factory``
SCHEMES = ("timm", "torchvision", "hf", "hf-hub")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def parse_spec(spec: Union[str, os.PathLike]) -> tuple[Optional[str], str]:
    """``'timm:resnet50'`` -> ``('timm', 'resnet50')``; ``'hf-hub:timm/x'`` -> ``('timm', 'hf-hub:timm/x')``;
    anything else -> ``(None, spec)`` (a path, a hub name or an arch)."""
    s = os.fspath(spec)
    scheme, sep, name = s.partition(":")
    if sep and scheme == "hf-hub":
        return "timm", s  # timm's own spelling of a hub repo
    return (scheme, name) if sep and scheme in SCHEMES else (None, s)


def _looks_like_hub_name(s: str) -> bool:
    """``ORG/NAME`` that is not a path here (no such file, not absolute, not ``./x``)."""
    return bool(_HUB_NAME.fullmatch(s)) and not Path(s).exists() and not s.startswith((".", "/", "~"))


def _hub_config(repo: str) -> dict:
    """``config.json`` of a Hugging Face hub repo (one line naming the repo when it cannot be fetched)."""
    if not _hf_cached(repo, ("config.json",)) and (_hub_offline() or not _reachable("huggingface.co")):
        raise SourceError(f"{repo}: no such file here, and the Hugging Face hub cannot be reached to look it up "
                          "(no network, or HF_HUB_OFFLINE); give a local folder or file")
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(repo, "config.json")) as fh:
            cfg = json.load(fh)
    except Exception as e:  # noqa: BLE001  (offline, no such repo, gated, not JSON)
        raise SourceError(f"{repo}: no such file here, and its config.json could not be fetched from the Hugging "
                          f"Face hub ({type(e).__name__}); give a local folder or file, or check the name and the "
                          "connection (HF_HUB_OFFLINE)") from None
    return cfg if isinstance(cfg, dict) else {}


def _load_hub_name(repo: str, pretrained: bool, num_classes: Optional[int], kwargs: dict) -> nn.Module:
    """``ORG/NAME``: timm reads a repo whose config names an ``architecture``, transformers one naming
    ``architectures``."""
    cfg = _hub_config(repo)
    if "architecture" in cfg:
        return _load_timm(f"hf-hub:{repo}", pretrained, None, num_classes, kwargs)
    if cfg.get("architectures") or cfg.get("model_type"):
        return _load_hf(repo, pretrained, None, num_classes, kwargs)
    raise SourceError(f"{repo}: its config.json names no timm architecture nor transformers architectures; "
                      "write timm:NAME or hf:ORG/NAME")


def _load_hf(name: str, pretrained: bool, weights: Optional[str], num_classes: Optional[int],
             kwargs: dict) -> nn.Module:
    from .hf_models import load_transformers

    if not name:
        raise SourceError("'hf:' needs a hub name or folder, e.g. hf:google/vit-base-patch16-224")
    if weights is not None:
        raise SourceError(f"weights={weights!r}: hf:{name} holds its own weights; give a folder or hub revision")
    if not Path(name).expanduser().exists():
        _require_network(f"hf:{name}", "huggingface.co", _hf_cached(name.split("@")[0], ("config.json",)),
                         "its config and weights")
    return load_transformers(name, pretrained=pretrained, num_classes=num_classes)


def _close(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    return f"; did you mean: {', '.join(close)}?" if close else ""


def _load_timm(name: str, pretrained: bool, weights: Optional[str], num_classes: Optional[int],
               kwargs: dict) -> nn.Module:
    import timm

    if not name:
        raise SourceError("'timm:' needs a model name, e.g. timm:resnet50")
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not (folder / "config.json").is_file():
            raise SourceError(f"timm:{name}: {folder} holds no config.json; give a folder written by timm's "
                              "save_for_hf / push_to_hub")
    elif "/" in name and not name.startswith("hf-hub:"):
        name = f"hf-hub:{name}"  # timm:ORG/NAME is a hub repo in timm's format
    if not name.startswith(("hf-hub:", "local-dir:")):
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
    if name.startswith("local-dir:"):
        pretrained = True  # the folder's weights are the model
    elif pretrained:
        _require_timm_weights(name)
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as e:  # noqa: BLE001
        if pretrained:
            raise SourceError(f"timm:{name}: could not get pretrained weights ({type(e).__name__}: "
                              f"{_first_line(e)}); pass pretrained=False (CLI --no-pretrained) or "
                              "weights=FILE") from e
        raise SourceError(f"timm:{name}: could not build the model ({type(e).__name__}: {_first_line(e)})") from e


# ----------------------------------------------------------------------------- offline: fail fast, not after retries
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` takes a TCP connection within ``timeout`` s (no DNS: False at once)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _hf_cached(repo: str, files: Sequence[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def _require_network(spec: str, host: str, cached: bool, what: str) -> None:
    """Refuse in one line, in seconds, a download that cannot happen (no network, or ``HF_HUB_OFFLINE``)."""
    if cached:
        return
    if host == "huggingface.co" and _hub_offline():
        raise SourceError(f"{spec}: {what} are not in the local cache and HF_HUB_OFFLINE is set; pass "
                          "pretrained=False (CLI --no-pretrained) or weights=FILE (CLI --weights FILE)")
    if not _reachable(host):
        raise SourceError(f"{spec}: {what} are not in the local cache and {host} cannot be reached (no network?); "
                          "pass pretrained=False (CLI --no-pretrained) or weights=FILE (CLI --weights FILE)")


def _require_timm_weights(name: str) -> None:
    """Before timm downloads pretrained weights: they are cached, or the network is there."""
    import timm
    from urllib.parse import urlparse

    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):].split("@")[0]
        _require_network(f"timm:{name}", "huggingface.co", _hf_cached(repo, ("config.json",)), "its config and weights")
        return
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except Exception:  # noqa: BLE001  (an unknown tag: timm's own message follows)
        return
    if cfg is None:
        return
    if getattr(cfg, "hf_hub_id", None):
        repo = cfg.hf_hub_id.split("@")[0]
        _require_network(f"timm:{name}", "huggingface.co", _hf_cached(repo, _HF_WEIGHT_FILES), "its pretrained weights")
    elif getattr(cfg, "url", None):
        cached = (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)).is_file()
        _require_network(f"timm:{name}", urlparse(cfg.url).hostname or "", cached, "its pretrained weights")


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
_LIBRARIES = {"timm": _load_timm, "torchvision": _load_torchvision, "hf": _load_hf}


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
    from urllib.parse import urlparse

    if enum is not None and getattr(enum, "url", None):
        cached = (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)).is_file()
        _require_network(f"torchvision:{name}", urlparse(enum.url).hostname or "", cached, f"its weights {enum}")
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


def _load_folder(path: Path, pretrained: bool, num_classes: Optional[int], kwargs: dict) -> nn.Module:
    """A timm hub folder (``config.json`` with ``architecture``) or a transformers ``save_pretrained`` folder."""
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    except (OSError, ValueError) as e:
        raise SourceError(f"{cfg_file}: not readable JSON ({type(e).__name__}); fix or re-save the folder") from None
    if isinstance(cfg, dict) and "architecture" in cfg:
        return _load_timm(f"local-dir:{path}", pretrained, None, num_classes, kwargs)
    from .hf_models import is_transformers_folder

    if is_transformers_folder(path):
        return _load_hf(str(path), pretrained, None, num_classes, kwargs)
    raise SourceError(f"{path} is a directory without a model config.json (timm's save_for_hf or transformers' "
                      "save_pretrained layout); give such a folder, a checkpoint file, or a timm:/torchvision:/hf: "
                      "name")


def _load_file(path: Path, *, arch: Optional[str], trust: bool, num_classes: Optional[int],
               model_kwargs: dict, ema: bool = False) -> nn.Module:
    if not path.exists():
        hint = ""
        if os.sep not in str(path) and not path.suffix:
            hint = f"; for a model name write timm:{path} or torchvision:{path}"
        raise SourceError(f"{path}: no such file{hint}")
    if path.is_dir():
        return _load_folder(path, True, num_classes, model_kwargs)
    if path.suffix.lower() == ".onnx":
        raise SourceError(f"{path} is an ONNX model: patchcsra does not run ONNX; run it with onnxruntime "
                          "(onnxruntime.InferenceSession(path)); its record is metadata_props['patchcsra.json'] "
                          "(patchcsra.export.read_onnx_metadata)")
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
        for key in (_EMA_KEYS if ema else ()) + _NESTED_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
        sd = _extract_state_dict(obj, path, ema=ema)
        if arch is None and _is_official_csra(sd):
            return _official_csra(sd, path)
        spec_arch = arch or _checkpoint_arch(obj, path, len(sd))
        model = _fit_state_dict(lambda n: build_arch(spec_arch, n, model_kwargs), sd, path, spec_arch, num_classes)
        _record_training_args(model, obj, spec_arch)
        return model
    raise SourceError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _checkpoint_arch(obj: dict, path: Path, n_tensors: int) -> str:
    """The architecture a training checkpoint names (timm's train.py: ``args.model``, ``arch``) as ``timm:NAME``."""
    args = obj.get("args")
    named = [getattr(args, "model", None), obj.get("arch")]
    for n in named:
        if isinstance(n, str) and n:
            import timm

            if timm.is_model(timm.models.split_model_name_tag(n)[0]):
                return f"timm:{n}"
    said = next((n for n in named if isinstance(n, str) and n), None)
    why = f" (its arch {said!r} is not a timm model name)" if said else ""
    raise SourceError(f"{path} holds a state dict ({n_tensors} tensors) and no architecture{why}; pass "
                      "arch='timm:NAME', 'torchvision:NAME' or 'package.module:factory' (CLI --arch)")


def _record_training_args(model: nn.Module, obj: dict, arch: str) -> None:
    """What a timm training checkpoint says of its input (``args.input_size`` / ``img_size``) and architecture."""
    src = dict(getattr(model, "patchcsra_source", None) or {})
    src["arch"] = arch
    args = obj.get("args")
    size = getattr(args, "input_size", None) or None
    img = getattr(args, "img_size", None)
    if size is None and isinstance(img, int) and img > 0:
        size = (getattr(args, "in_chans", None) or 3, img, img)
    if isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size):
        src["input_size"] = [int(v) for v in size]
    if isinstance(obj.get("epoch"), int):
        src["epoch"] = obj["epoch"]
    model.patchcsra_source = src


# ----------------------------------------------------------------------------- official CSRA checkpoints
_CSRA_KEY = re.compile(r"classifier\.multi_head\.(\d+)\.head\.weight")
#: the official code's MHA temperature sets (``99`` is its spelling of max pooling)
_OFFICIAL_T = {1: (1.0,), 2: (1.0, math.inf), 4: (1.0, 2.0, 4.0, math.inf), 6: (1.0, 2.0, 3.0, 4.0, 5.0, math.inf),
               8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.inf)}
_RESNET_DEPTHS = {(2, 2, 2, 2): ("resnet18", False), (3, 4, 6, 3): ("resnet34", False),
                  (3, 4, 6, 3, "b"): ("resnet50", True), (3, 4, 23, 3, "b"): ("resnet101", True),
                  (3, 8, 36, 3, "b"): ("resnet152", True)}


def _is_official_csra(sd: dict[str, Tensor]) -> bool:
    return any(_CSRA_KEY.fullmatch(k) for k in sd) and "conv1.weight" in sd


def _official_csra(sd: dict[str, Tensor], path: Path) -> nn.Module:
    """The official CSRA ``ResNet_CSRA``: a torchvision ResNet's features + :class:`CSRAHead` with its heads."""
    import torchvision

    from .heads.base import discover
    from .training.attach import HeadedClassifier
    from .training.heads import CSRAHead

    heads = sorted(int(m.group(1)) for k in sd if (m := _CSRA_KEY.fullmatch(k)))
    if heads != list(range(len(heads))) or len(heads) not in _OFFICIAL_T:
        raise SourceError(f"{path}: CSRA heads {heads} are not one of the official sets (1, 2, 4, 6 or 8 heads)")
    blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in sd
    found = _RESNET_DEPTHS.get(blocks + (("b",) if bottleneck else ()))
    if found is None:
        raise SourceError(f"{path}: a CSRA checkpoint on a ResNet with blocks {blocks}, which is not "
                          "ResNet-18/34/50/101/152; pass --arch and load it as a state dict")
    name = found[0]
    w = torch.stack([sd[f"classifier.multi_head.{h}.head.weight"] for h in heads]).flatten(2).float()  # (H, C, d)
    lam = re.search(r"lam([0-9]*\.?[0-9]+)", path.name)
    head = CSRAHead(int(w.shape[2]), int(w.shape[1]), heads=len(heads), lam=float(lam.group(1)) if lam else 0.1,
                    temperatures=_OFFICIAL_T[len(heads)])
    with torch.no_grad():
        head.weight.copy_(w)
    backbone = torchvision.models.get_model(name, weights=None)
    body = {k: v for k, v in sd.items() if not k.startswith(("classifier.", "fc."))}
    missing, unexpected = backbone.load_state_dict(body, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise SourceError(f"{path}: does not fit torchvision {name} ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected keys, e.g. {(missing + unexpected)[0]})")
    split = discover(backbone.eval(), input_size=(3, 448, 448))
    model = HeadedClassifier(split, head).eval()
    model.patchcsra_source = {"family": name, "input_size": [3, 448, 448], "arch": f"torchvision:{name}",
                              "csra": {"heads": len(heads), "lam": head.lam, "official": True}}
    return model


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


def _safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` allowing :data:`SAFE_GLOBALS` (rebuilt as data, never run)."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _blocked(e: BaseException) -> str:
    """What ``weights_only`` refused, in a few plain words (PyTorch's own message is long and colour-coded)."""
    text = _ANSI.sub("", str(e))
    m = re.search(r"(?:Unsupported global|GLOBAL|global)[: ]+(?:GLOBAL )?([\w.]+)", text)
    return f"e.g. {m.group(1)}" if m else "objects other than tensors"


def _torch_load(path: Path, trust: bool) -> Any:
    if path.suffix.lower() == ".safetensors":
        return load_state_dict_file(path)
    _check_checkpoint_bytes(path)
    try:
        return _safe_load(path)
    except pickle.UnpicklingError as e:
        if not trust:
            raise TrustError(
                f"{path} holds pickled Python objects ({_blocked(e)}); unpickling runs code from the file, so it "
                "is refused: pass trust=True (CLI --trust) only if you trust its source, or save "
                "model.state_dict() and pass arch=") from None
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{path}: unpickling failed ({type(e).__name__}: {_first_line(e)}); the classes it "
                          "names must be importable") from e


def load_state_dict_file(path: Union[str, Path], ema: bool = False) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` state dict (on CPU) from a checkpoint file, unwrapped and unprefixed
    (``ema``: the checkpoint's EMA weights)."""
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
            obj = _safe_load(path)
        except pickle.UnpicklingError:
            raise TrustError(f"{path} is not a plain state dict (it holds pickled Python objects); "
                             "load it with trust=True as a whole model, or re-save model.state_dict()") from None
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _extract_state_dict(obj, path, ema=ema)


def _extract_state_dict(obj: dict, path: Path, ema: bool = False) -> dict[str, Tensor]:
    if ema:
        found = next((k for k in _EMA_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if found is None:
            keys = ", ".join(sorted(str(k) for k in obj)[:8])
            raise SourceError(f"{path} holds no EMA weights (none of {', '.join(_EMA_KEYS)}; its keys: {keys}); "
                              "leave out ema (CLI --ema)")
        obj = obj[found]
    for _ in range(3):  # descend into {'state_dict': {...}}, {'model': {'state_dict': ...}}, ...
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise SourceError(f"{path} holds no tensors under any of the keys {', '.join(_NESTED_KEYS)}")
    return {k: v.detach().to("cpu") for k, v in clean_state_dict(sd).items()}


_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")  # torch.compile over DDP, DDP, torch.compile


def clean_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the DDP ``module.`` / torch.compile ``_orig_mod.`` key prefixes, wrapped in either
    order: timm's ``timm.models.clean_state_dict``, kept here because ``import timm`` (which imports
    torchvision) costs more than a cached re-sweep (``tests/test_sources_formats.py`` checks both agree)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_WRAPPER_PREFIXES):
            for r in _WRAPPER_PREFIXES:
                k = k[len(r):] if k.startswith(r) else k
        out[k] = v
    return out


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

"""Benchmark suites and the regression gate behind ``patchcsra bench``.

A suite is data: a JSON file (or the built-in ``demo``) naming cases. Paths in a suite file are relative to
the file's folder; ``$VARS`` and ``~`` are expanded::

    {"name": "ci",
     "tolerance": {"score": 0.05, "lam0": 1e-5},
     "cases": [
       {"name": "demo", "kind": "demo"},
       {"name": "cifar10-resnet20", "kind": "sweep", "source": "../../shared/weights/resnet20-12fca82f.th",
        "arch": "cifar_resnet.py:resnet20", "data": "../../shared/weights/cifar10-test-full-jpeg.tar.gz",
        "metrics": ["top1", "mAP"], "transform": {"input_size": [3, 32, 32], "mean": [...], "std": [...]}},
       {"name": "voc07-mobilenetv2-linear", "kind": "train-sweep", "train_split": "train", "split": "val",
        "head": {"kind": "linear", "epochs": 30}, ...}]}

Case kinds (:data:`CASE_KINDS`, a registry): ``demo`` (the embedded default, :func:`patchcsra.demo.run_demo`),
``sweep`` (a model on a dataset: one pass, then every metric's λ choices) and ``train-sweep`` (train a head
with :func:`patchcsra.training.train_head` on a frozen backbone, then sweep). A ``.tar``/``.tar.gz`` ``data`` is
extracted once into the work folder (tar's ``data`` filter: no links out, no absolute paths).

Every case records, per metric, the baseline and the fixed / oracle / cross-validated patched scores with
their λ, T and bootstrap CIs, plus ``lam0_max_abs_diff``: ``max |patched(x; λ=0) - model(x)|`` on real
images (0 when the patch is exact). :func:`check_results` compares a result with an expected one:
a score that moves by more than its tolerance, a λ=0 gap above its tolerance, or a missing case fails.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .errors import PatchCSRAError
from . import _io
from .provenance import environment

__all__ = ["CASE_KINDS", "BUILTIN_SUITES", "Suite", "load_suite", "run_suite", "check_results", "CheckRow",
           "register_case", "DEFAULT_TOLERANCE", "SCORE_FIELDS"]

_logger = logging.getLogger(__name__)

#: tolerances when a suite or an expected file names none: score points (of 100) and the λ=0 gap (relative)
DEFAULT_TOLERANCE = {"score": 0.05, "lam0": 1e-5}
#: the scores of one metric that the gate compares
SCORE_FIELDS = ("baseline", "fixed", "oracle", "cv")

Progress = Callable[[str, int, Optional[int]], None]
CASE_KINDS: dict[str, Callable[..., dict]] = {}

BUILTIN_SUITES: dict[str, dict] = {
    "demo": {"name": "demo", "cases": [{"name": "demo", "kind": "demo"}]},
}


def register_case(kind: str):
    """Register ``fn(case, ctx) -> record`` as the runner of a case kind (a name already taken raises)."""
    def deco(fn):
        if kind in CASE_KINDS:
            raise ValueError(f"bench case kind {kind!r} is already registered; choose another name")
        CASE_KINDS[kind] = fn
        return fn
    return deco


@dataclass
class Suite:
    name: str
    cases: list[dict]
    tolerance: dict
    root: Path  # the folder relative paths are resolved against

    def path(self, value: Union[str, os.PathLike]) -> Path:
        p = Path(os.path.expandvars(os.fspath(value))).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()


def load_suite(spec: Union[str, os.PathLike]) -> Suite:
    """A built-in suite name (``demo``) or a suite JSON file."""
    s = os.fspath(spec)
    if s in BUILTIN_SUITES:
        raw, root = BUILTIN_SUITES[s], Path.cwd()
    else:
        p = Path(s)
        if not p.is_file():
            raise PatchCSRAError(f"suite {s!r} is neither a built-in suite ({', '.join(BUILTIN_SUITES)}) nor a file")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PatchCSRAError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); fix the suite file") from None
        root = p.resolve().parent
    cases = raw.get("cases")
    if not isinstance(cases, list) or not cases:
        raise PatchCSRAError(f"suite {s!r} has no 'cases' list")
    names = set()
    for i, c in enumerate(cases):
        if not isinstance(c, dict) or "name" not in c or c.get("kind") not in CASE_KINDS:
            raise PatchCSRAError(f"suite {s!r}: case {i} needs a 'name' and a 'kind' in {', '.join(CASE_KINDS)}")
        if c["name"] in names:
            raise PatchCSRAError(f"suite {s!r}: case name {c['name']!r} is used twice")
        names.add(c["name"])
    tol = {**DEFAULT_TOLERANCE, **(raw.get("tolerance") or {})}
    return Suite(str(raw.get("name") or Path(s).stem), cases, tol, root)


# ----------------------------------------------------------------------------- helpers for the case runners
@dataclass
class _Context:
    suite: Suite
    work: Path
    workers: Optional[int]
    progress: Optional[Progress]

    def say(self, msg: str, done: int = 0, total: Optional[int] = None) -> None:
        if self.progress is not None:
            self.progress(msg, done, total)


def _extract(archive: Path, into: Path) -> Path:
    """Extract a tarball once (atomically: a temporary folder renamed into place); returns the folder."""
    if into.exists():
        return into
    tmp = into.with_name(into.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PatchCSRAError(f"{archive}: cannot extract ({type(e).__name__}: {e}); check the file") from None
    os.replace(tmp, into)
    return into


def _data_path(case: dict, ctx: _Context) -> Path:
    p = ctx.suite.path(case["data"])
    if not p.exists():
        raise PatchCSRAError(f"case {case['name']!r}: data {p} does not exist")
    name = p.name
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        stem = name.split(".tar")[0].removesuffix(".tgz")
        root = _extract(p, ctx.work / "data" / stem)
        sub = case.get("data_subdir")
        return root / sub if sub else root
    return p


def _transform(case: dict) -> dict:
    tf = dict(case.get("transform") or {})
    for k in ("input_size", "mean", "std"):
        if k in tf:
            tf[k] = tuple(tf[k])
    return tf


def _load_model(case: dict, ctx: _Context):
    from .sources import load, parse_spec

    arch = case.get("arch")
    if arch and ":" in arch and arch.rsplit(":", 1)[0].endswith(".py"):
        file, factory = arch.rsplit(":", 1)
        arch = f"{ctx.suite.path(file)}:{factory}"
    src = case["source"]
    spec = src if parse_spec(src)[0] is not None else ctx.suite.path(src)
    return load(spec, arch=arch, pretrained=bool(case.get("pretrained", True)))


@torch.no_grad()
def lam0_gap(model: torch.nn.Module, images: torch.Tensor, input_size: Optional[Sequence[int]] = None) -> float:
    """``max |patch(model, λ=0)(images) - model(images)|`` relative to ``max(1, max |model(images)|)``;
    the probe is ``input_size``, else the images' own size ``(C, H, W)``."""
    from .patcher import patch

    model.eval()
    want = model(images)
    got = patch(model, lam=0.0, input_size=input_size or tuple(images.shape[1:]))(images)
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def _first_images(dataset, n: int = 8) -> torch.Tensor:
    xs = []
    for i in range(min(n, len(dataset))):
        x, _, ok = dataset[i]
        if ok:
            xs.append(x)
    return torch.stack(xs)


def _score_record(result) -> dict:
    """One metric's baseline and λ choices from a :class:`~patchcsra.grid.SweepResult`."""
    rec: dict[str, Any] = {"baseline": float(result.baseline[result.metric])}
    for key, c in result.choices.items():
        d = c.as_dict()
        rec[key] = d["score"]
        rec[f"{key}_lam"] = d["lam"]
        rec[f"{key}_T"] = d["temperature"]
        rec[f"{key}_delta"] = d["delta"]
        rec[f"{key}_ci"] = list(d["ci"])
    return rec


def _metrics_of(run, case: dict) -> dict:
    """Every requested metric's record from one pass (the stats are reused, no new forward)."""
    from .grid import sweep

    st = run.result.settings
    out = {}
    for m in case.get("metrics") or [run.result.metric]:
        res = run.result if m == run.result.metric else sweep(
            run.stats, lams=st["lams"], temperatures=[float(t) for t in st["temperatures"]],
            fixed_lam=st["fixed_lam"], metric=m, folds=st["folds"], bootstrap=st["bootstrap"], seed=st["seed"])
        out[m] = _score_record(res)
    return out


def _sweep_kwargs(case: dict) -> dict:
    return dict(temperatures=tuple(float(t) for t in case.get("temperatures", [1, 2, 4, "inf"])),
                fixed_lam=case.get("fixed_lam"), bootstrap=int(case.get("bootstrap", 1000)),
                metric=(case.get("metrics") or [None])[0], folds=int(case.get("folds", 5)), seed=int(case.get("seed", 0)))


# ----------------------------------------------------------------------------- case kinds
@register_case("demo")
def _run_demo_case(case: dict, ctx: _Context) -> dict:
    from .demo import DigitNet, _to_input, digit_canvases, run_demo

    kw = {k: int(case[k]) for k in ("n_train", "n_test", "epochs", "seed") if k in case}
    out = ctx.work / case["name"]
    run = run_demo(out, force=True, workers=0,
                   progress=lambda msg, d, t: ctx.say(f"{case['name']}: {msg}", d, t), **kw)
    model = DigitNet()
    model.load_state_dict(torch.load(out / "digitnet.pt", weights_only=True))
    imgs, _ = digit_canvases(8, part="test", seed=kw.get("seed", 0))
    return {"images": run.summary["images"]["scored"], "model": run.summary["model"]["name"],
            "dataset": run.summary["dataset"]["name"], "lam0_max_abs_diff": lam0_gap(model.eval(), _to_input(imgs)),
            "scores": _metrics_of(run, case)}


def _evaluate(model: torch.nn.Module, data: Path, split: Optional[str], case: dict, ctx: _Context,
              default_name: str) -> dict:
    """The λ=0 gap on the first images, then one pass and every metric's λ choices: a case's record."""
    from .api import prepare, sweep_lambda

    tf = _transform(case)
    limit = case.get("limit")  # a case may score a seeded, class-stratified subset (its own "seed")
    prep = prepare(model, data, split=split, data_format=case.get("format"), limit=limit,
                   limit_seed=int(case.get("seed", 0)), **tf)
    gap = lam0_gap(prep.model, _first_images(prep.dataset), prep.transform.input_size)
    run = sweep_lambda(model, prep.dataset, workers=ctx.workers, batch_size=int(case.get("batch_size", 50)),
                       device="cpu", amp="none", cache_dir=None,
                       progress=lambda d, t: ctx.say(f"{case['name']}: collecting", d, t),
                       **_sweep_kwargs(case), **tf)
    return {"images": run.summary["images"]["scored"], "model": case.get("model_name", default_name),
            "dataset": case.get("dataset_name", str(case["data"])), "lam0_max_abs_diff": gap,
            "scores": _metrics_of(run, case)}


@register_case("sweep")
def _run_sweep_case(case: dict, ctx: _Context) -> dict:
    model = _load_model(case, ctx)
    return _evaluate(model, _data_path(case, ctx), case.get("split"), case, ctx, type(model).__name__)


@register_case("train-sweep")
def _run_train_sweep_case(case: dict, ctx: _Context) -> dict:
    from .data import open_dataset, resolve_transform
    from .training.loop import TrainConfig, train_head

    data = _data_path(case, ctx)
    model = _load_model(case, ctx)
    spec = resolve_transform(model, **_transform(case))
    train = open_dataset(data, split=case.get("train_split", "train"), format=case.get("format"))
    if case.get("limit"):
        train = train.sample(int(case["limit"]), int(case.get("seed", 0)))
    cfg = TrainConfig(**{"init": "random", **dict(case.get("head") or {"kind": "linear"})})
    res = train_head(model, train, ctx.work / case["name"] / "train", config=cfg, transform=spec, force=True,
                     device="cpu", workers=ctx.workers, source=str(case["source"]),
                     progress=lambda e: ctx.say(f"{case['name']}: training {cfg.kind} head", e["epoch"], e["epochs"]))
    rec = _evaluate(res.model, data, case.get("split", "val"), case, ctx, f"{cfg.kind} head")
    rec["train"] = {"best_epoch": res.best_epoch, "best_val": res.best_metric, "config": cfg.as_dict()}
    return rec


# ----------------------------------------------------------------------------- running and checking
def run_suite(suite: Union[Suite, str, os.PathLike], work_dir: Union[str, Path], *,
              only: Optional[Sequence[str]] = None, workers: Optional[int] = 0,
              progress: Optional[Progress] = None) -> dict:
    """Run every case (or ``only`` those) deterministically on CPU; returns the result record.

    ``work_dir`` keeps extracted data and each case's files. Seeds are fixed and
    ``torch.use_deterministic_algorithms(True)`` is on during the run.
    """
    s = suite if isinstance(suite, Suite) else load_suite(suite)
    names = [c["name"] for c in s.cases]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise PatchCSRAError(f"--only {', '.join(unknown)}: not in suite {s.name!r} (cases: {', '.join(names)})")
    ctx = _Context(s, Path(work_dir), workers, progress)
    ctx.work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"suite": s.name, "tolerance": s.tolerance, "environment": environment(), "cases": {}}
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for case in s.cases:
            if only and case["name"] not in only:
                continue
            torch.manual_seed(int(case.get("seed", 0)))
            t0 = time.perf_counter()
            rec = CASE_KINDS[case["kind"]](case, ctx)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            rec["kind"] = case["kind"]
            record["cases"][case["name"]] = rec
            _logger.info("%s: done in %.0f s", case["name"], rec["seconds"])
    finally:
        torch.use_deterministic_algorithms(was)
    return record


@dataclass
class CheckRow:
    case: str
    metric: str
    field: str
    expected: Optional[float]
    got: Optional[float]
    tolerance: float
    ok: bool

    @property
    def diff(self) -> Optional[float]:
        if self.expected is None or self.got is None:
            return None
        return self.got - self.expected


def check_results(results: dict, expected: dict, *, tolerance: Optional[dict] = None) -> list[CheckRow]:
    """Compare a suite result with the expected one, field by field.

    Scores (:data:`SCORE_FIELDS` of every expected metric) pass when ``|got - expected| <= tol['score']``
    (a case or metric may set its own ``tolerance``); ``lam0_max_abs_diff`` passes when ``<= tol['lam0']``.
    A case or metric that is expected but missing, or a non-finite score, fails.
    """
    tol = {**DEFAULT_TOLERANCE, **(expected.get("tolerance") or {}), **(tolerance or {})}
    rows: list[CheckRow] = []
    got_cases = results.get("cases") or {}
    for name, exp in (expected.get("cases") or {}).items():
        got = got_cases.get(name)
        if got is None:
            rows.append(CheckRow(name, "", "case missing", None, None, 0.0, False))
            continue
        lam0 = got.get("lam0_max_abs_diff")
        t0 = float(exp.get("tolerance", {}).get("lam0", tol["lam0"]))
        rows.append(CheckRow(name, "", "lam0_max_abs_diff", 0.0, lam0, t0,
                             lam0 is not None and math.isfinite(lam0) and lam0 <= t0))
        for metric, es in (exp.get("scores") or {}).items():
            gs = (got.get("scores") or {}).get(metric)
            t = float(es.get("tolerance", exp.get("tolerance", {}).get("score", tol["score"])))
            for f in SCORE_FIELDS:
                if f not in es:
                    continue
                e = float(es[f])
                g = None if gs is None or gs.get(f) is None else float(gs[f])
                ok = g is not None and math.isfinite(g) and abs(g - e) <= t + 1e-9
                rows.append(CheckRow(name, metric, f, e, g, t, ok))
    return rows


def read_json(path: Union[str, Path], what: str) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise PatchCSRAError(f"{what} {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise PatchCSRAError(f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno})") from None


def write_json(record: dict, path: Union[str, Path], *, force: bool = False) -> Path:
    """Write ``record`` atomically; refuses to overwrite without ``force``."""
    return _io.write_json(path, record, force=force, indent=2)


# ----------------------------------------------------------------------------- README figures (one source of truth)
#: README.md blocks generated from an expected file: ``<!-- figures:NAME -->`` ... ``<!-- /figures:NAME -->``
README_BLOCKS = ("demo", "suite")


def _fmt_delta(sc: dict, key: str) -> str:
    lo, hi = sc[f"{key}_ci"]
    return f"{sc[f'{key}_delta']:+.2f}, 95% CI [{lo:+.2f}, {hi:+.2f}]"


def readme_figures(expected: dict) -> dict[str, str]:
    """The README's reference-figure blocks, rendered from an expected (or result) record.

    ``demo``: one sentence with the embedded default's mAP; ``suite``: a Markdown table, one row per case and
    metric (baseline, fixed / oracle / cross-validated λ with their scores and Δ).
    """
    cases = expected.get("cases") or {}
    out = {}
    d = (cases.get("demo") or {}).get("scores", {}).get("mAP")
    if d:
        out["demo"] = (f"Reference figures (`benchmarks/expected.json`, CPU): test mAP **{d['baseline']:.2f} → "
                       f"{d['fixed']:.2f}** at the paper's fixed λ = {d['fixed_lam']:g} ({_fmt_delta(d, 'fixed')}); "
                       f"cross-validated λ = {d['cv_lam']:g}: {d['cv']:.2f}; oracle λ = {d['oracle_lam']:g}: "
                       f"{d['oracle']:.2f}.")
    rows = ["| case | images | metric | baseline | fixed λ | oracle λ, T | CV λ, T |", "|---|---|---|---|---|---|---|"]
    for name, rec in cases.items():
        for metric, sc in (rec.get("scores") or {}).items():
            rows.append(f"| {name} | {rec.get('images', '')} | {metric} | {sc['baseline']:.2f} | "
                        f"{sc['fixed']:.2f} ({sc['fixed_delta']:+.2f}) @ {sc['fixed_lam']:g} | "
                        f"{sc['oracle']:.2f} ({sc['oracle_delta']:+.2f}) @ {sc['oracle_lam']:g}, {sc['oracle_T']} | "
                        f"{sc['cv']:.2f} ({sc['cv_delta']:+.2f}) @ {sc['cv_lam']:g}, {sc['cv_T']} |")
    env = expected.get("environment") or {}
    kern = env.get("kernels") or {}
    rows.append("")
    rows.append(f"Recorded with torch {env.get('torch')}, timm {env.get('timm')}, python {env.get('python')}, "
                f"{env.get('threads')} threads, CPU kernels {kern.get('aten', '?')} / oneDNN "
                f"{kern.get('onednn_isa', '?')}.")
    out["suite"] = "\n".join(rows)
    return out


def sync_readme(text: str, expected: dict) -> str:
    """``text`` (README.md) with every figures block replaced by :func:`readme_figures` of ``expected``.

    Raises:
        PatchCSRAError: a block's markers are missing.
    """
    import re

    for name, body in readme_figures(expected).items():
        pat = re.compile(rf"(<!-- figures:{name} [^\n]*-->\n).*?(<!-- /figures:{name} -->)", re.S)
        if not pat.search(text):
            raise PatchCSRAError(f"README has no '<!-- figures:{name} ... -->' ... '<!-- /figures:{name} -->' block")
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text, count=1)
    return text

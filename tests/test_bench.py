"""The regression gate: suites as data, the check's verdicts, and the CLI's exit codes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from patchcsra import bench as B
from patchcsra.cli import app
from patchcsra.errors import PatchCSRAError

runner = CliRunner()


def _record(base=80.0, fixed=81.0, gap=0.0):
    sc = {"baseline": base, "fixed": fixed, "oracle": fixed + 0.2, "cv": fixed + 0.1}
    return {"suite": "t", "cases": {"a": {"images": 10, "lam0_max_abs_diff": gap, "seconds": 1.0,
                                          "scores": {"mAP": dict(sc)}}}}


def test_check_passes_within_tolerance_and_fails_beyond():
    exp = _record()
    assert all(r.ok for r in B.check_results(_record(base=80.04), exp))
    rows = B.check_results(_record(fixed=81.2), exp)
    bad = [(r.case, r.metric, r.field) for r in rows if not r.ok]
    assert bad == [("a", "mAP", "fixed"), ("a", "mAP", "oracle"), ("a", "mAP", "cv")]
    assert rows[2].diff == pytest.approx(0.2)
    # a per-metric tolerance overrides the suite's
    loose = copy.deepcopy(exp)
    loose["cases"]["a"]["scores"]["mAP"]["tolerance"] = 0.5
    assert all(r.ok for r in B.check_results(_record(fixed=81.2), loose))


def test_check_fails_on_lam0_gap_missing_case_and_nan():
    exp = _record()
    assert [r.field for r in B.check_results(_record(gap=1e-3), exp) if not r.ok] == ["lam0_max_abs_diff"]
    assert [r.field for r in B.check_results({"cases": {}}, exp) if not r.ok] == ["case missing"]
    got = _record()
    got["cases"]["a"]["scores"]["mAP"]["cv"] = float("nan")
    assert [r.field for r in B.check_results(got, exp) if not r.ok] == ["cv"]
    del got["cases"]["a"]["scores"]["mAP"]
    assert len([r for r in B.check_results(got, exp) if not r.ok]) == 4


def test_suite_files_are_checked(tmp_path):
    assert B.load_suite("demo").cases[0]["kind"] == "demo"
    with pytest.raises(PatchCSRAError, match="neither a built-in suite"):
        B.load_suite(str(tmp_path / "nope.json"))
    p = tmp_path / "s.json"
    p.write_text('{"cases": [{"name": "x", "kind": "teleport"}]}')
    with pytest.raises(PatchCSRAError, match="'kind' in demo, sweep, train-sweep"):
        B.load_suite(p)
    p.write_text('{"cases": [{"name": "x", "kind": "demo"}, {"name": "x", "kind": "demo"}]}')
    with pytest.raises(PatchCSRAError, match="used twice"):
        B.load_suite(p)
    p.write_text("{oops")
    with pytest.raises(PatchCSRAError, match="not valid JSON"):
        B.load_suite(p)


def test_ci_suite_points_at_real_files():
    from conftest import REPO, shared_path

    shared_path("weights")  # skips only where ../shared is absent
    st = B.load_suite(REPO / "benchmarks" / "ci.json")
    assert [c["name"] for c in st.cases] == ["demo", "cifar10-resnet20", "cifar10-resnet56", "voc07-mobilenetv2-linear"]
    for c in st.cases[1:]:
        assert st.path(c["source"]).is_file() and st.path(c["data"]).exists()
        assert st.path(c["arch"].rsplit(":", 1)[0]).is_file()
    exp = json.loads((REPO / "benchmarks" / "expected.json").read_text())
    assert set(exp["cases"]) == {c["name"] for c in st.cases}


def test_lam0_gap_is_zero_for_an_exact_patch_and_sees_a_broken_one(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert B.lam0_gap(model, x) == 0.0
    import patchcsra.patcher as P

    monkeypatch.setattr(P, "patch", lambda m, **kw: (lambda t: m(t) + 0.01))
    assert B.lam0_gap(model, x) == pytest.approx(0.01, rel=1e-3)


def test_cli_bench_runs_a_tiny_suite_and_gates(tmp_path):
    suite = tmp_path / "tiny.json"
    suite.write_text(json.dumps({"name": "tiny", "cases": [
        {"name": "demo", "kind": "demo", "n_train": 200, "n_test": 80, "epochs": 1}]}))
    out = tmp_path / "got.json"
    res = runner.invoke(app, ["bench", str(suite), "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    rec = got["cases"]["demo"]
    assert rec["images"] == 80 and rec["lam0_max_abs_diff"] == 0.0 and set(rec["scores"]) == {"mAP"}
    assert got["environment"]["torch"] == torch.__version__
    again = runner.invoke(app, ["bench", str(suite), "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    # the same result checks clean against itself; a moved expectation fails with exit 1 and a diff table
    ok = runner.invoke(app, ["bench", "--results", str(out), "--check", str(out)])
    assert ok.exit_code == 0 and "checks passed" in ok.output
    moved = copy.deepcopy(got)
    moved["cases"]["demo"]["scores"]["mAP"]["baseline"] += 1.0
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps(moved))
    bad = runner.invoke(app, ["bench", "--results", str(out), "--check", str(exp)])
    assert bad.exit_code == 1 and "FAIL" in bad.output and "regression" in bad.output
    missing = runner.invoke(app, ["bench", "--results", str(out), "--check", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def _full(record: dict) -> dict:
    """``record`` with every field the result table prints (λ, T and Δ of each choice)."""
    sc = record["cases"]["a"]["scores"]["mAP"]
    for k in ("fixed", "oracle", "cv"):
        sc.update({f"{k}_lam": 0.2, f"{k}_T": "inf", f"{k}_delta": sc[k] - sc["baseline"], f"{k}_ci": [0.0, 1.0]})
    return record


def test_check_failure_names_the_environment_that_moved(tmp_path):
    got, exp = _full(_record(base=80.0)), _full(_record(base=81.0))
    got["environment"] = {"torch": "2.14.1", "packages": {"pillow": "13.0.0", "numpy": "2.4.6"},
                          "kernels": {"onednn_isa": "avx512_core"}, "command": "patchcsra bench x"}
    exp["environment"] = {"torch": "2.14.1", "packages": {"pillow": "12.0.0", "numpy": "2.4.6"},
                          "kernels": {"onednn_isa": "avx2"}, "command": "other"}
    (tmp_path / "got.json").write_text(json.dumps(got))
    (tmp_path / "exp.json").write_text(json.dumps(exp))
    r = runner.invoke(app, ["bench", "--results", str(tmp_path / "got.json"), "--check", str(tmp_path / "exp.json")])
    said = " ".join(r.output.split())
    assert r.exit_code == 1 and "packages.pillow 12.0.0 -> 13.0.0" in said and "kernels.onednn_isa avx2 -> avx512_core" in said
    assert "numpy" not in said and "command" not in said.split("environment differs")[1]

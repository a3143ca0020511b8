"""Provenance: what can move a figure is recorded, and a diff names it."""
from __future__ import annotations

import copy

import torch

from patchcsra.provenance import FIGURE_PACKAGES, environment, environment_diff, kernel_set


def test_environment_records_versions_kernels_threads_and_command(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    env = environment(command=["patchcsra", "bench", "a b.json"])
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert set(FIGURE_PACKAGES) <= set(env["packages"]) and env["packages"]["numpy"]
    assert env["command"] == "patchcsra bench 'a b.json'"
    k = env["kernels"]
    assert k["aten"] == torch.backends.cpu.get_cpu_capability() and k["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert k["cpu"] and "onednn_isa" in k and "mkl" in k


def test_onednn_cap_lowers_the_isa(monkeypatch):
    from patchcsra import provenance as P

    flags = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "avx", "sse4_1"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert P._onednn_isa(flags) == "avx512_core"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert P._onednn_isa(flags) == "avx2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a cap above what the CPU has changes nothing
    assert P._onednn_isa(flags) == "avx512_core"
    assert P._onednn_isa(frozenset({"sse4_1"})) == "sse41"


def test_diff_names_what_moved_and_ignores_the_command():
    a = environment(command=["x"])
    b = copy.deepcopy(a)
    assert environment_diff(a, b) == []
    b["command"] = "y"
    b["packages"]["pillow"] = "0.0.1"
    b["kernels"]["onednn_isa"] = "not-an-isa"
    got = dict((k, (x, y)) for k, x, y in environment_diff(a, b))
    assert set(got) == {"packages.pillow", "kernels.onednn_isa"}
    assert got["packages.pillow"] == (a["packages"]["pillow"], "0.0.1")
    old = {"torch": a["torch"], "threads": 2}  # an older record: facts it lacks are listed, not hidden
    assert ("packages.numpy", None, a["packages"]["numpy"]) in environment_diff(old, a)


def test_kernel_set_is_cheap_to_ask_twice():
    assert kernel_set() == kernel_set()

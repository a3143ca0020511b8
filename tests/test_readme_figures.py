"""One source of truth: README.md's reference figures are rendered from benchmarks/expected.json."""
from __future__ import annotations

import copy
import json

import pytest

from patchcsra.bench import readme_figures, sync_readme
from patchcsra.errors import PatchCSRAError

from conftest import REPO


def _expected() -> dict:
    return json.loads((REPO / "benchmarks" / "expected.json").read_text())


def test_readme_figures_equal_expected_json():
    text = (REPO / "README.md").read_text()
    assert sync_readme(text, _expected()) == text, "run: python benchmarks/sync_readme.py"
    demo = _expected()["cases"]["demo"]["scores"]["mAP"]
    assert f"**{demo['baseline']:.2f} → {demo['fixed']:.2f}**" in text


def test_a_moved_figure_makes_the_readme_stale():
    text = (REPO / "README.md").read_text()
    moved = copy.deepcopy(_expected())
    moved["cases"]["demo"]["scores"]["mAP"]["baseline"] += 0.5
    assert sync_readme(text, moved) != text
    assert readme_figures(moved)["demo"] != readme_figures(_expected())["demo"]
    with pytest.raises(PatchCSRAError, match="figures:demo"):
        sync_readme("no markers here", moved)

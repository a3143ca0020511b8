"""patchcsra.options: options as frozen dataclasses, checked once, merged from flat keywords."""
from __future__ import annotations

import dataclasses
import math

import pytest

from patchcsra.errors import PatchCSRAError
from patchcsra.options import (DEFAULT_LAMS, CollectOptions, ModelSource, SweepOptions, TransformOverrides,
                               split_options)


def test_flat_keywords_land_in_their_dataclass():
    tf, co, so = split_options({"img_size": 448, "workers": 0, "lams": [0, 0.2], "seed": 3})
    assert tf.img_size == 448 and co.workers == 0 and so.lams == (0.0, 0.2) and so.seed == 3
    assert so.temperatures == (math.inf,) and co.batch_size == 32 and tf.crop_pct is None
    base = CollectOptions(batch_size=8)
    assert split_options({"device": "cpu"}, collect=base)[1] == CollectOptions(batch_size=8, device="cpu")
    with pytest.raises(TypeError, match="unexpected keyword argument 'lam'"):
        split_options({"lam": 0.1})
    with pytest.raises(TypeError, match="'workers'"):
        split_options({"workers": 0}, allowed=(TransformOverrides,))


def test_options_are_frozen_and_checked_when_built():
    so = SweepOptions()
    assert so.lams == DEFAULT_LAMS
    with pytest.raises(dataclasses.FrozenInstanceError):
        so.seed = 1  # type: ignore[misc]
    with pytest.raises(PatchCSRAError, match="lams=-0.1 is invalid") as e:
        SweepOptions(lams=(0, -0.1))
    assert e.value.param == "lams"
    with pytest.raises(PatchCSRAError, match="temperatures=nan") as e:
        SweepOptions(temperatures=(math.inf, math.nan))
    assert e.value.param == "temperatures"
    with pytest.raises(PatchCSRAError, match="lams is empty"):
        SweepOptions(lams=())
    with pytest.raises(PatchCSRAError, match="batch_size=0") as e:
        CollectOptions(batch_size=0)
    assert e.value.param == "batch_size"
    with pytest.raises(PatchCSRAError, match="fixed_lam"):
        SweepOptions(fixed_lam=math.inf)


def test_model_source_names_and_files(tmp_path):
    assert ModelSource("timm:resnet50").name == "resnet50" and not ModelSource("timm:resnet50").is_file
    f = tmp_path / "w.pth"
    f.write_bytes(b"")
    assert ModelSource(f).name == "w.pth" and ModelSource(f).is_file

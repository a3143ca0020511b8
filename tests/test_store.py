"""Statistics on disk (patchcsra.store), blocked evaluation (patchcsra.blocked) and sparse labels."""
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from patchcsra import blocked as B
from patchcsra.errors import PatchCSRAError
from patchcsra.grid import evaluate_grid, sweep
from patchcsra.protocols import PROTOCOLS
from patchcsra.stats import Stats
from patchcsra.store import FLOAT16_RELATIVE_ERROR, SparseStats, StatsWriter, open_stats, save_stats, to_sparse

TEMPS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.inf)
LAMS = (0.0, 0.1, 0.5)


def _stats(n=60, c=7, single=False, seed=0, temps=(1.0, math.inf), avgmax=True, ignored=0.15) -> Stats:
    g = np.random.default_rng(seed)
    base = np.round(g.normal(size=(n, c)), 1).astype(np.float32)       # rounded: many ties
    s = np.round(g.normal(size=(n, c, 5)), 1).astype(np.float32)
    mx = s.max(-1)
    att = np.stack([mx if math.isinf(t) else (s * np.exp(t * s) / np.exp(t * s).sum(-1, keepdims=True)).sum(-1)
                    for t in temps], axis=-1).astype(np.float32)
    if single:
        lab = g.integers(0, c, n)
        targets = np.eye(c, dtype=np.int8)[lab]
        base[np.arange(n), lab] += 1.0
    else:
        targets = (g.random((n, c)) < 0.3).astype(np.int8)
        targets[g.random((n, c)) < ignored] = -1
        targets[:, 1] = 0                       # a class without positives
        targets[:, 2] = np.where(targets[:, 2] == 1, -1, targets[:, 2])
        base[targets == 1] += 0.5
    ok = np.ones(n, bool)
    ok[3] = False
    am = torch.from_numpy(0.5 * (base + mx)) if avgmax else None
    return Stats(torch.from_numpy(base), torch.from_numpy(mx), torch.from_numpy(att), tuple(temps), targets, ok,
                 tuple(f"im{i}" for i in range(n)), tuple(f"c{j}" for j in range(c)), single, {"k": 1}, am)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(B, "BLOCK_ENTRIES", 3 * 60)   # 3 classes per block of 60 images


def _same_frame(a: pd.DataFrame, b: pd.DataFrame, tol: float = 0.0) -> None:
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        x, y = a[col].to_numpy(np.float64), b[col].to_numpy(np.float64)
        assert np.allclose(x, y, rtol=0, atol=tol, equal_nan=True) if tol else \
            np.array_equal(x, y, equal_nan=True), col


def test_round_trip_float32_exact_and_views(tmp_path):
    st = _stats(temps=TEMPS)
    save_stats(st, tmp_path / "s")
    op = open_stats(tmp_path / "s")
    assert op.store is not None and isinstance(op.base, torch.Tensor)
    assert torch.equal(op.base, st.base) and torch.equal(op.max, st.max) and torch.equal(op.avgmax, st.avgmax)
    for t in TEMPS:
        assert torch.equal(op.att_for(t), st.att_for(t))
    assert np.array_equal(np.asarray(op.targets), st.targets) and np.array_equal(op.ok, st.ok)
    assert op.ids == st.ids and op.classes == st.classes and op.temperatures == st.temperatures
    assert op.meta == {"k": 1} and not op.single_label
    assert not (tmp_path / "s" / "max.bin").exists()          # max is att's inf slot, not stored twice
    with pytest.raises(PatchCSRAError, match="exists"):
        save_stats(st, tmp_path / "s")
    save_stats(st, tmp_path / "s", force=True)


def test_round_trip_float16_within_stated_error(tmp_path):
    st = _stats(temps=TEMPS)
    op = open_stats(save_stats(st, tmp_path / "h", dtype="float16"))
    assert (tmp_path / "h" / "base.bin").stat().st_size == st.base.numel() * 2
    rd = B.reader(op)
    got, want = rd.read("base", 0, rd.c).T, st.base.numpy()
    big = np.abs(want) >= 6.1e-5
    assert np.all(np.abs(got - want)[big] <= FLOAT16_RELATIVE_ERROR * np.abs(want)[big])
    a, b = evaluate_grid(st, LAMS), evaluate_grid(op, LAMS)
    assert np.allclose(a["mAP"], b["mAP"], atol=1.0)
    with pytest.raises(PatchCSRAError, match="float16"):
        save_stats(Stats(st.base * 1e5, st.max, st.att, st.temperatures, st.targets, st.ok, st.ids, st.classes,
                         False), tmp_path / "big", dtype="float16")


@pytest.mark.parametrize("buffer", [0, 1, 2000])
def test_writer_in_row_blocks_equals_save_stats(tmp_path, monkeypatch, buffer):
    import patchcsra.store as S

    if buffer:
        monkeypatch.setattr(S, "ROW_BUFFER_BYTES", buffer)    # 1: every call written at once; 2000: a few rows
    st = _stats(temps=TEMPS)
    save_stats(st, tmp_path / "a")
    n, c = st.base.shape
    starts = list(range(0, n, 7))
    starts = starts[3:] + starts[:3]                            # out of order: the gathered run breaks
    with StatsWriter(tmp_path / "b", n, c, TEMPS, avgmax=True) as w:
        rows = {k: torch.zeros(7, *v.shape[1:]) for k, v in (("base", st.base), ("max", st.max),
                                                                ("att", st.att), ("avgmax", st.avgmax))}
        for a in starts:
            r = slice(a, a + 7)
            b = len(range(n)[r])
            for k in rows:                                      # one reused buffer, as a collection pass has
                rows[k][:b] = getattr(st, k)[r]
            w.write_rows(a, {**{k: v[:b] for k, v in rows.items()}, "ok": torch.from_numpy(st.ok[r])})
        op = w.finish(ids=st.ids, classes=st.classes, meta={"k": 1}, targets=st.targets)
    for name in ("base.bin", "att.bin", "avgmax.bin", "targets.bin", "ok.bin", "header.json", "ids.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert torch.equal(op.base, st.base)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary left


def test_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StatsWriter(tmp_path / "x", 10, 3, (math.inf,)) as w:
            w.write_rows(0, {"base": torch.zeros(4, 3)})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("protocol,single", [(p, False) for p in PROTOCOLS] + [("patchcsra", True), ("csra", True)])
def test_blocked_equals_in_memory(tmp_path, small_blocks, protocol, single):
    st = _stats(single=single)
    want = evaluate_grid(st, LAMS, (1.0, math.inf), protocol=protocol)
    op = open_stats(save_stats(st, tmp_path / "s"))
    got = evaluate_grid(op, LAMS, (1.0, math.inf), protocol=protocol)
    _same_frame(want, got)
    rows = st.ok.copy()
    rows[::4] = False
    w = np.random.default_rng(1).multinomial(int(rows.sum()), np.ones(int(rows.sum())) / rows.sum(), size=5)
    from patchcsra import metrics as M
    from patchcsra.grid import _metrics

    a = _metrics(st, st.scores(0.5, 1.0), rows, 3, w.astype(np.int32), PROTOCOLS[protocol])
    b = B.blocked_metrics(op, B.Scores("lam", 0.5, 1.0), rows, protocol, sample_weight=w.astype(np.int32))
    assert list(a) == list(b)
    for k in a:
        assert np.allclose(a[k], b[k], rtol=0, atol=1e-12, equal_nan=True), k
    assert np.array_equal(M.protocol_average_precision(st.scores(0.5, 1.0).numpy()[rows], st.targets[rows], protocol),
                          B.per_class_ap(op, B.Scores("lam", 0.5, 1.0), rows, protocol), equal_nan=True)


def test_sweep_on_store_equals_in_memory(tmp_path, small_blocks):
    st = _stats(temps=TEMPS)
    kw = dict(lams=LAMS, temperatures=(1.0, math.inf), folds=3, bootstrap=60, seed=2, protocol="csra")
    a = sweep(st, **kw)
    b = sweep(open_stats(save_stats(st, tmp_path / "s")), **kw)
    _same_frame(a.frame, b.frame)
    assert a.choices == b.choices and a.comparators == b.comparators and a.band == b.band
    pd.testing.assert_frame_equal(a.per_class, b.per_class, check_dtype=False)
    assert b.settings["evaluated_in_blocks"] and a.baseline == b.baseline


def test_large_in_ram_stats_use_blocks(monkeypatch):
    st = _stats()
    want = evaluate_grid(st, LAMS)
    monkeypatch.setattr(B, "BLOCKED_MIN_ENTRIES", 10)
    monkeypatch.setattr(B, "BLOCK_ENTRIES", 120)
    assert B.use_blocked(st)
    _same_frame(want, evaluate_grid(st, LAMS))


@pytest.mark.parametrize("protocol", [p for p, v in PROTOCOLS.items() if v.ignored == v.ap_ignored == "remove"])
def test_sparse_equals_dense_with_ignored(tmp_path, protocol):
    st = _stats(n=80, c=9, ignored=0.6)
    sp = to_sparse(st)
    assert isinstance(sp, SparseStats) and sp.nnz == int((st.targets != -1).sum())
    want = evaluate_grid(st, LAMS, (1.0, math.inf), protocol=protocol)
    got = evaluate_grid(sp, LAMS, (1.0, math.inf), protocol=protocol)
    assert not [c for c in got.columns if "top" in c]          # top-k: not available on sparse stats
    _same_frame(want[list(got.columns)], got)
    back = open_stats(save_stats(sp, tmp_path / "sp"))
    assert isinstance(back, SparseStats)
    _same_frame(got, evaluate_grid(back, LAMS, (1.0, math.inf), protocol=protocol))


def test_sparse_refuses_negative_protocols_and_sweep():
    sp = to_sparse(_stats())
    with pytest.raises(PatchCSRAError, match="labelled entries"):
        evaluate_grid(sp, LAMS, protocol="asl")
    with pytest.raises(PatchCSRAError, match="evaluate_grid"):
        sweep(sp)


def test_truncated_file_and_header_mismatch(tmp_path):
    st = _stats()
    folder = save_stats(st, tmp_path / "s")
    att = folder / "att.bin"
    data = att.read_bytes()
    att.write_bytes(data[:-4])
    with pytest.raises(PatchCSRAError, match=r"att\.bin has .* bytes.*save_stats") as e:
        open_stats(folder)
    assert "\n" not in str(e.value)
    att.write_bytes(data)
    h = folder / "header.json"
    h.write_text(h.read_text().replace('"n": 60', '"n": 61'))
    with pytest.raises(PatchCSRAError, match=r"header\.json does not match its digest"):
        open_stats(folder)
    with pytest.raises(PatchCSRAError, match=r"header\.json is missing"):
        open_stats(tmp_path)


def test_collect_past_the_store_limit_keeps_stats_on_disk(tmp_path, caplog):
    """A cached pass over the store limit fills row files, writes a class-major store in the cache entry and returns
    it memory-mapped: every tensor equals the in-RAM pass bit for bit, and so do results.csv and per_class.csv; the
    next pass opens the store with zero forward passes; a changed part makes it build the store again."""
    from patchcsra.api import prepare, sweep_lambda
    from patchcsra.options import CollectOptions
    from patchcsra.stats import collect
    from test_sweep import _folder, _tiny_model

    data = _folder(tmp_path / "data", n_per_class=5)
    model = _tiny_model()
    ram = sweep_lambda(model, data, options=CollectOptions(batch_size=4, cache_dir=None))
    disk_opts = CollectOptions(batch_size=4, save_every=4, cache_dir=tmp_path / "cache", store_above=0)
    disk = sweep_lambda(model, data, options=disk_opts)
    assert disk.stats.store is not None and ram.stats.store is None
    entry = Path(disk.stats.meta["cache"])
    assert (entry / "store" / "header.json").exists() and not (entry / "rows.tmp").exists()
    for name in ("base", "max", "att", "avgmax"):
        assert torch.equal(getattr(disk.stats, name).contiguous(), getattr(ram.stats, name).contiguous()), name
    assert np.array_equal(np.asarray(disk.stats.targets), ram.stats.targets)
    ram.write(tmp_path / "r_ram")
    disk.write(tmp_path / "r_disk")
    for f in ("results.csv", "per_class.csv"):
        assert (tmp_path / "r_ram" / f).read_bytes() == (tmp_path / "r_disk" / f).read_bytes(), f
    assert disk.stats.meta["forward_images"] == 15

    prep = prepare(model, data)
    again = collect(prep.patched, prep.dataset, class_index=prep.class_index, options=disk_opts,
                    fingerprint={"source": "test"})
    fresh = collect(prep.patched, prep.dataset, class_index=prep.class_index, options=disk_opts,
                    fingerprint={"source": "test"})
    assert fresh.store is not None and fresh.meta["forward_images"] == 0
    assert fresh.store.folder == again.store.folder and torch.equal(fresh.base.contiguous(), again.base.contiguous())
    built = (again.store.folder / "header.json").stat().st_mtime_ns
    part = sorted(Path(again.meta["cache"]).glob("part-*.pt"))[0]
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10 ** 9))  # a part changed on disk
    rebuilt = collect(prep.patched, prep.dataset, class_index=prep.class_index, options=disk_opts,
                      fingerprint={"source": "test"})
    assert (rebuilt.store.folder / "header.json").stat().st_mtime_ns != built
    assert torch.equal(rebuilt.base.contiguous(), again.base.contiguous())
    with pytest.raises(PatchCSRAError, match="store_above"):
        CollectOptions(store_above=-1)


def test_a_pass_over_the_store_limit_without_a_cache_says_it_stays_in_ram(tmp_path, caplog):
    from patchcsra.api import sweep_lambda
    from patchcsra.options import CollectOptions
    from test_sweep import _folder, _tiny_model

    data = _folder(tmp_path / "data", n_per_class=2)
    with caplog.at_level("WARNING"):
        run = sweep_lambda(_tiny_model(), data, options=CollectOptions(batch_size=4, cache_dir=None, store_above=0))
    assert run.stats.store is None
    said = [r.getMessage() for r in caplog.records if "held in RAM" in r.getMessage()]
    assert len(said) == 1 and "drop --no-cache" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        sweep_lambda(_tiny_model(), data, options=CollectOptions(batch_size=4, cache_dir=None))  # under the limit
    assert not [r for r in caplog.records if "held in RAM" in r.getMessage()]


def test_no_room_for_the_store_reads_the_row_files_instead(tmp_path, caplog, monkeypatch):
    """The store cannot be written (ENOSPC): one warning, and the sweep runs on the row files' values, equal to RAM."""
    import errno

    from patchcsra import stats_disk
    from patchcsra.api import sweep_lambda
    from patchcsra.options import CollectOptions
    from test_sweep import _folder, _tiny_model

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache"))

    data = _folder(tmp_path / "data", n_per_class=3)
    ram = sweep_lambda(_tiny_model(), data, options=CollectOptions(batch_size=4, cache_dir=None))
    monkeypatch.setattr(stats_disk, "build_store", full)
    with caplog.at_level("WARNING"):
        disk = sweep_lambda(_tiny_model(), data, options=CollectOptions(batch_size=4, cache_dir=tmp_path / "cache",
                                                                        store_above=0))
    assert disk.stats.store is None
    assert [r for r in caplog.records if "cannot be written" in r.getMessage() and "ENOSPC" in r.getMessage()]
    for name in ("base", "max", "att"):
        assert torch.equal(getattr(disk.stats, name), getattr(ram.stats, name)), name

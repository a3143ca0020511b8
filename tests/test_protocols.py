"""Named metric protocols against small transcriptions of each project's published formulas, and the guards
(probability scores, single-label heads, the CV note) in sweep settings and table captions.

The reference functions below are written from the formulas, loop by loop, independently of
:mod:`patchcsra.metrics`: sort-based AP (CSRA / ML-GCN ``average_precision``, mmpretrain ``_average_precision``,
ASL ``average_precision``), the VOC devkit's 11-point (VOC2007) and area-under-envelope (VOC2010+) AP, ML-GCN's
``evaluation`` (CP/CR/CF1/OP/OR/OF1 with difficult as negatives) and mmpretrain/ASL's macro F1.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from patchcsra import metrics as M
from patchcsra.errors import PatchCSRAError
from patchcsra.grid import sweep
from patchcsra.protocols import PROTOCOLS, Protocol, conventions_text, get_protocol
from patchcsra.report import table_caption
from patchcsra.stats import Stats


# ----------------------------------------------------------------------------- reference transcriptions
def ref_sorted_ap(scores, target, skip_ignored=True, reverse_ties=False):
    """ML-GCN / CSRA / mmpretrain: sort descending, skip difficult, precision at each positive / #positives.
    ``reverse_ties``: numpy ``argsort()[::-1]`` (ASL), i.e. equal scores with the later image first."""
    n = len(scores)
    if reverse_ties:
        order = list(np.argsort(scores, kind="stable")[::-1])
    else:
        order = sorted(range(n), key=lambda i: -scores[i])   # Python sort is stable: ties in image order
    pos = total = 0
    acc = 0.0
    for i in order:
        if skip_ignored and target[i] == -1:
            continue
        total += 1
        if target[i] == 1:
            pos += 1
            acc += pos / total
    return math.nan if pos == 0 else acc / pos


def ref_pr(scores, target):
    """The devkit's ``[~, si] = sort(-out); tp = cumsum(gt(si) > 0); fp = cumsum(gt(si) < 0)`` (difficult out)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = 0
    rec, prec = [], []
    npos = sum(1 for y in target if y == 1)
    for i in order:
        if target[i] == -1:
            continue
        tp += target[i] == 1
        fp += target[i] == 0
        rec.append(tp / npos)
        prec.append(tp / (tp + fp))
    return rec, prec


def ref_voc07(scores, target):
    """VOC2007 11-point: ``for t = 0:0.1:1, p = max(prec(rec >= t)) (0 if empty), ap += p / 11``."""
    rec, prec = ref_pr(scores, target)
    ap = 0.0
    for t in [i / 10 for i in range(11)]:
        ps = [p for r, p in zip(rec, prec) if r >= t]   # t = i / 10: recall 3/10 reaches t = 0.3
        ap += (max(ps) if ps else 0.0) / 11
    return ap


def ref_voc2010(scores, target):
    """VOC2010+ ``VOCap``: ``mrec = [0 rec 1]; mpre = [0 prec 0]``, envelope from the right, sum over recall steps."""
    rec, prec = ref_pr(scores, target)
    mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def ref_mlgcn_eval(scores, targets):
    """ML-GCN ``AveragePrecisionMeter.evaluation``: difficult (-1) -> 0, predicted iff score >= 0 (logits)."""
    t = np.where(targets == -1, 0, targets)
    n_class = t.shape[1]
    Nc, Np, Ng = np.zeros(n_class), np.zeros(n_class), np.zeros(n_class)
    for k in range(n_class):
        Ng[k] = np.sum(t[:, k] == 1)
        Np[k] = np.sum(scores[:, k] >= 0)
        Nc[k] = np.sum(t[:, k] * (scores[:, k] >= 0))
    Np[Np == 0] = 1
    OP, OR = np.sum(Nc) / np.sum(Np), np.sum(Nc) / np.sum(Ng)
    CP, CR = np.sum(Nc / Np) / n_class, np.sum(Nc / Ng) / n_class
    return {"CP": CP, "CR": CR, "CF1": 2 * CP * CR / (CP + CR), "OP": OP, "OR": OR, "OF1": 2 * OP * OR / (OP + OR)}


def ref_mlgcn_topk_scores(scores, k):
    """ML-GCN ``overall_topk``: -1 everywhere but the top k (``torch.topk``; ties: lower index) with score >= 0."""
    out = np.full(scores.shape, -1.0)
    for i, row in enumerate(scores):
        idx = sorted(range(len(row)), key=lambda j: -row[j])[:k]
        for j in idx:
            out[i, j] = 1.0 if row[j] >= 0 else -1.0
    return out


def ref_mean_f1(pred, targets, empty="zero"):
    """mmpretrain / ASL macro F1: per class F1 = 2PR/(P+R) (0 when undefined), averaged over classes."""
    f1s, ps, rs = [], [], []
    for k in range(targets.shape[1]):
        keep = targets[:, k] >= 0
        y, p = targets[keep, k] == 1, pred[keep, k]
        tp = np.sum(y & p)
        P = tp / p.sum() if p.sum() else 0.0
        R = tp / y.sum() if y.sum() else 0.0
        if empty == "skip" and y.sum() == 0:
            continue
        ps.append(P)
        rs.append(R)
        f1s.append(2 * P * R / (P + R) if P + R else 0.0)
    return np.mean(ps), np.mean(rs), np.mean(f1s)


# ----------------------------------------------------------------------------- fixed cases
# 6 images x 4 classes: ties inside a class (class 0: 0.9 twice, the positive first, then a negative), an ignored entry
# (class 1, image 2), a class without positives (class 3), saturated equal logits (class 2: 20.0 four times)
SCORES = np.array([[0.9, 2.0, 20.0, -1.0],
                   [0.9, 1.0, 20.0, -2.0],
                   [0.3, 3.0, 20.0, 0.5],
                   [-0.5, -1.0, 20.0, 0.1],
                   [-2.0, 0.2, -3.0, -0.3],
                   [0.1, -0.4, -1.0, 0.7]])
TARGETS = np.array([[1, 1, 0, 0],
                    [0, 0, 1, 0],
                    [1, -1, 0, 0],
                    [0, 0, 1, 0],
                    [1, 1, 0, 0],
                    [0, 0, 1, 0]])


def _random_case(seed, n=40, c=5, ties=True):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, c))
    if ties:
        s = np.round(s, 1)
    t = (rng.random((n, c)) < 0.35).astype(int)
    t[rng.random((n, c)) < 0.1] = -1
    t[:, 0] = np.where(t[:, 0] == -1, -1, t[:, 0])
    t[:, 0][0] = 1
    return s, t


@pytest.mark.parametrize("name", ["csra", "mlgcn", "mmpretrain", "coco"])
def test_sort_based_ap_equals_the_reference_loop(name):
    for seed in range(4):
        s, t = _random_case(seed)
        ap = M._ap_protocol_rows(s, t.astype(np.int8), PROTOCOLS[name])
        ref = [ref_sorted_ap(s[:, k], t[:, k]) for k in range(s.shape[1])]
        np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)


def test_asl_ap_reverse_ties_and_no_ignore_label():
    s, t = _random_case(5)
    ap = M._ap_protocol_rows(s, t.astype(np.int8), PROTOCOLS["asl"])
    ref = [ref_sorted_ap(s[:, k], t[:, k], skip_ignored=False, reverse_ties=True) for k in range(s.shape[1])]
    np.testing.assert_allclose(ap, ref, atol=1e-12)


@pytest.mark.parametrize("name,ref", [("voc07", ref_voc07), ("voc2010", ref_voc2010)])
def test_voc_devkit_ap(name, ref):
    for seed in range(4):
        s, t = _random_case(seed)
        ap = M._ap_protocol_rows(s, t.astype(np.int8), PROTOCOLS[name])
        np.testing.assert_allclose(ap, [ref(s[:, k], t[:, k]) for k in range(s.shape[1])], atol=1e-12)


def test_default_protocol_is_tie_aware_sklearn_and_differs_on_ties():
    k = 0  # class 0: 0.9 tied between a positive (image 0) and a negative (image 1)
    keep = TARGETS[:, k] >= 0
    ours = M.protocol_metrics(SCORES[:, [k]], TARGETS[:, [k]], top_k=None)["mAP"]
    assert ours == pytest.approx(100 * average_precision_score(TARGETS[keep, k], SCORES[keep, k]))
    csra = M.protocol_metrics(SCORES[:, [k]], TARGETS[:, [k]], "csra", top_k=None)["mAP"]
    assert csra == pytest.approx(100 * ref_sorted_ap(SCORES[:, k], TARGETS[:, k]))
    assert csra != pytest.approx(ours)
    # saturated logits (class 2: four equal 20.0): the sort order decides, tie-aware gives the group's precision
    assert M.protocol_metrics(SCORES[:, [2]], TARGETS[:, [2]], top_k=None)["mAP"] == pytest.approx(
        100 * average_precision_score(TARGETS[:, 2], SCORES[:, 2]))


def test_empty_class_policies_on_the_fixed_case():
    ours = M.protocol_metrics(SCORES, TARGETS)
    aps = [ref_sorted_ap(SCORES[:, k], TARGETS[:, k]) for k in range(3)]
    mm = M.protocol_metrics(SCORES, TARGETS, "mmpretrain")
    assert mm["mAP"] == pytest.approx(100 * (sum(aps) + 0.0) / 4)              # class 3 counts 0
    assert M.protocol_metrics(SCORES, TARGETS, "csra")["mAP"] == pytest.approx(100 * sum(aps) / 3)  # skipped
    nan = Protocol("mlgcn-nan", ties="first", ignored="negative", empty_classes="nan")
    assert math.isnan(M.protocol_metrics(SCORES, TARGETS, nan)["CR"])            # 0/0 as in ML-GCN's code
    assert math.isnan(M.protocol_metrics(SCORES, TARGETS, nan)["mAP"])
    assert not math.isnan(M.protocol_metrics(SCORES, TARGETS, "mlgcn")["CR"])    # the preset skips the class
    # ours: one policy, the class without positives is out of mAP and of CP/CR/CF1 alike
    pred = SCORES >= 0
    p, r, _ = ref_mean_f1(pred, TARGETS, empty="skip")
    assert ours["CP"] == pytest.approx(100 * p) and ours["CR"] == pytest.approx(100 * r)
    assert ours["CF1"] == pytest.approx(2 * ours["CP"] * ours["CR"] / (ours["CP"] + ours["CR"]))


def test_mlgcn_prf_counts_ignored_as_negatives():
    for seed in range(4):
        s, t = _random_case(seed, ties=False)
        t[0, :] = 1  # every class has a positive (ML-GCN divides by it)
        got = M.protocol_metrics(s, t, "mlgcn")
        ref = ref_mlgcn_eval(s, t)
        for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
            assert got[key] == pytest.approx(100 * ref[key], abs=1e-9), key
        ref3 = ref_mlgcn_eval(ref_mlgcn_topk_scores(s, 3), t)
        for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
            assert got[f"{key}_top3"] == pytest.approx(100 * ref3[key], abs=1e-9), key


def test_mean_f1_protocols_at_their_thresholds():
    for seed in range(3):
        s, t = _random_case(seed, ties=False)
        t[0, :] = 1
        mm = M.protocol_metrics(s, t, "mmpretrain")
        p, r, f = ref_mean_f1(1 / (1 + np.exp(-s)) >= 0.5, t)
        assert (mm["CP"], mm["CR"], mm["CF1"]) == pytest.approx((100 * p, 100 * r, 100 * f))
        asl = M.protocol_metrics(s, np.where(t < 0, 0, t), "asl")
        p, r, f = ref_mean_f1(1 / (1 + np.exp(-s)) >= 0.8, np.where(t < 0, 0, t))
        assert asl["CF1"] == pytest.approx(100 * f)


def test_top3_rules_and_cut_ties():
    s = np.array([[1.0, 1.0, 1.0, 1.0, -5.0]])   # four-way tie at the cut, all above 0.5
    ours = M.protocol_predictions(s, PROTOCOLS["patchcsra"], top_k=3)
    csra = M.protocol_predictions(s, PROTOCOLS["csra"], top_k=3)
    assert ours.tolist() == [[False, True, True, True, False]]      # higher class index wins
    assert csra.tolist() == [[True, True, True, False, False]]      # lower class index wins
    low = np.array([[2.0, -1.0, -2.0, -3.0]])                        # one class above 0.5
    assert M.protocol_predictions(low, PROTOCOLS["csra"], top_k=3).sum() == 1   # top 3 and >= 0.5
    assert M.protocol_predictions(low, PROTOCOLS["mmpretrain"], top_k=3).sum() == 3  # exactly three


def test_probability_scores_threshold_directly():
    prob = 1 / (1 + np.exp(-SCORES))
    a = M.protocol_metrics(SCORES, TARGETS, score_kind="logit")
    b = M.protocol_metrics(prob, TARGETS, score_kind="prob")
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert M.looks_like_probabilities(prob) and not M.looks_like_probabilities(SCORES)
    assert not M.looks_like_probabilities(np.full((3, 2), 0.5))


def test_weighted_protocol_ap_equals_repeated_rows():
    s, t = _random_case(7)
    w = M.bootstrap_weights(len(s), 6, seed=1)
    for name in ("csra", "voc07", "voc2010", "asl", "mmpretrain", "patchcsra"):
        got = M.protocol_metrics(s, t, name, sample_weight=w)
        for r in range(6):
            rep = np.repeat(np.arange(len(s)), w[r])
            one = M.protocol_metrics(s[rep], t[rep], name)
            for key in ("mAP", "CF1", "OF1_top3"):
                assert got[key][r] == pytest.approx(one[key], abs=1e-9, nan_ok=True), (name, key)


def test_protocol_lookup_and_validation():
    assert get_protocol(None).name == "patchcsra" and get_protocol("VOC07").ap == "voc07"
    with pytest.raises(PatchCSRAError, match="--protocol 'nope' is unknown"):
        get_protocol("nope", "--protocol")
    with pytest.raises(PatchCSRAError, match="cf1="):
        Protocol("x", cf1="geometric")
    with pytest.raises(Exception):
        PROTOCOLS["csra"].threshold = 0.7   # frozen
    assert "11-point" in conventions_text(PROTOCOLS["voc07"])


# ----------------------------------------------------------------------------- sweep integration and guards
def _stats(base, targets, l=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = base.shape
    s = base[..., None] + 0.3 * torch.randn(n, c, l, generator=g)
    s = s - s.mean(-1, keepdim=True) + base[..., None]
    att = s.amax(-1)[..., None]
    return Stats(base, s.amax(-1), att, (math.inf,), targets.astype(np.int8), np.ones(n, bool),
                 tuple(str(i) for i in range(n)), tuple(f"c{j}" for j in range(c)), False)


def _case(n=60, c=5, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < 0.3).numpy().astype(np.int8)
    base = torch.randn(n, c, generator=g) + 2.0 * torch.from_numpy(targets).float() - 1.0 + shift
    return base, targets


def test_sweep_records_protocol_conventions_and_caption(caplog):
    base, targets = _case()
    res = sweep(_stats(base, targets), lams=(0.0, 0.1), folds=3, bootstrap=20, protocol="voc07")
    st = res.settings
    assert st["protocol"] == "voc07" and st["conventions"]["ap"] == "voc07" and st["scores"] == "logit"
    assert st["threshold_metrics"]["meaningful"] is True
    ref = np.nanmean([ref_voc07(base.numpy()[:, k], targets[:, k]) for k in range(5)]) * 100
    assert res.baseline["mAP"] == pytest.approx(ref)
    summary = {"metric": res.metric, "baseline": res.baseline, "settings": st,
               "choices": {k: c.as_dict() for k, c in res.choices.items()}, "images": {"scored": 60}}
    cap = table_caption([summary])
    assert "Protocol voc07: VOC07 11-point AP" in cap and "out-of-sample" in cap
    assert "out-of-sample" in res.choices["cv"].note


def test_sweep_detects_probabilities_and_thresholds_them(caplog):
    base, targets = _case(seed=1)
    prob = torch.sigmoid(base)
    with caplog.at_level("WARNING"):
        res = sweep(_stats(prob, targets), lams=(0.0,), folds=0, bootstrap=0)
    assert res.settings["scores"] == "prob" and res.settings["scores_look_like_probabilities"]
    assert sum("probabilities" in r.getMessage() for r in caplog.records) == 1
    ref = sweep(_stats(base, targets), lams=(0.0,), folds=0, bootstrap=0)
    assert res.baseline["CF1"] == pytest.approx(ref.baseline["CF1"])   # thresholds on the probabilities themselves
    forced = sweep(_stats(prob, targets), lams=(0.0,), folds=0, bootstrap=0, scores="logit")
    assert forced.settings["scores"] == "logit" and "off" in forced.settings["scores_note"]
    assert forced.settings["threshold_metrics"]["meaningful"] is False   # sigmoid(p) >= 0.5 for every p >= 0
    with pytest.raises(PatchCSRAError, match="scores="):
        sweep(_stats(base, targets), lams=(0.0,), folds=0, bootstrap=0, scores="logits")


def test_single_label_head_marks_threshold_metrics_not_meaningful():
    base, targets = _case(seed=2, shift=4.0)    # a head that says 'yes' to nearly everything
    res = sweep(_stats(base, targets), lams=(0.0,), folds=0, bootstrap=0)
    th = res.settings["threshold_metrics"]
    assert th["meaningful"] is False and th["positive_rate"] > 0.5 and "not meaningful" in th["note"]
    assert "not meaningful" in M.protocol_caption([{"settings": res.settings, "choices": {}}])


# ----------------------------------------------------------------------------- CLI end to end
def test_cli_sweep_protocol_and_scores_flags(tmp_path):
    import json

    import timm
    from typer.testing import CliRunner

    from conftest import shared_path
    from patchcsra.cli import app

    runner = CliRunner()
    model = timm.create_model("resnet10t", pretrained=False, num_classes=20)
    path = tmp_path / "resnet10t-voc.pth"
    torch.save(model.state_dict(), path)
    voc = shared_path("data", "voc2007-mini", "VOCdevkit")
    args = ["sweep-lambda", str(path), "--arch", "timm:resnet10t", "--data", str(voc), "--split", "trainval",
            "--img-size", "64", "--workers", "0", "--bootstrap", "0", "--no-cache", "--lams", "0,0.2"]
    bad = runner.invoke(app, args + ["--out", str(tmp_path / "x"), "--protocol", "nope"])
    assert bad.exit_code != 0 and "--protocol 'nope' is unknown" in bad.output
    bad = runner.invoke(app, args + ["--out", str(tmp_path / "y"), "--scores", "logits"])
    assert bad.exit_code != 0 and "--scores 'logits'" in bad.output
    r = runner.invoke(app, args + ["--out", str(tmp_path / "r"), "--protocol", "voc2010", "--scores", "logit"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["settings"]["protocol"] == "voc2010" and s["settings"]["conventions"]["ap"] == "voc2010"
    assert "threshold_metrics" in s["settings"] and s["settings"]["scores"] == "logit"
    assert "Protocol voc2010" in (tmp_path / "r" / "table.md").read_text()
    assert "Protocol voc2010" in (tmp_path / "r" / "table.tex").read_text()


def test_csra_ranks_float32_sigmoids_so_saturated_logits_tie():
    """The official val.py ranks nn.Sigmoid()(logit) in float32: logits 20 and 25 both become 1.0 and tie."""
    s = np.array([[20.0], [25.0], [3.0]])
    t = np.array([[1], [0], [1]], dtype=np.int8)
    sig = (1 / (1 + np.exp(-s.astype(np.float32)))).astype(np.float32)
    assert sig[0, 0] == sig[1, 0] == 1.0
    csra = M.protocol_metrics(s, t, protocol=PROTOCOLS["csra"], top_k=None)["mAP"]
    ours = M.protocol_metrics(s, t, protocol=PROTOCOLS["patchcsra"], top_k=None)["mAP"]
    assert csra == pytest.approx(100 * ref_sorted_ap(sig[:, 0].astype(np.float64), t[:, 0]))  # image order: pos first
    assert csra == pytest.approx(100 * (1 + 2 / 3) / 2) and ours == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)

"""Speed of patchcsra.metrics against scikit-learn on a COCO-sized multi-label set.

Random logits for ``--n`` images x ``--c`` classes (default 40,000 x 80, float32 like a model's
outputs; ``--dtype float64`` to compare on doubles), about 3% positives, a tenth of the classes
with scores rounded to 0.1 (heavy ties), 0.5% of the targets ``-1`` (ignored). Times, best of
``--reps`` runs each, in one process:

* mAP: ``mean_average_precision`` vs a loop over classes of ``sklearn.metrics.average_precision_score``
  on each class's non-ignored rows;
* all 13 metrics: ``multilabel_metrics`` (mAP, CP/CR/CF1/OP/OR/OF1 at sigmoid >= 0.5 and at top-3)
  vs the same sklearn mAP loop plus ``precision_recall_fscore_support`` per class (macro) and on
  the flattened non-ignored entries (micro), predictions included on both sides;
* a ``--boot``-replicate paired bootstrap of mAP with ``bootstrap_weights`` (one call with
  ``(R, N)`` weights); one replicate is checked against sklearn with ``sample_weight``.

Every value must agree with sklearn within 1e-6 (on the 0-1 scale). Target: mAP at least 10x
faster than sklearn. Exit status 1 when a value disagrees or the mAP speed-up is under 10x.

    python benchmarks/metrics_speed.py [--n 40000 --c 80 --reps 3 --boot 1000]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

TARGET_SPEEDUP = 10.0
TOL = 1e-6


def make_data(n: int, c: int, seed: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` logits and {-1, 0, 1} targets: ~3% positives, ties in c // 10 classes, 0.5% ignored."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.03).astype(np.int64)
    scores = rng.normal(-3.0, 1.5, size=(n, c)) + 3.0 * targets
    tied = max(1, c // 10)
    scores[:, :tied] = np.round(scores[:, :tied], 1)
    targets[rng.random((n, c)) < 0.005] = -1
    return scores.astype(dtype), targets


def best_time(fn, reps: int):
    """``(min seconds over reps, last result)``."""
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ------------------------------------------------------------------------------ sklearn baselines
def sk_map(scores: np.ndarray, targets: np.ndarray, weight: np.ndarray | None = None) -> float:
    """mAP (0-1) as a loop over classes of average_precision_score on the non-ignored rows."""
    from sklearn.metrics import average_precision_score

    aps = []
    for k in range(scores.shape[1]):
        keep = targets[:, k] >= 0
        y = targets[keep, k]
        w = None if weight is None else weight[keep]
        if (y == 1).any() and (w is None or w[y == 1].sum() > 0):
            aps.append(average_precision_score(y, scores[keep, k], sample_weight=w))
    return float(np.mean(aps))


def sk_prf(targets: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 (0-1) with precision_recall_fscore_support, ignored entries dropped."""
    from sklearn.metrics import precision_recall_fscore_support

    cp, cr = [], []
    for k in range(targets.shape[1]):
        keep = targets[:, k] >= 0
        p, r, _, _ = precision_recall_fscore_support(targets[keep, k], pred[keep, k], labels=[1], average=None,
                                                     zero_division=0)
        cp.append(p[0])
        cr.append(r[0])
    keep = targets >= 0
    op, orr, _, _ = precision_recall_fscore_support(targets[keep], pred[keep], average="binary", zero_division=0)
    cp_m, cr_m = float(np.mean(cp)), float(np.mean(cr))
    f1 = lambda a, b: 0.0 if a + b == 0 else 2 * a * b / (a + b)  # noqa: E731
    return {"CP": cp_m, "CR": cr_m, "CF1": f1(cp_m, cr_m), "OP": float(op), "OR": float(orr), "OF1": f1(op, orr)}


def sk_metrics(scores: np.ndarray, targets: np.ndarray, top_k: int = 3) -> dict[str, float]:
    """The 13 values of multilabel_metrics (0-1), the sklearn way."""
    s = scores.astype(np.float64)
    out = {"mAP": sk_map(s, targets)}
    pred = (1.0 / (1.0 + np.exp(-s)) >= 0.5).astype(int)
    out.update(sk_prf(targets, pred))
    top = np.argsort(s, axis=1, kind="mergesort")[:, ::-1][:, :top_k]
    in_top = np.zeros(s.shape, dtype=int)
    np.put_along_axis(in_top, top, 1, axis=1)
    out.update({f"{k}_top{top_k}": v for k, v in sk_prf(targets, pred * in_top).items()})
    return out


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40000, help="images")
    ap.add_argument("--c", type=int, default=80, help="classes")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each side (best is reported)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap replicates (0: skip)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="dtype of the logits")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from patchcsra.metrics import bootstrap_weights, mean_average_precision, multilabel_metrics

    warnings.filterwarnings("ignore")
    scores, targets = make_data(args.n, args.c, args.seed, args.dtype)
    print(f"{args.n} images x {args.c} classes, {args.dtype} logits, {100 * np.mean(targets == 1):.2f}% positive, "
          f"{100 * np.mean(targets == -1):.2f}% ignored; best of {args.reps} runs")
    mean_average_precision(scores[:100], targets[:100])  # warm-up (imports, thread pool)

    t_ours, (m_ours, _, _) = best_time(lambda: mean_average_precision(scores, targets), args.reps)
    t_sk, m_sk = best_time(lambda: sk_map(scores.astype(np.float64), targets), args.reps)
    tm_ours, all_ours = best_time(lambda: multilabel_metrics(scores, targets), args.reps)
    tm_sk, all_sk = best_time(lambda: sk_metrics(scores, targets), args.reps)

    bad = [k for k in all_sk if abs(all_ours[k] / 100 - all_sk[k]) > TOL]
    if abs(m_ours / 100 - m_sk) > TOL:
        bad.insert(0, "mAP (mean_average_precision)")
    rows = [("mAP", t_ours, t_sk), ("all 13 metrics", tm_ours, tm_sk)]
    print(f"\n{'':<16}{'patchcsra (s)':>14}{'sklearn (s)':>14}{'speed-up':>10}")
    for name, a, b in rows:
        print(f"{name:<16}{a:>14.4f}{b:>14.4f}{b / a:>9.1f}x")
    print(f"\nmAP {m_ours:.4f}% (sklearn {100 * m_sk:.4f}%); values agree within {TOL:g}: {not bad}")
    for k in bad:
        print(f"  MISMATCH {k}: ours {all_ours.get(k, m_ours) / 100!r} sklearn {all_sk.get(k, m_sk)!r}")

    if args.boot:
        t_w, w = best_time(lambda: bootstrap_weights(args.n, args.boot, seed=args.seed), 1)
        t_b, (m_b, _, _) = best_time(lambda: mean_average_precision(scores, targets, w), 1)
        lo, hi = np.percentile(m_b, [2.5, 97.5])
        print(f"\nbootstrap of mAP, {args.boot} replicates with (R, N) weights: {t_b:.2f} s "
              f"({1000 * t_b / args.boot:.2f} ms per replicate; weights drawn in {t_w:.2f} s; "
              f"sklearn would take about {args.boot * t_sk:.0f} s unweighted)")
        print(f"  mAP 95% interval [{lo:.3f}, {hi:.3f}]")
        r = args.boot // 2
        ref = sk_map(scores.astype(np.float64), targets, w[r].astype(np.float64))
        ok = abs(m_b[r] / 100 - ref) <= TOL
        print(f"  replicate {r} vs sklearn with sample_weight: {m_b[r]:.6f}% vs {100 * ref:.6f}% agree: {ok}")
        if not ok:
            bad.append(f"bootstrap replicate {r}")

    speedup = t_sk / t_ours
    verdict = "ok" if speedup >= TARGET_SPEEDUP else "BELOW TARGET"
    print(f"\nmAP speed-up {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x): {verdict}")
    return 0 if speedup >= TARGET_SPEEDUP and not bad else 1


if __name__ == "__main__":
    sys.exit(main())

"""Named metric protocols: the conventions of each project's evaluation code, as data.

Multi-label papers agree on the names (mAP, CP, CR, CF1, OP, OR, OF1, top-3) but not on the
conventions behind them. A :class:`Protocol` is a frozen record of those conventions; the metrics of
one protocol are computed by :func:`patchcsra.metrics.protocol_metrics`.

Fields (every one is written to ``summary.json`` under ``settings.conventions``):

* ``ap`` -- ``'noninterp'`` (mean over positives of the precision at its rank), ``'voc07'`` (11-point:
  mean over ``t = 0, 0.1, ..., 1`` of the highest precision at recall >= t) or ``'voc2010'`` (area under
  the PR curve with the monotone precision envelope, VOC2010+ devkit).
* ``ties`` -- ``'aware'``: equal scores form one group, every member gets the precision at the end
  of the group (sklearn); ``'first'``: equal scores are ranked in image order (a stable descending sort:
  ``torch.sort(stable=True, descending=True)``, MATLAB ``sort(-x)``); ``'last'``: the later image first
  (numpy ``argsort()[::-1]``).
* ``cf1`` -- ``'harmonic'``: CF1 = 2 CP CR / (CP + CR); ``'mean_f1'``: the mean over classes of each
  class's F1.
* ``threshold`` -- a probability: predicted positive iff ``sigmoid(logit) >= threshold`` (or
  ``prob >= threshold`` for probability scores).
* ``top_k_rule`` -- ``'and_threshold'``: among the image's k highest *and* above the threshold;
  ``'exact'``: exactly the k highest, no threshold.
* ``top_k_ties`` -- at the k-th place: ``'higher_index'`` or ``'lower_index'`` wins.
* ``ignored`` -- targets ``-1``: ``'remove'`` (from every count and every ranking) or ``'negative'``
  in P/R (still removed from AP ranking when ``ap_ignored='remove'``).
* ``ap_ignored`` -- the same choice for AP.
* ``empty_classes`` -- a class with no positive entry: ``'skip'`` (left out of mAP and of the
  class averages CP/CR/CF1), ``'zero'`` (counted as AP 0 and recall 0) or ``'nan'`` (the class
  averages become NaN, as ``0/0`` does in the reference code).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import PatchCSRAError

__all__ = ["Protocol", "PROTOCOLS", "DEFAULT_PROTOCOL", "get_protocol", "conventions_text", "SCORE_KINDS"]

SCORE_KINDS = ("auto", "logit", "prob")
_CHOICES = {
    "ap": ("noninterp", "voc07", "voc2010"), "ties": ("aware", "first", "last"), "cf1": ("harmonic", "mean_f1"),
    "top_k_rule": ("and_threshold", "exact"), "top_k_ties": ("higher_index", "lower_index"),
    "ignored": ("remove", "negative"), "ap_ignored": ("remove", "negative"), "empty_classes": ("skip", "zero", "nan"),
    "rank": ("score", "sigmoid32"),
}


@dataclass(frozen=True)
class Protocol:
    """The conventions of one evaluation code base (see the module docstring for each field)."""

    name: str
    ap: str = "noninterp"
    ties: str = "aware"
    cf1: str = "harmonic"
    threshold: float = 0.5
    top_k_rule: str = "and_threshold"
    top_k_ties: str = "higher_index"
    ignored: str = "remove"
    ap_ignored: str = "remove"
    empty_classes: str = "skip"
    rank: str = "score"  # "sigmoid32": AP ranks float32 sigmoids (saturated logits tie, as in the official CSRA val.py)
    reference: str = ""

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise PatchCSRAError(f"protocol {self.name!r}: {key}={getattr(self, key)!r}; "
                                     f"choose one of {', '.join(allowed)}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise PatchCSRAError(f"protocol {self.name!r}: threshold={self.threshold!r} is outside [0, 1]")

    def conventions(self) -> dict[str, Any]:
        """Every convention as a JSON-ready dict (``name`` and ``reference`` included)."""
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("patchcsra", reference="ours: CSRA/ML-GCN conventions with tie-aware AP (sklearn "
             "average_precision_score); classes without positives are left out of every class average"),
    Protocol("csra", ties="first", top_k_ties="lower_index", rank="sigmoid32",
             reference="CSRA (Zhu & Wu 2021) evaluation: sort-based non-interpolated AP over float32 sigmoids "
                       "(val.py: nn.Sigmoid()(logit), so saturated logits tie), CF1 = harmonic mean of CP and CR at "
                       "0.5, top-3 = top 3 and >= 0.5 (lower class index wins a tie at the cut)"),
    Protocol("mlgcn", ties="first", top_k_ties="lower_index", ignored="negative",
             reference="ML-GCN AveragePrecisionMeter: sort-based AP skipping difficult entries; P/R count "
                       "difficult (-1) entries as negatives; a class without positives is undefined there "
                       "(ZeroDivisionError in AP, 0/0 in CR), so it is skipped (empty_classes='nan' gives the NaN)"),
    Protocol("asl", ties="last", cf1="mean_f1", threshold=0.8, ap_ignored="negative", ignored="negative",
             empty_classes="zero",
             reference="ASL helper_functions.mAP: argsort()[::-1] AP over all entries (no ignore label), "
                       "AP 0 for a class without positives; CF1 = mean per-class F1 at 0.8"),
    Protocol("mmpretrain", ties="first", cf1="mean_f1", top_k_rule="exact", top_k_ties="lower_index",
             empty_classes="zero",
             reference="mmpretrain AveragePrecision / MultiLabelMetric: sort-based AP ignoring -1, AP 0 for a "
                       "class without positives; macro P/R/F1 per class (F1 averaged); topk=3 takes exactly 3"),
    Protocol("voc07", ap="voc07", ties="first",
             reference="PASCAL VOC2007 devkit VOCevalcls: 11-point interpolated AP, difficult removed"),
    Protocol("voc2010", ap="voc2010", ties="first",
             reference="PASCAL VOC2010+ devkit VOCap: area under the PR curve with the monotone precision "
                       "envelope, difficult removed"),
    Protocol("coco", ties="first", top_k_ties="lower_index",
             reference="the MS-COCO multi-label protocol of ML-GCN/CSRA papers (no ignored labels): sort-based "
                       "non-interpolated AP, CF1 harmonic at 0.5, top-3 and >= 0.5"),
)}
DEFAULT_PROTOCOL = "patchcsra"


def get_protocol(protocol: Any, flag: str = "protocol") -> Protocol:
    """A :class:`Protocol` from its name (or the protocol itself); one-line error naming ``flag``."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol is None:
        return PROTOCOLS[DEFAULT_PROTOCOL]
    p = PROTOCOLS.get(str(protocol).lower())
    if p is None:
        raise PatchCSRAError(f"{flag} {protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}")
    return p


def conventions_text(p: Protocol, score_kind: str = "logit") -> str:
    """One line naming the protocol and its conventions, for the table footer and caption."""
    ap = {"noninterp": "non-interpolated AP", "voc07": "VOC07 11-point AP", "voc2010": "VOC2010 area AP"}[p.ap]
    ties = {"aware": "tie-aware", "first": "ties in image order", "last": "ties in reverse image order"}[p.ties]
    cf1 = "CF1 = harmonic(CP, CR)" if p.cf1 == "harmonic" else "CF1 = mean per-class F1"
    on = "probability" if score_kind == "prob" else "sigmoid"
    topk = "top-k and threshold" if p.top_k_rule == "and_threshold" else "exactly top-k"
    if p.rank == "sigmoid32":
        ap += " over float32 sigmoids"
    return (f"Protocol {p.name}: {ap} ({ties}); {cf1}; threshold {on} >= {p.threshold:g}; {topk} "
            f"({p.top_k_ties.replace('_', ' ')} wins the cut); ignored entries: {p.ignored} in P/R, "
            f"{p.ap_ignored} in AP; classes without positives: {p.empty_classes}.")

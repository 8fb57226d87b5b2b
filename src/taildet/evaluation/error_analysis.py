"""TIDE-style error analysis of detection results under the LVIS federated protocol.

:func:`error_breakdown` sorts every false positive into one error type, the way TIDE does (Bolya et
al., ECCV 2020, "TIDE: A General Toolbox for Identifying Object Detection Errors"), measures what
each type costs in AP50 by fixing only that type with an oracle and evaluating again, per frequency
group, and then looks at what matters most in a long tail: whose look-alikes the rare classes
fire on, and which (predicted class, true class) confusions cost the most.

Error types (foreground IoU ``t_f = 0.5``, background ``t_b = 0.1``; TIDE's values). Detections are
first matched as the evaluator matches them at IoU 0.5: per image and class, in score order, each
takes the unmatched GT of its class with the highest IoU >= ``t_f``. Each unmatched detection is
then tested in TIDE's order, the first test that holds gives its type:

* ``Loc``: its highest IoU with a GT of its own class (matched or not) is in ``[t_b, t_f)``;
* ``Cls``: its highest IoU with a GT of another class is >= ``t_f``;
* ``Dupe``: IoU >= ``t_f`` with a GT of its class that a higher-scoring detection matched;
* ``Bkg``: IoU < ``t_b`` with every GT of the image;
* ``Both``: what is left -- IoU in ``[t_b, t_f)`` with a GT of another class only;
* ``Missed`` (a GT, not a detection): a GT no detection matched and no ``Cls`` / ``Loc`` error
  points at (a GT that such an error points at is that error's, as in TIDE).

The boundaries are the paper's (``Loc`` and ``Both`` in ``[t_b, t_f)``, ``Bkg`` below ``t_b``); tidecv's
code differs only on an IoU exactly at a threshold (it counts ``t_f`` itself as ``Loc`` and ``t_b``
itself with another class as ``Bkg``).

What fixing a type means (the oracle; TIDE's fixes): ``Cls`` -- the detection takes the class of
the GT it overlaps; ``Loc`` -- the detection takes its GT's box; both only when that GT is unmatched
and this detection is the highest-scoring ``Cls`` / ``Loc`` error pointing at it (any other such
error is removed, since one GT can be found only once); ``Both``, ``Dupe``, ``Bkg`` -- the detection
is removed; ``Missed`` -- the missed GT are removed from the ground truth (TIDE takes them out of the
denominator). A fixed ``Cls`` error also takes its GT's box (mask for segm): the evaluator then
matches it to that GT for certain, which is what TIDE's fix says (it counts it a true positive).
``dAP50[e]`` is AP50 with only type ``e`` fixed minus AP50 before; no fix can lower AP, so
every dAP is >= 0 (TIDE clips at 0 for its own binning; here nothing needs clipping).

Rules for LVIS (methods.md section 6, the evaluator's federated rules):

* a detection of class c on image I is analysed only when the evaluator evaluates it: c annotated
  on I or in I's ``neg_category_ids``, within I's 300 highest-scoring detections, with area > 0.
  Any other detection is not an error (and is left out of every list evaluated, which changes
  no AP: the evaluator never looks at it);
* an unmatched detection of a class in I's ``not_exhaustive_category_ids`` is ignored by the
  evaluator, so it is not an error either (counted as ``ignored``);
* a detection of a verified-negative class (``neg_category_ids``) has no GT of its class on the
  image, so over another class's GT it is a ``Cls`` (IoU >= ``t_f``) or ``Both`` error -- a
  confusion -- and elsewhere a ``Bkg`` error;
* the ``Missed`` fix removes GT: where that leaves image I without GT of class c, c moves to I's
  ``neg_category_ids`` (its detections there stay false positives), or, when c was not exhaustive
  on I, out of I's lists (its detections there were all ignored and stay unevaluated);
* means are over the classes with GT in the original ground truth (the evaluator's AP50); a class
  whose every GT the ``Missed`` fix removes keeps AP 0 (it found nothing; TIDE does the same for a
  class with detections), so fixing ``Missed`` never makes a class disappear from the mean.

Every AP is the evaluator's (:func:`taildet.evaluation.federated.evaluate_federated`, what
:func:`~taildet.evaluation.evaluate_lvis` runs), per class at IoU 0.5 with 101-point interpolation:
TIDE's analysis uses one IoU threshold, the one that defines the error types. Groups (r/c/f) are
the GT categories' ``frequency``.

At LVIS size: the types are assigned vectorised (:mod:`taildet.evaluation.error_types`), and each
oracle fix evaluates again, at IoU 0.5 only, just the classes whose detections or GT it changes
(:func:`taildet.evaluation.error_ap.per_class_ap50`, the evaluator's runs); every other class keeps
its AP50 before the fix, which is exact because federated classes are independent.

Long-tail part: per class, the share of its false positives that are confusions (``Cls`` or
``Both``) with a frequent / common / rare class, and the confusion pairs that cost most. The cost
of a pair (predicted p, true t) is the AP50 that class p gains when only p's ``Cls`` / ``Both``
errors on GT of class t are removed, divided by the number of classes with GT: the overall AP50
it costs (as a fraction; the tables give points). It is computed exactly, with the evaluator, for
the ``5 * top_pairs`` pairs with the most confusions (pairs of different predicted classes share
one evaluation), and the ``top_pairs`` costliest are reported.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Mapping

import numpy as np

from taildet.errors import ConfigError
from taildet.evaluation.error_ap import per_class_ap50
from taildet.evaluation.error_types import BG_IOU, FG_IOU, classify, pair_keys
from taildet.evaluation.eval_backend import _FREQS
from taildet.evaluation.federated import PairIndex, _detections
from taildet.evaluation.lvis_eval import AP_FIXED_DETS_PER_CLASS, LVIS_MAX_DETS, _check_rle_size_columns
from taildet.evaluation.lvis_gt import _prepare_gt, load_gt
from taildet.evaluation.result_columns import ResultColumns, read_result_columns

__all__ = ["BG_IOU", "ERROR_TYPES", "FG_IOU", "error_breakdown"]

#: The error types, in the order of the tables.
ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Missed")
_FIXED_BY_REMOVAL = ("Both", "Dupe", "Bkg")
_CONFUSIONS = ("Cls", "Both")
_GROUPS = ("all",) + _FREQS


def error_breakdown(gt: str | os.PathLike | Mapping, results: str | os.PathLike | list, iou_type: str = "bbox",
                    top_pairs: int = 10, gt_name: str | None = None) -> dict[str, Any]:
    """TIDE-style error breakdown of ``results`` on the LVIS ``gt`` (see the module docstring).

    Args:
        gt: LVIS GT JSON path (or GT dict); results: results JSON path or list of result dicts,
            both checked as :func:`~taildet.evaluation.evaluate_lvis` checks them (same errors).
        iou_type: ``"bbox"`` or ``"segm"``.
        top_pairs: how many confusion pairs to report (their cost computed exactly).
        gt_name: the file name errors give when ``gt`` is a dict.

    Returns:
        dict with ``iou_type``, ``fg_iou``, ``bg_iou``; ``AP50`` {all/r/c/f: fraction, NaN when a
        group has no class with GT}; ``dAP50`` {type: {all/r/c/f}}; ``counts`` {type: {all/r/c/f}}
        (detection errors by the predicted class's group, ``Missed`` by the GT's); ``num_detections``
        (analysed), ``num_true_positives``, ``num_ignored`` (not-exhaustive), ``num_gt``;
        ``confusions``: {``by_group``: {predicted group: {``false_positives``, ``with`` {r/c/f: n},
        ``share`` {r/c/f}}}, ``per_class``: [same per class with ``id``, ``name``, ``group``,
        classes with a false positive]}; ``pairs``: [{``predicted``, ``true`` (ids),
        ``predicted_name``, ``true_name``, ``predicted_group``, ``true_group``, ``count``, ``cost``
        (fraction of AP50), ``gain`` (the predicted class's AP50 gain)}], costliest first;
        ``categories`` {id: {name, group}}.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    if not isinstance(top_pairs, int) or top_pairs < 0:
        raise ConfigError(f"--top-pairs (top_pairs) must be an integer >= 0, got {top_pairs!r}")
    gt_data, gt_file = load_gt(gt, name=gt_name)
    res_file = str(results) if isinstance(results, (str, os.PathLike)) else "<results list>"
    pairs = PairIndex(gt_data)
    cols = read_result_columns(results, pairs, iou_type, keep_segm=pairs.known if iou_type == "segm" else None)
    gt_prep = _prepare_gt(gt_data, lvis=True, iou_type=iou_type, file=gt_file)
    if iou_type == "segm":
        _check_rle_size_columns(cols, gt_prep, res_file)
    dets = _detections(cols, pairs, iou_type, False, LVIS_MAX_DETS, AP_FIXED_DETS_PER_CLASS)
    return _Analysis(dets, gt_prep, iou_type, pairs).report(top_pairs)


class _Analysis:
    """The error types of the evaluated detections ``dets`` (columns, as ``_detections`` gives them)
    and the AP50 of the oracle-fixed lists."""

    def __init__(self, dets: Mapping, gt_prep: Mapping, iou_type: str, pairs: PairIndex):
        self.dets, self.gt, self.iou_type, self.pairs = dets, gt_prep, iou_type, pairs
        self.anns = gt_prep["annotations"]
        self.cats = {c["id"]: c for c in gt_prep["categories"]}
        self.group = {cid: c["frequency"] for cid, c in self.cats.items()}
        self.gt_cat = np.array([x["category_id"] for x in self.anns], dtype=np.int64)
        self.gt_geom = self._gt_geometry()
        self._classify()
        self._fixers()

    # ------------------------------------------------------------------ types
    def _gt_geometry(self) -> list:
        if self.iou_type == "bbox":
            return []  # boxes are read from the annotations where needed
        from faster_coco_eval import COCO  # optional: faster_coco_eval, imported on use

        coco = COCO(self.gt, print_function=lambda *a, **k: None)
        return [coco.annToRLE(x) for x in self.anns]

    def _classify(self) -> None:
        from faster_coco_eval.core import mask as mask_utils  # optional: faster_coco_eval, imported on use

        d = self.dets
        if self.iou_type == "bbox":
            gt_box = np.array([x["bbox"] for x in self.anns], dtype=np.float64).reshape(-1, 4)

            def ious_of(di, gi):
                return mask_utils.iou(d["bbox"][di], gt_box[gi], [0] * len(gi))
        else:
            def ious_of(di, gi):
                return mask_utils.iou([d["segmentation"][i] for i in di.tolist()],
                                      [self.gt_geom[j] for j in gi.tolist()], [0] * len(gi))
        gt_img = np.array([x["image_id"] for x in self.anns], dtype=np.int64)
        ne = [(im["id"], c) for im in self.gt["images"] for c in im["not_exhaustive_category_ids"]]
        ne_img, ne_cat = (np.array(x, dtype=np.int64) for x in zip(*ne)) if ne else (np.zeros(0, np.int64),) * 2
        self.kind, self.target, self.gt_used = classify(d["image_id"], d["category_id"], d["score"], gt_img,
                                                        self.gt_cat, ious_of, pair_keys(ne_img, ne_cat))

    def _fixers(self) -> None:
        """TIDE's one fix per GT: of the Cls / Loc errors pointing at an unmatched GT, the
        highest-scoring one (the first on ties) is fixed; ``usable`` GT are not Missed."""
        self.fixer = np.zeros(len(self.kind), bool)
        cand = np.flatnonzero(np.isin(self.kind, ("Cls", "Loc")))
        cand = cand[~self.gt_used[self.target[cand]]]
        cand = cand[np.lexsort((cand, -self.dets["score"][cand], self.target[cand]))]
        first = np.r_[True, self.target[cand][1:] != self.target[cand][:-1]] if len(cand) else np.zeros(0, bool)
        self.fixer[cand[first]] = True
        self.missed = ~self.gt_used
        self.missed[self.target[cand]] = False

    # ------------------------------------------------------------------ oracle
    def _columns(self, keep: np.ndarray, cat: np.ndarray | None = None, relocate: np.ndarray | None = None):
        """ResultColumns of the detections ``keep`` (bool), with classes ``cat`` and the detections
        ``relocate`` (bool) given their target GT's box / mask."""
        d = self.dets
        cat = d["category_id"] if cat is None else cat
        bbox = d["bbox"].copy()
        segm = list(d["segmentation"]) if self.iou_type == "segm" else None
        if relocate is not None:
            for i in np.flatnonzero(relocate).tolist():
                j = int(self.target[i])
                bbox[i] = self.anns[j]["bbox"]
                if segm is not None:
                    segm[i] = self.gt_geom[j]
        idx = np.flatnonzero(keep)
        return ResultColumns(image_id=d["image_id"][idx], category_id=cat[idx], score=d["score"][idx],
                             bbox=bbox[idx], has_bbox=np.ones(len(idx), bool),
                             segm=[segm[i] for i in idx.tolist()] if segm is not None else None)

    def _ap50(self, cols: ResultColumns, gt: Mapping | None = None, pairs: PairIndex | None = None,
              classes=None) -> dict:
        """Per-class AP50 of ``classes`` (default: all) on ``cols`` and ``gt``."""
        gt = self.gt if gt is None else gt
        return per_class_ap50(gt, cols, pairs if pairs is not None else self.pairs, self.iou_type, classes)

    def _changed_ap50(self, keep: np.ndarray, classes, cat: np.ndarray | None = None,
                      relocate: np.ndarray | None = None, gt: Mapping | None = None) -> dict:
        """Per-class AP50 of ``classes`` only, on the detections ``keep`` of those classes (the
        others do not change a class's AP) as :meth:`_columns` gives them."""
        classes = np.unique(np.asarray(classes, dtype=np.int64))
        keep = keep & np.isin(self.dets["category_id"] if cat is None else cat, classes)
        return self._ap50(self._columns(keep, cat, relocate), gt, PairIndex(gt) if gt is not None else None, classes)

    def fixed_ap50(self, error: str, base: Mapping) -> dict:
        """Per-class AP50 with only ``error`` fixed: only the classes whose detections or GT the fix
        changes are evaluated again, the others keep their ``base`` AP50 (federated classes are
        independent)."""
        n = len(self.kind)
        is_e = self.kind == error
        det_cat = self.dets["category_id"]
        if error == "Missed":
            gt = _without(self.gt, self.missed)
            changed = self._changed_ap50(np.ones(n, bool), self.gt_cat[self.missed], gt=gt)
        elif error in _FIXED_BY_REMOVAL:
            changed = self._changed_ap50(~is_e, det_cat[is_e])
        else:
            keep = ~is_e | self.fixer
            fix = is_e & self.fixer
            cat = det_cat.copy()
            if error == "Cls":
                cat[fix] = self.gt_cat[self.target[fix]]
            changed = self._changed_ap50(keep, np.concatenate([det_cat[is_e], cat[fix]]), cat, fix)
        return {**base, **changed}

    # ------------------------------------------------------------------ report
    def _means(self, ap: Mapping, classes: list[int]) -> dict:
        out = {}
        for g in _GROUPS:
            ks = [c for c in classes if g == "all" or self.group[c] == g]
            vals = [0.0 if np.isnan(ap.get(c, np.nan)) else float(ap[c]) for c in ks]
            out[g] = float(np.mean(vals)) if vals else float("nan")
        return out

    def report(self, top_pairs: int) -> dict[str, Any]:
        n = len(self.kind)
        base = self._ap50(self._columns(np.ones(n, bool)))
        classes = sorted(c for c, v in base.items() if not np.isnan(v))
        ap = self._means(base, classes)
        dap, counts = {}, {}
        pred_group, gt_group = self._groups_of(self.dets["category_id"]), self._groups_of(self.gt_cat)
        for e in ERROR_TYPES:
            fixed = self._means(self.fixed_ap50(e, base), classes)
            dap[e] = {g: fixed[g] - ap[g] for g in _GROUPS}
            where, grp = (self.missed, gt_group) if e == "Missed" else (self.kind == e, pred_group)
            counts[e] = {g: int((where & ((grp == g) if g != "all" else True)).sum()) for g in _GROUPS}
        return {
            "iou_type": self.iou_type, "fg_iou": FG_IOU, "bg_iou": BG_IOU, "AP50": ap, "dAP50": dap,
            "counts": counts, "num_detections": n, "num_true_positives": int((self.kind == "TP").sum()),
            "num_ignored": int((self.kind == "ignored").sum()), "num_gt": len(self.anns),
            "confusions": self._confusion_shares(),
            "pairs": self._pairs(base, len(classes), top_pairs),
            "categories": {cid: {"name": c.get("name", str(cid)), "group": c["frequency"]}
                           for cid, c in self.cats.items()},
        }

    def _confusion_shares(self) -> dict:
        fp = np.isin(self.kind, ("Cls", "Loc", "Both", "Dupe", "Bkg"))
        conf = np.isin(self.kind, _CONFUSIONS)
        cat = self.dets["category_id"]
        pred_group = self._groups_of(cat)
        true_group = np.full(len(cat), "", dtype=object)
        true_group[conf] = self._groups_of(self.gt_cat[self.target[conf]])
        ids, totals = np.unique(cat[fp], return_counts=True)
        with_ = {g: dict(zip(*(x.tolist() for x in np.unique(cat[conf & (true_group == g)], return_counts=True))))
                 for g in _FREQS}
        per_class = [{"id": cid, "name": self.cats[cid].get("name", str(cid)), "group": self.group[cid],
                      **_shares(total, {g: with_[g].get(cid, 0) for g in _FREQS})}
                     for cid, total in zip(ids.tolist(), totals.tolist())]
        by_group = {g: _shares(int((fp & (pred_group == g)).sum()),
                               {t: int((conf & (pred_group == g) & (true_group == t)).sum()) for t in _FREQS})
                    for g in _FREQS}
        return {"by_group": by_group, "per_class": per_class}

    def _groups_of(self, cat_ids: np.ndarray) -> np.ndarray:
        """The frequency group (object array of 'r' / 'c' / 'f') of each category id."""
        ids = np.array(sorted(self.group), dtype=np.int64)
        groups = np.array([self.group[int(c)] for c in ids.tolist()], dtype=object)
        return groups[np.searchsorted(ids, cat_ids)] if len(ids) else np.zeros(0, dtype=object)

    def _pairs(self, base: Mapping, num_classes: int, top_pairs: int) -> list[dict]:
        conf = np.flatnonzero(np.isin(self.kind, _CONFUSIONS))
        pred = self.dets["category_id"][conf]
        true = self.gt_cat[self.target[conf]]
        counted: dict[tuple[int, int], int] = defaultdict(int)
        for p, t in zip(pred.tolist(), true.tolist()):
            counted[(p, t)] += 1
        cand = sorted(counted, key=lambda k: (-counted[k], k))[:5 * top_pairs]
        rounds: list[list[tuple[int, int]]] = []  # one pair per predicted class and evaluation
        for key in cand:
            r = next((r for r in rounds if all(k[0] != key[0] for k in r)), None)
            if r is None:
                rounds.append(r := [])
            r.append(key)
        out = []
        for r in rounds:  # classes are independent: only the round's predicted classes are evaluated
            drop = np.zeros(len(self.kind), bool)
            for p, t in r:
                drop[conf[(pred == p) & (true == t)]] = True
            after = self._changed_ap50(~drop, [p for p, _ in r])
            for p, t in r:
                gain = float(after[p] - base[p]) if not np.isnan(base[p]) else 0.0
                out.append({"predicted": p, "true": t, "predicted_name": self.cats[p].get("name", str(p)),
                            "true_name": self.cats[t].get("name", str(t)), "predicted_group": self.group[p],
                            "true_group": self.group[t], "count": counted[(p, t)], "gain": gain,
                            "cost": gain / num_classes if num_classes else 0.0})
        out.sort(key=lambda x: (-x["cost"], -x["count"], x["predicted"], x["true"]))
        return out[:top_pairs]


def _shares(total: int, with_: Mapping[str, int]) -> dict:
    """False positives, confusions with each group and their shares (NaN without false positives)."""
    return {"false_positives": total, "with": dict(with_),
            "share": {g: (with_[g] / total if total else float("nan")) for g in _FREQS}}


def _error_type(iou: np.ndarray, same: np.ndarray, used: np.ndarray) -> tuple[str, int]:
    """TIDE's type of one unmatched detection from its IoUs with the image's GT (``same``: GT of
    its class; ``used``: matched GT) and the GT index it points at (-1 for none). The rule one
    detection at a time: :func:`~taildet.evaluation.error_types.classify` applies it to all at
    once (tested equal to a loop over this)."""
    if not len(iou):
        return "Bkg", -1
    own = np.where(same, iou, -1.0)
    j = int(np.argmax(own))
    if BG_IOU <= own[j] < FG_IOU:
        return "Loc", j
    other = np.where(~same, iou, -1.0)
    k = int(np.argmax(other))
    if other[k] >= FG_IOU:
        return "Cls", k
    dup = np.where(same & used, iou, -1.0)
    d = int(np.argmax(dup))
    if dup[d] >= FG_IOU:
        return "Dupe", d
    if iou.max() < BG_IOU:
        return "Bkg", -1
    return "Both", k


def _without(gt_prep: Mapping, drop: np.ndarray) -> dict:
    """``gt_prep`` without the annotations ``drop`` (bool); an (image, class) left without GT moves
    to the image's ``neg_category_ids``, or out of ``not_exhaustive_category_ids``."""
    anns = [x for x, d in zip(gt_prep["annotations"], drop.tolist()) if not d]
    left = {(x["image_id"], x["category_id"]) for x in anns}
    gone = defaultdict(set)
    for x, d in zip(gt_prep["annotations"], drop.tolist()):
        if d and (x["image_id"], x["category_id"]) not in left:
            gone[x["image_id"]].add(x["category_id"])
    images = []
    for im in gt_prep["images"]:
        cs = gone.get(im["id"])
        if cs:
            ne = set(im["not_exhaustive_category_ids"])
            im = dict(im, neg_category_ids=sorted(set(im["neg_category_ids"]) | (cs - ne)),
                      not_exhaustive_category_ids=sorted(ne - cs))
        images.append(im)
    return {"images": images, "annotations": anns, "categories": gt_prep["categories"]}

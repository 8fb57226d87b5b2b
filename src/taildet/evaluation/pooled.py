"""APpool: pooled AP over all categories' detections ranked together (Dave et al. 2021,
"Evaluating Large-Vocabulary Object Detectors: The Devil is in the Details", section 5; their code
is the lvis-api's ``LVISEval`` with a pooled ``accumulate``).

Definition (as their ``LVISPooledEval`` computes it, pool "all", area "all"):

* detections are matched to ground truth *per category*, exactly as for the per-category AP:
  the same detections (the same cap, the zero-area rule and the federated filter), image by image,
  each (image, category) pair's detections in descending score order (stable), greedily taking at
  each IoU threshold ``t`` the not yet matched GT of the same category with the highest IoU
  ``>= t`` (the last such GT on ties, as the lvis-api's loop). An unmatched detection of a
  category in the image's ``not_exhaustive_category_ids`` is ignored at that threshold;
* then every category's detections are ranked together by score (stable: ties in image-id,
  then category-id, then per-pair order, the order of the reference's concatenation) into ONE
  precision / recall curve per threshold: ``tp`` = matched, ``fp`` = neither matched nor ignored,
  precision ``tp / (tp + fp + eps)`` (the lvis-api's, ``eps = np.spacing(1)``), recall over
  every ground-truth instance of every category;
* precision is made monotone (the maximum to its right), read at the 101 recall points
  ``0:0.01:1`` (``searchsorted`` left; 0 beyond the last recall reached) and averaged over the
  points and the IoU thresholds 0.50:0.95. NaN when there is no ground truth.

A detector whose scores are comparable across categories (calibrated) ranks its true positives of
every category above its false positives of every other, which the per-category AP never sees.
The paper reports APpool with AP-fixed's cap (each category's 10,000 best detections, no per-image
cap); :func:`~taildet.evaluation.evaluate_lvis` gives it under whichever cap it evaluates with.

The IoUs are faster-coco-eval's (``COCOeval.ious`` of each run, rows in its score order); the
matching is redone here because faster-coco-eval keeps its per-image evaluations in C++. Memory:
per detection one ``uint16`` of match bits (one bit per threshold) and a flag; one threshold's
cumulative sums at a time (LVIS v1 val, 5.9 M detections: a few hundred MB at the peak).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["PooledMatches", "match_bits", "pooled_matches", "pooled_precision"]

_NAN = float("nan")


def match_bits(mats: list[np.ndarray], thresholds: np.ndarray) -> list[np.ndarray]:
    """Greedy per-pair matching at every threshold, vectorised over pairs.

    ``mats``: per (image, category) pair its IoU matrix ``[D, G]`` (rows = detections in score
    order, columns = ground truth, none ignored); ``thresholds`` ``[T]`` (T <= 16). Returns per
    pair ``[D]`` ``uint16``: bit ``t`` set when the detection is matched at threshold ``t``.
    Pairs are processed in buckets of equal padded GT count, one detection rank at a time.
    """
    thr = np.minimum(np.asarray(thresholds, dtype=np.float64), 1 - 1e-10)
    T = len(thr)
    if T > 16:
        raise ValueError(f"at most 16 IoU thresholds, got {T}")
    out = [np.zeros(m.shape[0], np.uint16) for m in mats]
    if not mats:
        return out
    weights = (1 << np.arange(T)).astype(np.uint16)
    G = np.array([m.shape[1] for m in mats])
    D = np.array([m.shape[0] for m in mats])
    pad = np.where(G <= 1, 1, 1 << np.ceil(np.log2(np.maximum(G, 1))).astype(np.int64))
    for gp in np.unique(pad).tolist():
        members = np.flatnonzero(pad == gp)
        members = members[np.argsort(-D[members], kind="stable")]  # active pairs are a prefix
        d_b = D[members]
        starts = np.concatenate([[0], np.cumsum(d_b)[:-1]])
        flat = np.full((int(d_b.sum()), gp), -1.0)
        for p, s in zip(members.tolist(), starts.tolist()):
            m = mats[p]
            flat[s:s + m.shape[0], : m.shape[1]] = m
        taken = np.zeros((len(members), T, gp), bool)
        bits = np.zeros(len(flat), np.uint16)
        rows_t = np.arange(T)[None, :]
        for d in range(int(d_b.max(initial=0))):
            a = int(np.searchsorted(-d_b, -d, side="left"))  # the pairs with more than d detections
            iou = flat[starts[:a] + d]                                   # [A, Gp]
            cand = (iou[:, None, :] >= thr[None, :, None]) & ~taken[:a]  # [A, T, Gp]
            val = np.where(cand, iou[:, None, :], -np.inf)
            j = gp - 1 - np.argmax(val[..., ::-1], axis=-1)              # last best GT  [A, T]
            ok = cand.any(-1)
            rows_a = np.arange(a)[:, None]
            taken[rows_a, rows_t, j] |= ok
            bits[starts[:a] + d] = (ok * weights).sum(-1).astype(np.uint16)
        for p, s in zip(members.tolist(), starts.tolist()):
            out[p] = bits[s:s + mats[p].shape[0]]
    return out


def pooled_precision(score: np.ndarray, image_id: np.ndarray, category_id: np.ndarray, bits: np.ndarray,
                     ignore_unmatched: np.ndarray, num_gt: int, num_thresholds: int,
                     rec_thrs: np.ndarray) -> np.ndarray:
    """The pooled interpolated precision ``[T, R]`` (module docstring); ``-1`` everywhere when
    ``num_gt == 0``. ``bits``: per detection its match bits; ``ignore_unmatched``: per detection
    True when an unmatched detection is ignored (not-exhaustive pair)."""
    T, R = num_thresholds, len(rec_thrs)
    if num_gt == 0:
        return np.full((T, R), -1.0)
    prec = np.zeros((T, R))
    n = len(score)
    if n == 0:
        return prec
    order = np.lexsort((np.arange(n), category_id, image_id, -np.asarray(score, dtype=np.float64)))
    b = bits[order]
    ign = ignore_unmatched[order]
    for t in range(T):
        tp = ((b >> t) & 1).astype(bool)
        tp_sum = np.cumsum(tp, dtype=np.float64)
        fp_sum = np.cumsum(~tp & ~ign, dtype=np.float64)
        rc = tp_sum / num_gt
        pr = tp_sum / (tp_sum + fp_sum + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        idx = np.searchsorted(rc, rec_thrs, side="left")
        ok = idx < n
        prec[t, ok] = pr[idx[ok]]
        del tp, tp_sum, fp_sum, rc, pr
    return prec


class PooledMatches:
    """The match bits of every evaluated detection, filled run by run, and their pooled AP.

    ``score``, ``image_id``, ``category_id``: the evaluated detections (after cap and filters);
    ``not_exhaustive``: per detection, its category is in its image's
    ``not_exhaustive_category_ids``; ``pair_key``: per detection an int64 key of its (image,
    category) pair; ``num_gt``: ground-truth instances of all categories; ``thresholds``: the IoU
    thresholds. Detections never given to :meth:`add_run` (pairs without ground truth) stay
    unmatched.
    """

    def __init__(self, score: np.ndarray, image_id: np.ndarray, category_id: np.ndarray,
                 not_exhaustive: np.ndarray, pair_key: np.ndarray, num_gt: int, thresholds: Iterable[float]):
        self.score = np.asarray(score, dtype=np.float64)
        self.image_id = np.asarray(image_id, dtype=np.int64)
        self.category_id = np.asarray(category_id, dtype=np.int64)
        self.not_exhaustive = np.asarray(not_exhaustive, dtype=bool)
        self.pair_key = np.asarray(pair_key, dtype=np.int64)
        self.num_gt = int(num_gt)
        self.thresholds = np.asarray(list(thresholds), dtype=np.float64)
        self.bits = np.zeros(len(self.score), np.uint16)

    def add_run(self, ious: dict, det_idx: np.ndarray, key_of) -> None:
        """The matches of one faster-coco-eval run: ``ious`` its ``COCOeval.ious`` ({(image id,
        category id): [D, G] or []}), ``det_idx`` the indices (into this object's arrays) of the
        detections it was given, ``key_of(image_ids, category_ids)`` the pair key function."""
        det_idx = np.asarray(det_idx, dtype=np.int64)
        if not len(det_idx):
            return
        k = self.pair_key[det_idx]
        o = np.lexsort((det_idx, -self.score[det_idx], k))  # per pair, score order (stable)
        rows, keys = det_idx[o], k[o]
        first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        ukeys = keys[first]
        pairs = [(ij, m) for ij, m in ious.items() if len(m)]
        if not pairs:
            return
        img = np.array([int(ij[0]) for ij, _ in pairs], dtype=np.int64)
        cat = np.array([int(ij[1]) for ij, _ in pairs], dtype=np.int64)
        where = np.searchsorted(ukeys, key_of(img, cat))
        mats = [np.asarray(m, dtype=np.float64).reshape(len(m), -1) for _, m in pairs]
        for pos, bits in zip(where.tolist(), match_bits(mats, self.thresholds)):
            start = int(first[pos])
            self.bits[rows[start:start + len(bits)]] = bits

    def precision(self, rec_thrs: np.ndarray) -> np.ndarray:
        """``[T, R]`` pooled interpolated precision (:func:`pooled_precision`)."""
        return pooled_precision(self.score, self.image_id, self.category_id, self.bits, self.not_exhaustive,
                                self.num_gt, len(self.thresholds), np.asarray(rec_thrs, dtype=np.float64))

    def ap(self, rec_thrs: np.ndarray) -> float:
        """APpool: the mean of :meth:`precision`, NaN without ground truth."""
        prec = self.precision(rec_thrs)
        return _NAN if self.num_gt == 0 else float(prec.mean())


def not_exhaustive_keys(images: Iterable[dict], categories: set, key_of) -> np.ndarray:
    """Sorted int64 pair keys of every (image, category of ``categories`` in the image's
    ``not_exhaustive_category_ids``)."""
    img, cat = [], []
    for im in images:
        nel = [c for c in (im.get("not_exhaustive_category_ids") or []) if int(c) in categories]
        img += [int(im["id"])] * len(nel)
        cat += [int(c) for c in nel]
    if not img:
        return np.zeros(0, np.int64)
    return np.unique(key_of(np.array(img, dtype=np.int64), np.array(cat, dtype=np.int64)))


def in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``keys`` found in ``sorted_keys`` (bool per key)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), bool)
    i = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[i] == keys


def pooled_matches(gt_prep: dict, score: np.ndarray, image_id: np.ndarray, category_id: np.ndarray, key_of,
                   thresholds: Iterable[float]) -> PooledMatches:
    """A :class:`PooledMatches` of the evaluated detections of an LVIS GT in faster-coco-eval's form
    (``gt_prep``: images with ``not_exhaustive_category_ids``, area-filtered annotations);
    ``key_of(image_ids, category_ids)`` the int64 pair key (ids must be the GT's)."""
    cats = {int(c["id"]) for c in gt_prep["categories"]}
    image_id = np.asarray(image_id, dtype=np.int64)
    category_id = np.asarray(category_id, dtype=np.int64)
    key = key_of(image_id, category_id)
    nel = in_sorted(key, not_exhaustive_keys(gt_prep["images"], cats, key_of))
    return PooledMatches(score, image_id, category_id, nel, key, len(gt_prep["annotations"]), thresholds)

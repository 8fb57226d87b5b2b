"""The TIDE error type of every evaluated detection, vectorised (used by
:mod:`taildet.evaluation.error_analysis`, whose module docstring states the rules).

Work is per image, as the rules are, but done for a chunk of images at once on flat arrays of
(detection, GT of the same image) pairs: one IoU per pair (one ``mask.iou`` call per image, so
the IoUs are the evaluator's), the evaluator's greedy matching as rounds over the detections'
rank within their (image, class) -- detections of one round never compete for a GT -- and the
type tests as per-detection maxima over segments of the pair arrays. A chunk holds at most
about ``CHUNK_PAIRS`` pairs (more only for one image with more), so memory stays bounded at LVIS
size; there is no dense images x classes array.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["BG_IOU", "CHUNK_PAIRS", "FG_IOU", "classify", "first_max", "pair_keys"]

#: Pairs of one chunk at most (unless one image has more).
CHUNK_PAIRS = 2_000_000
#: TIDE's foreground and background IoU thresholds.
FG_IOU = 0.5
BG_IOU = 0.1


def first_max(values: np.ndarray, starts: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment of ``values`` (segments start at ``starts``, sorted, non-empty, the last one
    ends at ``len(values)``): its maximum and the ``other`` entry at the first position holding it
    (``np.argmax``'s tie rule)."""
    mx = np.maximum.reduceat(values, starts)
    seg = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(values))))
    pos = np.where(values == mx[seg], np.arange(len(values)), len(values))
    return mx, other[np.minimum.reduceat(pos, starts)]


def classify(img: np.ndarray, cat: np.ndarray, score: np.ndarray, gt_img: np.ndarray, gt_cat: np.ndarray,
             ious_of: Callable[[np.ndarray, np.ndarray], np.ndarray], not_exhaustive: np.ndarray,
             chunk_pairs: int = CHUNK_PAIRS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Types of the detections (``img``, ``cat``, ``score`` [N]) on the GT (``gt_img``,
    ``gt_cat`` [M]).

    Args:
        ious_of: ``(det indices [n], GT indices [m]) -> IoU [n, m]`` of one image's detections
            with its GT.
        not_exhaustive: int64 keys (:func:`pair_keys`) of the (image id, category id) pairs
            whose class is not exhaustively annotated on the image.

    Returns:
        ``kind`` object [N] (``TP``, ``ignored`` or an error type), ``target`` int64 [N] (the GT a
        TP matched or an error points at, -1 for none) and ``gt_used`` bool [M] (matched GT).
    """
    n = len(score)
    kind = np.full(n, "", dtype=object)
    target = np.full(n, -1, dtype=np.int64)
    gt_used = np.zeros(len(gt_cat), bool)
    if n == 0:
        return kind, target, gt_used
    order = np.lexsort((-score, img))  # per image, by score, first index first on ties (as argsort stable)
    d_img = img[order]
    d_start = np.flatnonzero(np.r_[True, d_img[1:] != d_img[:-1]])
    d_end = np.r_[d_start[1:], n]
    g_order = np.argsort(gt_img, kind="stable")
    g_sorted = gt_img[g_order]
    ims = d_img[d_start]
    g_lo, g_hi = np.searchsorted(g_sorted, ims, "left"), np.searchsorted(g_sorted, ims, "right")
    cost = (d_end - d_start) * (g_hi - g_lo)
    lo = 0
    while lo < len(ims):  # chunks of images
        hi = lo + 1
        total = cost[lo]
        while hi < len(ims) and total + cost[hi] <= chunk_pairs:
            total += cost[hi]
            hi += 1
        _chunk([(order[d_start[k]:d_end[k]], g_order[g_lo[k]:g_hi[k]]) for k in range(lo, hi)],
               img, cat, gt_cat, ious_of, kind, target, gt_used)
        lo = hi
    unmatched = kind != "TP"
    ignored = unmatched & np.isin(pair_keys(img, cat), not_exhaustive)
    kind[ignored] = "ignored"
    target[ignored] = -1
    return kind, target, gt_used


def pair_keys(image_id: np.ndarray, category_id: np.ndarray) -> np.ndarray:
    """int64 key of (image id, category id) pairs (ids below 2**31)."""
    return np.asarray(image_id, dtype=np.int64) * (1 << 31) + np.asarray(category_id, dtype=np.int64)


def _chunk(blocks: Sequence[tuple[np.ndarray, np.ndarray]], img: np.ndarray, cat: np.ndarray, gt_cat: np.ndarray, ious_of,
           kind: np.ndarray, target: np.ndarray, gt_used: np.ndarray) -> None:
    """Type the detections of a chunk of images; ``blocks``: per image its detections (by score)
    and its GT (by index)."""
    with_gt = [(d, g) for d, g in blocks if len(g)]
    no_gt = np.concatenate([d for d, g in blocks if not len(g)] or [np.zeros(0, np.int64)])
    kind[no_gt] = "Bkg"  # no GT on the image: Bkg (or ignored, decided later)
    if not with_gt:
        return
    p_det = np.concatenate([np.repeat(d, len(g)) for d, g in with_gt])
    p_gt = np.concatenate([np.tile(g, len(d)) for d, g in with_gt])
    p_iou = np.concatenate([np.asarray(ious_of(d, g), dtype=np.float64).reshape(-1) for d, g in with_gt])
    same = cat[p_det] == gt_cat[p_gt]
    _match(p_det, p_gt, p_iou, same, img, cat, kind, target, gt_used)
    # type tests, per detection over its (contiguous) segment of pairs
    starts = np.flatnonzero(np.r_[True, p_det[1:] != p_det[:-1]])
    seg_det = p_det[starts]
    own, own_j = first_max(np.where(same, p_iou, -1.0), starts, p_gt)
    other, other_k = first_max(np.where(~same, p_iou, -1.0), starts, p_gt)
    dup, dup_d = first_max(np.where(same & gt_used[p_gt], p_iou, -1.0), starts, p_gt)
    top = np.maximum.reduceat(p_iou, starts)
    err = kind[seg_det] != "TP"
    is_loc = (BG_IOU <= own) & (own < FG_IOU)
    is_cls = ~is_loc & (other >= FG_IOU)
    is_dupe = ~is_loc & ~is_cls & (dup >= FG_IOU)
    is_bkg = ~is_loc & ~is_cls & ~is_dupe & (top < BG_IOU)
    is_both = ~is_loc & ~is_cls & ~is_dupe & ~is_bkg
    for mask, name, tgt in ((is_loc, "Loc", own_j), (is_cls, "Cls", other_k), (is_dupe, "Dupe", dup_d),
                            (is_bkg, "Bkg", np.full(len(seg_det), -1)), (is_both, "Both", other_k)):
        m = mask & err
        kind[seg_det[m]] = name
        target[seg_det[m]] = tgt[m]


def _match(p_det, p_gt, p_iou, same, img, cat, kind, target, gt_used) -> None:
    """The evaluator's matching at IoU ``FG_IOU``: per image and class in score order, each detection
    takes the unmatched GT of its class with the highest IoU (the first GT on ties). The pair
    arrays list each detection's pairs together, detections in score order per image."""
    cand = np.flatnonzero(same & (p_iou >= FG_IOU))
    if not len(cand):
        return
    c_det, c_gt, c_iou = p_det[cand], p_gt[cand], p_iou[cand]
    # rank of each candidate detection within its (image, class) group, in score order: the pair
    # arrays hold detections in score order per image, so order of first appearance is score order
    dets, first = np.unique(c_det, return_index=True)
    dets = dets[np.argsort(first, kind="stable")]
    grp = np.unique(pair_keys(img[dets], cat[dets]), return_inverse=True)[1]
    by_grp = np.argsort(grp, kind="stable")
    g_sorted = grp[by_grp]
    g_first = np.searchsorted(g_sorted, g_sorted, "left")
    rank = np.empty(len(dets), np.int64)
    rank[by_grp] = np.arange(len(dets)) - g_first
    det_rank = np.zeros(int(c_det.max()) + 1, np.int64)
    det_rank[dets] = rank
    # candidate pairs by (rank, detection, -IoU, GT index): round r is one slice, each det's best first
    o = np.lexsort((c_gt, -c_iou, c_det, det_rank[c_det]))
    c_det, c_gt, r_of = c_det[o], c_gt[o], det_rank[c_det[o]]
    bounds = np.searchsorted(r_of, np.arange(int(r_of.max()) + 2))
    for r in range(len(bounds) - 1):
        sl = slice(bounds[r], bounds[r + 1])
        free = ~gt_used[c_gt[sl]]
        d, g = c_det[sl][free], c_gt[sl][free]
        if not len(d):
            continue
        take = np.r_[True, d[1:] != d[:-1]]  # each detection's best free GT
        d, g = d[take], g[take]
        gt_used[g] = True  # detections of one round are in different groups: disjoint GT
        kind[d] = "TP"
        target[d] = g


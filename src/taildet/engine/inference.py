"""Inference over a dataset into LVIS/COCO result dicts (evaluation: :mod:`taildet.engine.evaluate`).

A result is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus
``"segmentation"`` (RLE with ``counts`` as str) for mask models, in the ORIGINAL category ids
(``dataset.cat_ids[label]``) and ORIGINAL image coordinates. The model sees the image as the
dataset's transforms made it; boxes are scaled back by ``orig_size / image size``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from taildet.data.loading import list_collate
from taildet.utils.comm import all_gather_object, get_rank, get_world_size, is_main_process

__all__ = ["inference"]

log = logging.getLogger("taildet.engine")


def _encode_masks(masks: torch.Tensor) -> list[dict]:
    import pycocotools.mask as mask_util  # optional: pycocotools, imported on use

    arr = np.asfortranarray(masks.to(torch.uint8).cpu().numpy().transpose(1, 2, 0))
    rles = mask_util.encode(arr)
    for r in rles:
        if isinstance(r["counts"], bytes):
            r["counts"] = r["counts"].decode("ascii")
    return rles


def _to_results(out: dict, image: torch.Tensor, target: dict, cat_ids, max_dets: int | None,
                score_thresh: float) -> list[dict]:
    scores = out["scores"].detach().float().cpu()
    keep = torch.nonzero(scores >= score_thresh).flatten()
    if max_dets is not None and keep.numel() > max_dets:
        keep = keep[torch.topk(scores[keep], max_dets).indices]
    if keep.numel() == 0:
        return []
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    boxes = out["boxes"].detach().float().cpu()[keep].clone()
    labels = out["labels"].detach().cpu()[keep].tolist()
    scores = scores[keep].tolist()
    in_h, in_w = int(image.shape[-2]), int(image.shape[-1])
    if "orig_size" in target:
        oh, ow = (int(v) for v in target["orig_size"])
    else:
        oh, ow = in_h, in_w
    sx, sy = ow / in_w, oh / in_h
    boxes[:, 0::2] = (boxes[:, 0::2] * sx).clamp(0, ow)
    boxes[:, 1::2] = (boxes[:, 1::2] * sy).clamp(0, oh)
    boxes[:, 2:] -= boxes[:, :2]
    image_id = int(target["image_id"])
    rles = None
    if out.get("masks") is not None:
        m = out["masks"].detach()[keep.to(out["masks"].device)]
        if m.dim() == 3:
            m = m[:, None]
        rles = []
        for chunk in torch.split(m, 50):
            chunk = chunk.float()
            if chunk.shape[-2:] != (oh, ow):
                chunk = F.interpolate(chunk, size=(oh, ow), mode="bilinear", align_corners=False)
            rles.extend(_encode_masks(chunk[:, 0] >= 0.5))
    results = []
    for i, (box, label, score) in enumerate(zip(boxes.tolist(), labels, scores)):
        label = int(label)
        if not 0 <= label < len(cat_ids):
            raise ValueError(f"model produced label {label}, outside 0..{len(cat_ids) - 1}")
        r = {"image_id": image_id, "category_id": int(cat_ids[label]),
             "bbox": [round(float(v), 3) for v in box], "score": float(score)}
        if rles is not None:
            r["segmentation"] = rles[i]
        results.append(r)
    return results


class _PerClassTopK:
    """Each category's ``k`` highest-scoring results seen so far (AP-fixed inference keeps memory
    bounded: a category's list is cut back to ``k`` whenever it reaches ``2k``)."""

    def __init__(self, k: int):
        self.k = int(k)
        self.by_cat: dict[int, list[dict]] = {}

    def extend(self, results: list[dict]) -> None:
        for r in results:
            lst = self.by_cat.setdefault(r["category_id"], [])
            lst.append(r)
            if len(lst) >= 2 * self.k:
                lst.sort(key=lambda d: d["score"], reverse=True)
                del lst[self.k:]

    def results(self) -> list[dict]:
        out = []
        for lst in self.by_cat.values():
            lst.sort(key=lambda d: d["score"], reverse=True)
            out.extend(lst[: self.k])
        return out


def _cls_head(model: torch.nn.Module):
    """The detector's :class:`~taildet.models.heads.ClassificationHead` (inside DDP wrappers)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model.cls_head


@torch.no_grad()
def inference(model: torch.nn.Module, dataset, batch_size: int = 8, device: str | torch.device = "cpu",
              max_dets: int | None = 300, score_thresh: float = 1e-4, progress: bool = True,
              num_workers: int = 0, per_class_top_k: int | None = None,
              detector_dets_per_img: int | None = None) -> list[dict]:
    """Run ``model`` (eval mode) over ``dataset``; returns result dicts (all ranks' on rank 0).

    Under DDP each rank processes images ``rank, rank + R, ...``; rank 0 returns the gathered
    list (sorted by image id), other ranks return ``[]``. At most ``max_dets`` detections with
    ``score >= score_thresh`` are kept per image (the LVIS top-300 cap; ``None``: no cap).

    AP-fixed (Dave et al.): ``max_dets=None, per_class_top_k=10000`` keeps each category's
    10,000 best results over the dataset and none else (pruned as inference goes, so memory stays
    bounded), and ``detector_dets_per_img`` raises the detector's own per-image cap
    (``model.cls_head.detections_per_img``) for the run, so that a class's low-scoring detections are not cut
    by the 300 best of other classes.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    rank, world = get_rank(), get_world_size()
    indices = list(range(rank, len(dataset), world))
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=list_collate)
    cat_ids = list(dataset.cat_ids)
    was_training = model.training
    model.eval()
    cap_owner = _cls_head(model) if detector_dets_per_img is not None else None
    old_cap = cap_owner.detections_per_img if cap_owner is not None else None
    if cap_owner is not None:
        cap_owner.detections_per_img = int(detector_dets_per_img)
    top_k = _PerClassTopK(per_class_top_k) if per_class_top_k is not None else None
    results: list[dict] = []
    bar = None
    if progress and is_main_process():
        from tqdm import tqdm  # optional: tqdm, imported on use

        bar = tqdm(total=len(indices), desc="inference", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for images, targets in loader:
            outputs = model([im.to(device, non_blocking=True) for im in images])
            for out, im, tgt in zip(outputs, images, targets):
                dets = _to_results(out, im, tgt, cat_ids, max_dets, score_thresh)
                if top_k is not None:
                    top_k.extend(dets)
                else:
                    results.extend(dets)
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        if cap_owner is not None:
            cap_owner.detections_per_img = old_cap
    if top_k is not None:
        results = top_k.results()
    log.info("inference: %d images in %.1f s on rank %d", len(indices), time.perf_counter() - t0, rank)
    if world > 1:
        gathered = all_gather_object(results)
        if not is_main_process():
            return []
        results = [r for part in gathered for r in part]
        if top_k is not None:
            merged = _PerClassTopK(per_class_top_k)
            merged.extend(results)
            results = merged.results()
    results.sort(key=lambda r: (r["image_id"], -r["score"]))
    return results

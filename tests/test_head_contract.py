"""The classification-head contract (taildet.models.heads), for every entry of LOSSES and
ARCHITECTURES: adding a loss or a detector adds its tests here.

Each detector owns ``model.cls_head`` (a ClassificationHead); a training forward fills
``cls_head.record`` with the loss's inputs; ``cls_head.scores`` applies the logit transform then
the loss's scores; every hook is callable with its default; state dicts saved before the head
(``roi_heads.loss.*``, ``cls_loss.*``, ``[roi_heads.]logit_transform.*``) still load.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taildet.calibration import LogitAdjuster
from taildet.engine.checkpoint import load_model_weights
from taildet.engine.distributed import sync_loss_state
from taildet.losses import LOSSES, build_loss, fill_dataset_statistics
from taildet.losses.base import ClassificationLoss
from taildet.models import ARCHITECTURES, architecture_info, build_model
from taildet.models.heads import ClassificationHead, SampledLogits

C = 4
S = 96
#: the smallest settings every builder takes (tiny backbone, 96 px images, few RoIs / anchors)
SMALL = {
    "faster_rcnn": dict(representation_size=32, box_batch_size_per_image=32, rpn_pre_nms_top_n_train=100,
                        rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50),
    "retinanet": dict(),
    "fcos": dict(num_convs=1),
    "atss": dict(num_convs=1),
}
SMALL["mask_rcnn"] = dict(SMALL["faster_rcnn"], mask_layers=(16,))
SMALL["cascade_rcnn"], SMALL["cascade_mask_rcnn"] = SMALL["faster_rcnn"], SMALL["mask_rcnn"]
#: the architecture each loss kind is tested on
ARCH_OF_KIND = {"two_stage": "faster_rcnn", "one_stage": "retinanet"}
#: a loss with buffers of each kind (so the legacy key test has loss keys to rename)
STATEFUL = {"two_stage": "equilibrium", "one_stage": "equalized_focal"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; avoid OpenMP oversubscription
    yield
    torch.set_num_threads(n)


class _TrainCounts:
    """The training statistics a loss may need, as a dataset has them."""

    instance_counts = [40.0, 10.0, 3.0, 1.0]
    image_counts = [20.0, 6.0, 2.0, 1.0]
    image_frequency = [0.5, 0.15, 0.05, 0.025]


def _loss_kwargs(name: str) -> dict:
    return fill_dataset_statistics(name, None, _TrainCounts())


def _model(arch: str, loss: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(min_size=S, max_size=S, **SMALL[arch])
    if loss is not None:
        kw.update(loss=loss, loss_kwargs=_loss_kwargs(loss) or None)
    return build_model(arch, C, **kw)


def _data(masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, S, S, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0], [50.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([0, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 60.0], [40.0, 40.0, 80.0, 90.0]]), "labels": torch.tensor([2, 1])},
    ]
    if masks:
        for t in targets:
            m = torch.zeros(len(t["boxes"]), S, S, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(t["boxes"].long().tolist()):
                m[j, y1:y2, x1:x2] = 1
            t["masks"] = m
    return images, targets


def _loss_arch(name: str) -> str:
    return ARCH_OF_KIND[build_loss(name, C, **_loss_kwargs(name)).kind]


def _prefix(model: nn.Module, head: ClassificationHead) -> str:
    """The state-dict prefix of ``head`` in ``model`` (``cls_head.``; a cascade's ``cls_heads.2.``)."""
    return next(name for name, m in model.named_modules() if m is head) + "."


def _check_record(head: ClassificationHead, two_stage: bool) -> None:
    r = head.record
    assert isinstance(r, SampledLogits)
    n, k = r.logits.shape
    assert k == head.num_outputs and n > 0 and not r.logits.requires_grad
    assert r.labels.shape == (n,) and r.labels.dtype == torch.int64
    assert int(r.labels.min()) >= -1 and int(r.labels.max()) <= C
    assert bool((r.labels == C).any())  # background rows are recorded
    if two_stage:  # sampled RoIs: GT ids unique over the batch, image ids, pooled features
        assert r.gt_index.shape == (n,) and r.image_index.shape == (n,)
        assert torch.equal(r.gt_index < 0, r.labels == C)
        assert int(r.gt_index.max()) <= 3 and set(r.image_index.tolist()) == {0, 1}
        assert r.features is not None and r.features.shape[0] == n
    else:  # every anchor of the batch
        assert r.gt_index is None and r.image_index is None and r.features is None
    kept = r.kept()
    assert bool((kept.labels >= 0).all()) and kept.logits.shape[0] == int((r.labels >= 0).sum())


# ---------------------------------------------------------------------------------------------
# every architecture


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_owns_a_cls_head_and_fills_its_record(arch: str) -> None:
    model = _model(arch)
    head = model.cls_head
    assert isinstance(head, ClassificationHead) and isinstance(head.loss, ClassificationLoss)
    assert head.num_classes == C and head.num_outputs == head.loss.num_outputs()
    stage = "roi_heads" if head.loss.kind == "two_stage" else "head"
    stages = architecture_info(arch).stages  # a cascade: one head per stage, cls_head the last
    assert head.stage == (stage if stages == 1 else f"{stage}.{stages - 1}")
    assert head.logit_transform is None and head.record is None and head.detections_per_img == 300
    prefix = _prefix(model, head)
    assert any(k.startswith(prefix) for k in model.state_dict()) or not list(head.loss.state_dict())
    images, targets = _data(masks=architecture_info(arch).masks)
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    _check_record(head, two_stage=head.loss.kind == "two_stage")
    head.record_logits = False
    model(images, targets)  # a one-stage forward clears the record; a two-stage one keeps the last
    head.clear()
    assert head.record is None


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_scores_through_the_head_and_caps_detections(arch: str) -> None:
    model = _model(arch)
    head = model.cls_head
    model.eval()
    images, _ = _data()
    head.detections_per_img = 5
    with torch.no_grad():
        plain = model(images)
        head.logit_transform = LogitAdjuster(torch.tensor(_TrainCounts.instance_counts), tau=3.0,
                                             background=head.background_index is not None)
        adjusted = model(images)
    assert all(len(d["boxes"]) <= 5 for d in plain + adjusted)
    assert any(k.startswith(_prefix(model, head) + "logit_transform.") for k in model.state_dict())
    assert [d["scores"].tolist() for d in plain] != [d["scores"].tolist() for d in adjusted]
    z = torch.randn(7, head.num_outputs)
    torch.testing.assert_close(head.scores(z), head.loss.scores(head.logit_transform(z)))
    head.logit_transform = None
    torch.testing.assert_close(head.scores(z), head.loss.scores(z))


@pytest.mark.parametrize("arch", [a for a in sorted(ARCHITECTURES) if architecture_info(a).stages == 1])
def test_legacy_state_dict_keys_load(arch: str) -> None:  # (cascades came after the legacy names)
    """A state dict with the key names of the code before ``cls_head`` loads (strict), directly
    and through the checkpoint loader, and gives the same tensors."""
    loss = STATEFUL[_model(arch).cls_head.loss.kind]
    src = _model(arch, loss)
    head = src.cls_head
    head.logit_transform = LogitAdjuster(torch.tensor(_TrainCounts.instance_counts),
                                         background=head.background_index is not None)
    with torch.no_grad():
        for b in head.buffers():
            b.copy_(torch.rand_like(b.float()).to(b.dtype) + 1)
    state = src.state_dict()
    loss_key, transform_key = (("roi_heads.loss.", "roi_heads.logit_transform.") if head.stage == "roi_heads"
                               else ("cls_loss.", "logit_transform."))
    legacy = {k.replace("cls_head.loss.", loss_key).replace("cls_head.logit_transform.", transform_key): v
              for k, v in state.items()}
    assert not any(k.startswith("cls_head.") for k in legacy) and any(k.startswith(loss_key) for k in legacy)
    for load in ("load_state_dict", "load_model_weights"):
        dst = _model(arch, loss)
        dst.cls_head.logit_transform = LogitAdjuster(torch.ones(C), background=head.background_index is not None)
        if load == "load_state_dict":
            dst.load_state_dict(legacy)
        else:
            load_model_weights(dst, legacy, "legacy")
        got = dst.state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], v) for k, v in state.items()), load


# ---------------------------------------------------------------------------------------------
# every loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_trains_and_scores_through_the_head(name: str) -> None:
    arch = _loss_arch(name)
    model = _model(arch, name)
    head = model.cls_head
    model.train()
    losses = model(*_data())
    assert torch.isfinite(losses["loss_classifier" if arch == "faster_rcnn" else "classification"])
    _check_record(head, two_stage=arch == "faster_rcnn")
    z = torch.randn(6, head.num_outputs)
    scores = head.scores(z)
    assert scores.shape == (6, C) and torch.equal(scores, head.loss.scores(z))
    head.logit_transform = _Shift()
    torch.testing.assert_close(head.scores(z), head.loss.scores(z + 1.0))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_hooks_are_callable_with_defaults(name: str) -> None:
    """Every hook exists on every loss and on the head: update, before_backward, sync_state
    (no-op in one process), observe_memory, uses_quality."""
    loss = build_loss(name, C, **_loss_kwargs(name))
    head = ClassificationHead(loss, stage="test", detections_per_img=10)
    k = loss.num_outputs()
    logits, labels = torch.randn(5, k), torch.tensor([0, 1, 2, 3, 1])
    before = {n: b.clone() for n, b in loss.state_dict().items()}
    head.before_backward(1.0)
    assert head.sync_state() >= 1 and sync_loss_state(head) == head.sync_state()
    assert isinstance(head.uses_quality, bool) and head.uses_quality == bool(loss.uses_quality)
    assert all(torch.equal(before[n], b) for n, b in loss.state_dict().items())  # no state change so far
    head.update(logits, labels, torch.arange(5))
    head.observe_memory(logits, labels)
    loss.before_backward(2.0)
    loss.sync_state()


def test_head_rejects_what_is_not_a_loss() -> None:
    with pytest.raises(TypeError, match="ClassificationLoss"):
        ClassificationHead(nn.Identity(), stage="head", detections_per_img=1)  # type: ignore[arg-type]


class _Shift(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0

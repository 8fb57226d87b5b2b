"""The pretrained regime of the embedded benchmark: a tiny backbone pretrained on balanced crops.

Detectors on LVIS start from an ImageNet-pretrained backbone, with the first stages frozen. The
embedded benchmark's default regime trains the tiny backbone from scratch on the long-tailed
detection data; the *pretrained regime* gives it what LVIS detectors have: a backbone pretrained
on a class-balanced classification task (:func:`taildet.data.balanced_crops.make_balanced_crops`,
the same generator's objects, every class in equal number, its own seed, never the detection
images), loaded with frozen BatchNorm and its first two stages frozen.

Recipe (:class:`PretrainRecipe`, fixed; not tuned per detection method): the tiny network
(default widths, dilated 4th stage as the detectors use it) with global average pooling of the
last stage and a linear classifier over the 48 classes; 200 crops per class (48 px windows of
96 px images, random horizontal flip), SGD momentum 0.9, lr 0.1 with 50 warm-up steps and a
cosine decay, weight decay 5e-4, batch 128, 10 epochs, on one CPU thread (about 1-2 minutes);
top-1 accuracy on a held-out balanced split of 50 crops per class. Images are normalised with
the ImageNet mean/std, as the detectors' transforms do. Deterministic: the same recipe gives the
same state dict (torch's RNG is forked and seeded; one thread).

Output: a torchvision-format state dict of the backbone only (``stage1.0.0.weight``, ...,
including BatchNorm statistics; no classifier), written atomically, with a sidecar
``<file>.json`` recording the recipe, its hash and the measured accuracies.

Selecting the regime in a detection config (:data:`PRETRAINED_REGIME_OVERRIDES`)::

    model:
      backbone_weights: synthetic-pretrained   # or a path written by `taildet pretrain-backbone`
      trainable_backbone_layers: 2             # stages 3-4 train; 1-2 frozen (as torchvision/
                                               # detectron2 freeze a ResNet up to stride 4)

``synthetic-pretrained`` is resolved by :func:`resolve_backbone_weights` to
``<parent of data.root>/pretrained/tiny_synthetic_<hash>.pth``, pretrained on first use and
reused afterwards (a file lock keeps parallel runs from pretraining twice). With
``data.synthetic.vocabulary: lvis`` the pretraining task covers that vocabulary's 150 classes
(64 training / 16 held-out crops each: the same 9,600 / 2,400 crops in all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from taildet.data.balanced_crops import make_balanced_crops
from taildet.data.synthetic import GENERATOR_VERSION, _vocabulary
from taildet.errors import ConfigError, TrainingDivergedError
from taildet.fileio import atomic_write, atomic_write_text
from taildet.models.backbones import TinyBackbone
from taildet.utils.comm import broadcast_object, is_main_process

log = logging.getLogger("taildet")

__all__ = [
    "PRETRAINED_REGIME_OVERRIDES",
    "PRETRAINED_TRAINABLE_LAYERS",
    "REGIMES",
    "PretrainRecipe",
    "Regime",
    "SYNTHETIC_PRETRAINED",
    "default_cache_dir",
    "ensure_pretrained_backbone",
    "pretrain_backbone",
    "resolve_backbone_weights",
]

#: The value of ``model.backbone_weights`` that selects the cached pretrained tiny backbone.
SYNTHETIC_PRETRAINED = "synthetic-pretrained"
#: Stages that train in the pretrained regime (tiny: stages 3-4; stages 1-2, up to stride 4, frozen).
PRETRAINED_TRAINABLE_LAYERS = 2
#: Overrides that turn any recipe on the tiny backbone into the pretrained regime.
PRETRAINED_REGIME_OVERRIDES = (
    f"model.backbone_weights={SYNTHETIC_PRETRAINED}",
    f"model.trainable_backbone_layers={PRETRAINED_TRAINABLE_LAYERS}",
)


@dataclass(frozen=True)
class Regime:
    """A regime of the embedded benchmark: the data (``vocabulary``, ``scale``) and the config
    overrides every recipe gets. A runner names the data directory after ``vocabulary`` and
    ``scale`` too (one directory per dataset), and passes ``overrides`` to every stage-1,
    stage-2 and post-hoc run alike."""

    vocabulary: str = "default"
    scale: float = 1.0
    overrides: tuple[str, ...] = ()
    about: str = ""

    def data_overrides(self) -> tuple[str, ...]:
        return (f"data.synthetic.vocabulary={self.vocabulary}", f"data.synthetic.scale={self.scale:g}")

    def all_overrides(self) -> tuple[str, ...]:
        return self.data_overrides() + self.overrides


#: The regimes, fixed before any method is compared.
REGIMES: dict[str, Regime] = {
    "scratch": Regime(about="tiny backbone from a random init, 48 classes (the demo)"),
    "pretrained": Regime(overrides=PRETRAINED_REGIME_OVERRIDES,
                         about="tiny backbone pretrained on balanced crops, stages 1-2 and BN frozen"),
    "lvis150": Regime("lvis", 0.25, about="150 classes with LVIS v1's r/c/f shares, from scratch"),
    "lvis150_pretrained": Regime("lvis", 0.25, PRETRAINED_REGIME_OVERRIDES,
                                 about="150 classes, backbone pretrained on their balanced crops"),
}

#: Bump when the training code changes what a recipe produces (invalidates the cache).
PRETRAIN_VERSION = 1

_MEAN = (0.485, 0.456, 0.406)  # the detectors' transform normalisation (ImageNet's)
_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything the pretrained weights depend on (their cache key)."""

    seed: int = 1000
    per_class: int = 200
    heldout_per_class: int = 50
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    flip_prob: float = 0.5
    crop_size: int = 48
    image_size: int = 96
    vocabulary: str = "default"

    @classmethod
    def for_vocabulary(cls, vocabulary: str = "default", **kwargs: Any) -> "PretrainRecipe":
        """The default recipe over ``vocabulary``'s classes with the default's numbers of crops
        (9,600 training, 2,400 held-out: 200 / 50 per class for 48 classes, 64 / 16 for 150)."""
        n = _vocabulary(vocabulary).num_classes
        base = {"per_class": max(1, round(9600 / n)), "heldout_per_class": max(1, round(2400 / n))}
        return cls(**{**base, **kwargs, "vocabulary": vocabulary})

    def __post_init__(self):
        for name in ("seed", "heldout_per_class"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"pretrain {name}: expected an integer >= 0, got {v!r}")
        for name in ("per_class", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"pretrain {name}: expected an integer >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"pretrain lr: expected a positive number, got {self.lr!r}")
        _vocabulary(self.vocabulary)

    def record(self) -> dict[str, Any]:
        """The cache key: the recipe, the generator version and the training-code version."""
        return {"kind": "taildet tiny backbone, balanced synthetic crops",
                "generator_version": GENERATOR_VERSION, "pretrain_version": PRETRAIN_VERSION,
                **dataclasses.asdict(self)}

    def digest(self) -> str:
        text = json.dumps(self.record(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _to_tensor(images) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _Classifier(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.backbone = TinyBackbone()
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)["0"].mean((2, 3)))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x))


def pretrain_backbone(out: str | os.PathLike, recipe: PretrainRecipe | None = None, *,
                      progress: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Pretrain the tiny backbone with ``recipe`` and write its state dict to ``out`` (atomically)
    and ``out + '.json'`` (the record). Returns that record: the recipe, ``digest``,
    ``heldout_top1``, ``train_top1`` (last epoch, augmented), ``chance``, ``seconds``.

    ``threads`` (default 1) is set for the duration, so the bytes do not depend on the machine's
    core count; ``None`` keeps torch's setting.
    """
    from tqdm import tqdm  # optional: tqdm, imported on use (progress bars only)

    recipe = recipe or PretrainRecipe()
    out = Path(out)
    t0, c0 = time.perf_counter(), time.process_time()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        r = recipe
        train = make_balanced_crops(r.seed, r.per_class, "train", crop_size=r.crop_size,
                                    image_size=r.image_size, vocabulary=r.vocabulary, progress=progress)
        x, y = _to_tensor(train["images"]), torch.from_numpy(train["labels"])
        if r.heldout_per_class:
            held = make_balanced_crops(r.seed, r.heldout_per_class, "heldout", crop_size=r.crop_size,
                                       image_size=r.image_size, vocabulary=r.vocabulary, progress=progress)
            hx, hy = _to_tensor(held["images"]), torch.from_numpy(held["labels"])
        num_classes = int(train["num_classes"])
        t_render = time.perf_counter() - t0

        torch.manual_seed(r.seed)
        gen = torch.Generator().manual_seed(r.seed)
        model = _Classifier(num_classes)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": r.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, momentum=r.momentum)
        steps_per_epoch = math.ceil(len(x) / r.batch_size)
        total = steps_per_epoch * r.epochs

        def lr_at(step: int) -> float:
            if step < r.warmup_steps:
                return r.lr * (step + 1) / r.warmup_steps
            t = (step - r.warmup_steps) / max(1, total - r.warmup_steps)
            return 0.5 * r.lr * (1 + math.cos(math.pi * t))

        step = 0
        bar = tqdm(total=total, desc="pretrain tiny backbone", unit="step", disable=not progress, leave=False)
        train_correct = 0
        for _ in range(r.epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            train_correct = 0
            for i in range(0, len(x), r.batch_size):
                idx = perm[i:i + r.batch_size]
                xb, yb = x[idx], y[idx]
                flip = torch.rand(len(idx), generator=gen) < r.flip_prob
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                logits = model(xb)
                loss = nn.functional.cross_entropy(logits, yb)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"pretraining diverged at step {step} (loss {loss.item()})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                train_correct += int((logits.argmax(1) == yb).sum())
                step += 1
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        heldout = _accuracy(model, hx, hy) if r.heldout_per_class else None
        state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}

    seconds = time.perf_counter() - t0
    info = {**recipe.record(), "digest": recipe.digest(), "num_classes": num_classes,
            "train_crops": len(x), "heldout_crops": len(hx) if r.heldout_per_class else 0,
            "heldout_top1": heldout, "train_top1": train_correct / len(x), "chance": 1.0 / num_classes,
            "seconds": round(seconds, 1), "render_seconds": round(t_render, 1),
            "cpu_seconds": round(time.process_time() - c0, 1),  # wall time depends on other load
            "threads": threads if threads is not None else torch.get_num_threads()}
    atomic_write(out, lambda fh: torch.save(state, fh))
    atomic_write_text(json.dumps(info, indent=1) + "\n", _sidecar(out))
    log.info("pretrained tiny backbone: held-out top-1 %s (chance %.3f), %.0f s -> %s",
             "n/a" if heldout is None else f"{heldout:.3f}", 1.0 / num_classes, seconds, out)
    return info


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar record of a pretrained file, or None when it is missing or unreadable."""
    try:
        with open(_sidecar(Path(path)), encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _matches(path: Path, recipe: PretrainRecipe) -> dict[str, Any] | None:
    rec = read_record(path)
    if rec is None or not path.is_file():
        return None
    want = recipe.record()
    if any(rec.get(k) != v for k, v in want.items()):
        return None
    return rec


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # optional: fcntl is POSIX-only (no lock elsewhere)
    except ImportError:  # pragma: no cover - non-POSIX: no lock, an atomic write still protects readers
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_path(cache_dir: str | os.PathLike, recipe: PretrainRecipe | None = None) -> Path:
    """Where :func:`ensure_pretrained_backbone` keeps the weights of ``recipe``."""
    recipe = recipe or PretrainRecipe()
    return Path(cache_dir) / f"tiny_synthetic_{recipe.digest()}.pth"


def ensure_pretrained_backbone(cache_dir: str | os.PathLike, recipe: PretrainRecipe | None = None, *,
                               progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The cached pretrained weights of ``recipe`` under ``cache_dir``: ``(path, record)``.

    Pretrains (:func:`pretrain_backbone`) only when no file with a matching record is there;
    ``record["reused"]`` says which. Concurrent callers wait on a lock file and then reuse.
    """
    recipe = recipe or PretrainRecipe()
    path = cached_path(cache_dir, recipe)
    rec = _matches(path, recipe)
    if rec is not None:
        return path, {**rec, "reused": True}
    with _file_lock(path.with_name(path.name + ".lock")):
        rec = _matches(path, recipe)  # another process may have finished it while we waited
        if rec is not None:
            return path, {**rec, "reused": True}
        log.info("pretraining the tiny backbone on balanced synthetic crops (cached at %s)", path)
        rec = pretrain_backbone(path, recipe, progress=progress)
    return path, {**rec, "reused": False}


def default_cache_dir(data_root: str | os.PathLike) -> Path:
    """``<parent of data.root>/pretrained``: shared by every data seed's dataset directory."""
    return Path(os.path.abspath(os.fspath(data_root))).parent / "pretrained"


def resolve_backbone_weights(cfg, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` (model builder keywords) with ``backbone_weights: synthetic-pretrained`` replaced
    by the cached file's path (pretrained on first use, by the main process under DDP)."""
    if kwargs.get("backbone_weights") != SYNTHETIC_PRETRAINED:
        return kwargs
    if kwargs.get("backbone", "tiny") != "tiny":
        raise ConfigError(f"model.backbone_weights: {SYNTHETIC_PRETRAINED!r} is a tiny backbone; "
                          f"model.backbone is {kwargs.get('backbone')!r}")
    synthetic = getattr(cfg.data, "synthetic", None)
    vocabulary = getattr(synthetic, "vocabulary", "default") if synthetic is not None else "default"
    path = None
    if is_main_process():
        path, rec = ensure_pretrained_backbone(default_cache_dir(cfg.data.root),
                                               PretrainRecipe.for_vocabulary(vocabulary), progress=False)
        path = str(path)
        log.info("model.backbone_weights: %s -> %s (%s; held-out top-1 %s)", SYNTHETIC_PRETRAINED, path,
                 "cached" if rec["reused"] else "pretrained now", rec.get("heldout_top1"))
    path = broadcast_object(path)
    return {**kwargs, "backbone_weights": path}

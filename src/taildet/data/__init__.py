"""Data: LVIS/COCO reading and validation, transforms, samplers, the embedded long-tail dataset.

Public API::

    load_lvis(path, image_root=None, ...) -> LVISDataset   # .categories, .frequency_groups,
                                                            # .image_counts, .instance_counts, ...
    check_same_categories(train_ds, val_ds)
    build_transforms(train, min_sizes, max_size, flip_prob)
    TrainingSampler, RepeatFactorSampler, ClassBalancedSampler   # DDP-aware, seeded, set_epoch(e)
    taildet.data.synthetic.make_dataset(out_dir, seed=0, scale=1.0)
    taildet.data.stats.dataset_stats(ann_path)
"""

from taildet.data.lvis import LVISDataset, check_same_categories, frequency_group, load_lvis
from taildet.data.samplers import (
    ClassBalancedSampler,
    RandomSampler,
    RepeatFactorSampler,
    TrainingSampler,
)
from taildet.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
)

__all__ = [
    "LVISDataset",
    "load_lvis",
    "check_same_categories",
    "frequency_group",
    "TrainingSampler",
    "RandomSampler",
    "RepeatFactorSampler",
    "ClassBalancedSampler",
    "Compose",
    "ResizeShortestEdge",
    "RandomHorizontalFlip",
    "build_transforms",
]

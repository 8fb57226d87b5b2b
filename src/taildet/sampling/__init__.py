"""Feature-level sampling for long-tailed detection: LOCE's memory-augmented feature sampling (MFS).

One file per part of the method (methods.md section 2):

* :mod:`~taildet.sampling.jitter` -- the box generator (16 jittered boxes around every GT box);
* :mod:`~taildet.sampling.memory_bank` -- the class memory (per-class ring buffer of RoI features);
* :mod:`~taildet.sampling.class_sampler` -- the probabilistic sampler (``P(c) ~ 1 / s_c``);
* :mod:`~taildet.sampling.mfs` -- :class:`MemoryAugmentedSampling`, the object the RoI head calls,
  and :func:`attach_mfs`;
* :mod:`~taildet.sampling.prefill` -- the class-balanced memory pre-fill and the mean-score
  observation pass (training forwards without gradients).

The mean-score figure (the paper's Fig. 4) is :func:`taildet.analysis.plots.plot_mean_score_vs_instances`.
"""

from taildet.sampling.class_sampler import ProbabilisticSampler
from taildet.sampling.jitter import SIGN_PATTERNS, jitter_boxes, make_batch_entries, make_memory_entries
from taildet.sampling.memory_bank import ClassMemory
from taildet.sampling.mfs import MemoryAugmentedSampling, MemoryBatch, attach_mfs, check_frozen_features
from taildet.sampling.prefill import observe_mean_score, prefill_image_indices, prefill_memory

__all__ = [
    "SIGN_PATTERNS",
    "jitter_boxes",
    "make_memory_entries",
    "make_batch_entries",
    "ClassMemory",
    "ProbabilisticSampler",
    "MemoryBatch",
    "MemoryAugmentedSampling",
    "check_frozen_features",
    "attach_mfs",
    "prefill_image_indices",
    "prefill_memory",
    "observe_mean_score",
]

"""Feature-level sampling for long-tailed detection: LOCE's memory-augmented feature sampling.

See :mod:`taildet.sampling.memory` (box generator, class memory, probabilistic sampler, the
``MemoryAugmentedSampling`` object the RoI head calls, pre-fill and the mean-score plot).
"""

from taildet.sampling.memory import (
    SIGN_PATTERNS,
    ClassMemory,
    MemoryAugmentedSampling,
    MemoryBatch,
    ProbabilisticSampler,
    attach_mfs,
    check_frozen_features,
    jitter_boxes,
    make_batch_entries,
    make_memory_entries,
    observe_mean_score,
    plot_mean_score_vs_instances,
    prefill_image_indices,
    prefill_memory,
)

from taildet.sampling.memory import __all__  # noqa: E402,F401  (one list, in memory.py)

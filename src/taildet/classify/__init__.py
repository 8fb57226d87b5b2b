"""Long-tailed image classification (``taildet classify``): datasets and the CIFAR-LT split
builder (:mod:`~taildet.classify.splits`, :mod:`~taildet.classify.data`), ResNet-32 and torchvision
classifiers (:mod:`~taildet.classify.models`), taildet's losses in classification form
(:mod:`~taildet.classify.losses`), training on the detection engine's loop and cRT
(:mod:`~taildet.classify.engine`), post-hoc LogN / logit adjustment / tau-normalisation and the
long-tail metrics (:mod:`~taildet.classify.posthoc`), and the multi-seed demo
(:mod:`~taildet.classify.demo`).

Submodules are imported on use: ``import taildet.classify`` loads nothing heavy.
"""

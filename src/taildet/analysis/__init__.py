"""Analysis of trained models and training-time method state (figures: :mod:`taildet.analysis.plots`)."""

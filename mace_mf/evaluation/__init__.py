"""Judging a model: predictions, error metrics per split and fidelity, displacement-pair scores,
plots, evaluating any model file on any data, and the MD stability check."""

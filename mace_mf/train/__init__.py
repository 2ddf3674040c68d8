"""Optimising a model: the masked multi-fidelity loss, the optimiser and its parameter groups, the
training loop, versioned checkpoints, several processes under torchrun, and experiment tracking."""

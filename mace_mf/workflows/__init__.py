"""What a command does end to end: one training run and its folder, the run report, the comparison
benchmark, sweeps, and mace-torch's own multi-head fine-tuning as a comparison arm."""

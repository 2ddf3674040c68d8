"""The configurations: files read into per-fidelity labels (missing ones masked, never faked),
graphs, the recipe's splits and label subsets, displacement pairs, and choosing which geometries
get expensive labels."""

"""Computing labels with a calculator (xTB, PySCF, a MACE file, any ASE calculator), in parallel,
resumably, cached by content. Imports neither torch nor mace at module level: a labelling worker
starts in well under a second."""

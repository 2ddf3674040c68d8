"""The network: the foundation loaded and described, one readout head per fidelity made from its
readout, the couplings between heads, the shared-backbone forward that reads every head from one
pass, the one builder of a recipe's model, and the files exported for stock MACE and MD engines."""

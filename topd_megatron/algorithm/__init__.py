"""The method: vocab-parallel divergences, TOPD detection, the objective, and the batch layout they work on."""

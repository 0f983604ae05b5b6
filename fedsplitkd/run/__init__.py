"""A run from its config: assembling the experiment, its results directory and its checkpoints."""

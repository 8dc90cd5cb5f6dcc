"""One training run: the loop, its run directory, checkpoints, resume, metrics and summary."""

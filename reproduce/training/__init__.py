"""Training: the run config, the loop (engine), checkpoints, distributed helpers, the train CLI."""

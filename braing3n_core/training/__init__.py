"""Stages as data and the one training loop every face of the system runs; stage checkpoints; centralized training."""

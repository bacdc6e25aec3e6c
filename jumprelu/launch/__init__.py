"""Experiments and where they run: experiment loading and sweep expansion, the local sweep
runner, Cloud TPU slices and the scale planner."""

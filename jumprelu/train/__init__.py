"""Training: meshes and shardings, the train state, the optimizer, the pure step, the compiled
program, the loop, checkpoints, multi-host helpers, the metrics log and the final report."""

"""Training: meshes and shardings, the train state, the optimizer, the pure step, the compiled
program, the loop, checkpoints and resuming, multi-host helpers, the metrics log, the final
report, and what keeps a run safe: the workdir lock, the divergence guard and preemption."""

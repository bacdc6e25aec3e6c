"""Evaluation math that needs only a folded SAE and rows: L0, FVU, firing frequencies
(metrics), Pareto interpolation (pareto) and the plots."""

"""Activation sources behind the `data.source` config field."""

from __future__ import annotations

import numpy as np

from jumprelu.config import ConfigError
from jumprelu.data import synthetic
from jumprelu.data.arrays import ArraySource, DataError, estimate_scale, load_npy

__all__ = ["ArraySource", "DataError", "estimate_scale", "open_source", "ground_truth"]


def open_source(data_cfg) -> ArraySource:
    """The training source named by `data.source`, checked against `data.d_model`."""
    if data_cfg.source == "synthetic":
        spec = synthetic.SyntheticSpec.from_config(data_cfg.synthetic)
        rows, name = synthetic.generate(spec), "synthetic"
    elif str(data_cfg.source).endswith(".npy"):
        rows, name = load_npy(data_cfg.source), data_cfg.source
    else:
        raise ConfigError(
            f"config field data.source must be 'synthetic' or a path to a .npy file, found {data_cfg.source!r}"
        )
    source = ArraySource(rows, eval_rows=data_cfg.eval_rows, seed=data_cfg.seed, name=name)
    if data_cfg.d_model is not None and data_cfg.d_model != source.d_model:
        raise ConfigError(
            f"config field data.d_model is {data_cfg.d_model} but data.source {name} has d_model {source.d_model}"
        )
    return source


def ground_truth(data_cfg) -> np.ndarray | None:
    """The true feature directions [F, d] when the source is synthetic, else None."""
    if data_cfg.source != "synthetic":
        return None
    return synthetic.true_directions(synthetic.SyntheticSpec.from_config(data_cfg.synthetic))

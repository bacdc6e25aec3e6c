"""Activation sources behind the `data.source` config field."""

from __future__ import annotations

import numpy as np

from jumprelu.config import ConfigError
from jumprelu.data import synthetic
from jumprelu.data.arrays import ArraySource, DataError, estimate_scale, load_npy

__all__ = ["ArraySource", "DataError", "estimate_scale", "open_source", "ground_truth", "source_d_model"]


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


def source_d_model(data_cfg) -> int:
    """d_model without reading the data: `data.d_model`, else the synthetic spec or the .npy header."""
    if data_cfg.d_model is not None:
        return data_cfg.d_model
    if data_cfg.source == "synthetic":
        return data_cfg.synthetic.d_model
    try:
        shape = np.load(data_cfg.source, mmap_mode="r", allow_pickle=False).shape
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"data.source {data_cfg.source}: cannot read its shape ({e})") from None
    if len(shape) != 2:
        raise DataError(f"data.source {data_cfg.source}: expected shape [N, d_model], found {list(shape)}")
    return int(shape[1])


def ground_truth(data_cfg) -> np.ndarray | None:
    """The true feature directions [F, d] when the source is synthetic, else None."""
    if data_cfg.source != "synthetic":
        return None
    return synthetic.true_directions(synthetic.SyntheticSpec.from_config(data_cfg.synthetic))

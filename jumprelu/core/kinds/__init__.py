"""The registry of SAE kinds behind `sae.kind`.

A kind is one module in this package that calls `register(KindSpec(...))` with everything the
rest of the framework needs to know about it:

  config_fields  () -> its own `sae.*` fields and their defaults (added to the base config;
                 a function, so each config gets fresh placeholder references)
  validate       (sae_cfg, check) -> None: checks those fields, one-line errors naming them
  param_specs    PartitionSpecs of its arrays beyond the shared W_enc/b_enc/W_dec/b_dec,
                 parameters and non-gradient stats alike (`jumprelu.core.layout`)
  build          (sae_cfg, d_model, train_steps) -> Kind: the Linen model, the loss, init_stats, export
                 (train_steps: the run's length, for schedules in the loss; 0 outside training)
  stackable      whether K of them can be trained in one vmapped step (a λ sweep)
  needs_data, init_from_data   an optional data-dependent start (b_dec, θ from a sample of rows)

and a `Kind` gives
  model:       a Linen module (parameters W_enc, b_enc, W_dec, b_dec plus its own)
  loss:        (model, params, stats, x, coefficient) -> (loss, (metrics, new stats))
  init_stats:  its non-gradient state (dead-latent counters, BatchTopK's threshold), or {}
  export:      (params, stats) -> JumpReLU parameters {W_enc, b_enc, threshold, W_dec, b_dec}
               in normalised units, plus `k` for TopK, which no JumpReLU can express

Adding a kind is adding one module here (and its name to `_MODULES`) plus its tests; a kind
defined elsewhere registers itself when its module is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from jax.sharding import PartitionSpec

from jumprelu.core import layout
from jumprelu.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    model: object  # a core.sae.SAEBase
    loss: Callable
    init_stats: Callable[[], dict]
    export: Callable[[dict, dict], dict]
    step_path: str = "dense"  # which step this config compiles and why (sae.sparse), for the run's log


@dataclasses.dataclass(frozen=True)
class KindSpec:
    name: str
    build: Callable[..., Kind]  # (sae_cfg, d_model, train_steps) -> Kind
    config_fields: Callable[[], dict] = dict
    validate: Callable = lambda sae_cfg, check: None  # noqa: E731
    param_specs: dict[str, PartitionSpec] = dataclasses.field(default_factory=dict)
    stackable: bool = False
    # Data-dependent start (optional): needs_data(sae_cfg) says whether init_from_data(params,
    # stats, rows [N, d] normalised, sae_cfg) -> (params, stats) must run once at step 0; a kind
    # that reads held-out rows (JumpReLU's sae.target_l0_held_out_rows) also gets held_out=[N', d].
    needs_data: Callable = lambda sae_cfg: False  # noqa: E731
    init_from_data: Callable | None = None


_REGISTRY: dict[str, KindSpec] = {}
# The modules that register the built-in kinds, imported on first use of the registry.
_MODULES = ("jumprelu", "relu", "gated", "topk")


def register(spec: KindSpec) -> KindSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"SAE kind {spec.name!r} is registered twice")
    clash = set(spec.param_specs) & set(layout.SHARED_SPECS)
    if clash:
        raise ValueError(f"SAE kind {spec.name!r} redeclares the shared arrays {sorted(clash)}")
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> dict[str, KindSpec]:
    for module in _MODULES:  # registers each built-in kind on first import; later calls are lookups
        importlib.import_module(f"{__name__}.{module}")
    return _REGISTRY


def names() -> tuple[str, ...]:
    return tuple(_load())


def spec(name: str) -> KindSpec:
    kinds = _load()
    if name not in kinds:
        raise ConfigError(f"config field sae.kind must be one of {tuple(kinds)}, found {name!r}")
    return kinds[name]


def config_fields() -> dict:
    """Every kind's own `sae.*` fields with their defaults (two kinds may share a field)."""
    fields = {}
    for s in _load().values():
        fields.update(s.config_fields())
    return fields


def array_specs() -> dict[str, PartitionSpec]:
    """The PartitionSpec of every array name any kind declares, shared ones included."""
    specs = dict(layout.SHARED_SPECS)
    for s in _load().values():
        for name, p in s.param_specs.items():
            if specs.get(name, p) != p:
                raise ValueError(f"array {name!r} is declared with two different shardings")
            specs[name] = p
    return specs


def from_config(sae_cfg, d_model: int, train_steps: int = 0) -> Kind:
    """The kind named by `sae.kind`, built from the `sae` config section (train_steps: the run's
    length, which a schedule inside a loss needs; 0 where no loss is computed)."""
    return spec(sae_cfg.kind).build(sae_cfg, d_model, train_steps)


# `sae.sparse`, shared by the kinds with a sparse path (JumpReLU's step, TopK's decoder).
SPARSE_MODES = ("auto", "on", "off")


# `sae.matmul_precision`: "default" leaves the backend's own precision for float32 products.
MATMUL_PRECISIONS = ("default", "high", "highest")


def matmul_precision(sae_cfg):
    """The context the SAE's programs are traced in: jax.default_matmul_precision of
    `sae.matmul_precision`, or nothing for "default" (configs saved before the field included)."""
    import contextlib

    import jax

    precision = sae_cfg.get("matmul_precision", "default")
    return contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision)


def common_module_args(sae_cfg, d_model: int) -> dict:
    """The SAEBase fields every kind's module takes from the config."""
    import jax.numpy as jnp

    return dict(
        d_model=d_model,
        width=sae_cfg.width,
        pre_encoder_bias=sae_cfg.pre_encoder_bias,
        compute_dtype=jnp.dtype(sae_cfg.compute_dtype),
        encoder_init_scale=sae_cfg.get("encoder_init_scale", 1.0),
    )


def jumprelu_arrays(params: dict, threshold) -> dict:
    """The five JumpReLU arrays of an export, from a kind's params and its θ."""
    return {
        "W_enc": params["W_enc"],
        "b_enc": params["b_enc"],
        "threshold": threshold,
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }

"""SAE kinds behind `sae.kind`: one interface for the train step, checkpoints, export and evaluation.

Each kind gives
  model:       a Linen module (parameters W_enc, b_enc, W_dec, b_dec plus its own)
  loss:        (model, params, stats, x, coefficient) -> (loss, (metrics, new stats))
  init_stats:  its non-gradient state (dead-latent counters, BatchTopK's threshold), or {}
  export:      (params, stats) -> JumpReLU parameters {W_enc, b_enc, threshold, W_dec, b_dec}
               in normalised units, plus `k` for TopK, which no JumpReLU can express
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from jumprelu import losses
from jumprelu import sae as sae_lib
from jumprelu.kinds import gated, relu, topk

KINDS = ("jumprelu", "relu", "gated", "topk", "batchtopk")


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    model: sae_lib.SAEBase
    loss: Callable
    init_stats: Callable[[], dict]
    export: Callable[[dict, dict], dict]


def _jumprelu_export(params, stats):
    return {
        "W_enc": params["W_enc"],
        "b_enc": params["b_enc"],
        "threshold": sae_lib.threshold_of(params),
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }


def _relu_export(params, stats):  # ReLU = JumpReLU with θ = 0
    return _jumprelu_export(dict(params, threshold=jnp.zeros_like(params["b_enc"])), stats)


def _topk_export(params, stats, k):
    return dict(_relu_export(params, stats), k=k)


def _batchtopk_export(params, stats):
    theta = topk.global_threshold(stats) * jnp.ones_like(params["b_enc"])
    return _jumprelu_export(dict(params, threshold=theta), stats)


def from_config(sae_cfg, d_model: int) -> Kind:
    """The kind named by `sae.kind`, built from the `sae` config section."""
    common = dict(
        d_model=d_model,
        width=sae_cfg.width,
        pre_encoder_bias=sae_cfg.pre_encoder_bias,
        compute_dtype=jnp.dtype(sae_cfg.compute_dtype),
    )
    name = sae_cfg.kind
    if name == "jumprelu":
        model = sae_lib.from_config(sae_cfg, d_model)
        target = sae_cfg.get("target_l0")
        loss = losses.make_jumprelu_loss(
            target_l0=target,
            target_rate=sae_cfg.get("target_l0_rate", 0.01),
            target_gain=sae_cfg.get("target_l0_gain", 0.5),
        )
        if target is None:
            return Kind(name, model, loss, dict, _jumprelu_export)
        lam0 = sae_cfg.sparsity_coefficient
        return Kind(name, model, loss, lambda: losses.target_l0_stats(lam0), _jumprelu_export)
    if name == "relu":
        return Kind(name, relu.ReLUSAE(**common), relu.loss, dict, _relu_export)
    if name == "gated":
        return Kind(name, gated.GatedSAE(**common), gated.loss, dict, lambda p, s: gated.to_jumprelu(p))
    if name in ("topk", "batchtopk"):
        batch = name == "batchtopk"
        aux = topk.AuxKConfig(
            k_aux=sae_cfg.aux_k,
            coefficient=sae_cfg.aux_coefficient,
            dead_window=sae_cfg.dead_window_tokens,
            threshold_decay=sae_cfg.batchtopk_threshold_decay,
        )
        model = topk.TopKSAE(**common, k=sae_cfg.k, batch=batch)
        export = _batchtopk_export if batch else (lambda p, s: _topk_export(p, s, sae_cfg.k))
        return Kind(name, model, topk.make_loss(aux), lambda: topk.init_stats(sae_cfg.width, batch), export)
    raise ValueError(f"config field sae.kind must be one of {KINDS}, found {name!r}")

"""JumpReLU SAE (Rajamanoharan et al., 2024): the paper's kind and the default.

  z = (x - b_dec) W_enc + b_enc;  f = z · H(z - θ);  x̂ = f W_dec + b_dec
  L = mean_b( ‖x_b - x̂_b‖² ) + sparsity term          on the normalised scale x/C.
The paper's sparsity term is λ · mean_b Σ_i H(z_bi - θ_i) through `ops.jumprelu_l0`, which
trains θ only; there is no L1 term, no auxiliary loss and no resampling. That is the default;
every other recipe element is an option (see `jumprelu/core/sparsity.py`, `core/init.py`):
the sparsity loss (`step` | `quadratic` | `quadratic_rows` | `tanh`), a target L0 reached by a λ controller, a
frequency penalty, a pre-activation loss on dead latents, a bandwidth relative to the spread
of z, the straight-through terms passed to z too (`ste_pre_activations`), data-dependent init
of b_dec and θ, Matryoshka nested reconstructions, and a BatchTopK phase handing over to
per-latent θ (`batchtopk_fraction`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jumprelu.core import init as init_lib
from jumprelu.core import layout, losses, ops, sparse, sparsity
from jumprelu.core.batch_threshold import batchtopk_threshold
from jumprelu.core.kinds import Kind, KindSpec, common_module_args, jumprelu_arrays, register
from jumprelu.core.kinds.jumprelu_options import (
    THRESHOLD_PARAMS,
    Recipe,
    config_fields,
    init_stats,
    sparse_plan,
    validate,
)
from jumprelu.core.sae import SAEBase

_LOG_LAMBDA_MIN, _LOG_LAMBDA_MAX = math.log(1e-9), math.log(10.0)
_Z_SCALE_DECAY = 0.99  # moving average of the spread of z, for the relative bandwidth
_SINCE_FIRED_CAP = 2**30


class JumpReLUSAE(SAEBase):
    bandwidth: float = 0.001
    threshold_init: float = 0.001
    threshold_param: str = "log"  # "log": train log θ (paper); "raw": train θ directly
    ste_pre_activations: bool = False  # True: the θ straight-through terms train z too (Anthropic)

    def setup(self):
        super().setup()
        if self.threshold_param == "log":
            init = math.log(self.threshold_init)
            self.log_threshold = self.param("log_threshold", nn.initializers.constant(init), (self.width,))
        elif self.threshold_param == "raw":
            self.raw_threshold = self.param("threshold", nn.initializers.constant(self.threshold_init), (self.width,))
        else:
            raise ValueError(f"sae.threshold_param must be one of {THRESHOLD_PARAMS}, got {self.threshold_param!r}")

    def threshold(self) -> jax.Array:
        """θ: [width], float32 whatever the compute dtype."""
        if self.threshold_param == "log":
            return jnp.exp(self.log_threshold)
        return self.raw_threshold

    def encode(self, x: jax.Array) -> jax.Array:
        """f = JumpReLU_θ(z). x: [..., d_model] -> f: [..., width]."""
        return ops.jumprelu(self.pre_activations(x), self.threshold(), self.bandwidth)

    def __call__(self, x: jax.Array, bandwidth=None, batchtopk_k: int = 0, batchtopk_now=False) -> dict[str, jax.Array]:
        """What the loss needs. x: [B, d] -> z, f: [B, M]; l0: [B] (straight-through
        w.r.t. θ); fired_per_latent: [M] counts (metrics only); x_hat: [B, d].
        bandwidth: ε of this step when it is not the module's (relative bandwidth).
        batchtopk_k > 0 and batchtopk_now: the latents fire at this batch's BatchTopK threshold
        instead (the value with k·B entries of z above it, no gradient; returned as
        batchtopk_threshold) while θ trains in the shadow: l0 counts z > θ, and shadow_error
        [B] is ‖x - x̂_θ‖² of the SAE firing at θ, with a gradient for θ only."""
        z = self.pre_activations(x)
        theta = self.threshold()
        eps = self.bandwidth if bandwidth is None else bandwidth
        paper_op = ops.jumprelu_l0_ste_z if self.ste_pre_activations else ops.jumprelu_l0
        extra = {}
        if batchtopk_k:

            def phase():
                t = batchtopk_threshold(z, batchtopk_k)
                firing = jnp.broadcast_to(t, theta.shape)
                f = ops.jumprelu(z, firing, eps)
                f_theta, l0 = ops.jumprelu_l0(jax.lax.stop_gradient(z), theta, eps)
                frozen = jax.lax.stop_gradient((self.W_dec, self.b_dec))
                shadow_error = losses.squared_error(x, self.decode(f_theta, *frozen))
                return f, l0, firing, t, shadow_error

            def after():
                f, l0 = paper_op(z, theta, eps)
                return f, l0, theta, jnp.zeros((), jnp.float32), jnp.zeros(x.shape[:-1], jnp.float32)

            f, l0, firing, t, shadow_error = jax.lax.cond(batchtopk_now, phase, after)
            extra = {"batchtopk_threshold": t, "shadow_error": shadow_error}
        else:
            firing = theta
            f, l0 = paper_op(z, theta, eps)
        return {
            "z": z,
            "f": f,
            "l0": l0,
            "fired_per_latent": ops.fired_per_latent(z, firing),
            "x_hat": self.decode(f),
            **extra,
        }

    def sparse_outputs(self, x: jax.Array, capacity: int, bandwidth=None, z_variance: bool = False):
        """What the loss needs, from the sparse step (`core/sparse.py`): x_hat [B, d], l0 [B],
        counts and f_sum [M] (Σ_b H, Σ_b f, straight-through w.r.t. θ), fired_per_latent [M],
        overflow [] (1.0: this batch took the dense path), z_sum [M] (Σ_b z, differentiable) and,
        with z_variance, z_var [M] (variance of z over the batch, statistics only). No [B, M] array
        is returned."""
        eps = jnp.asarray(self.bandwidth if bandwidth is None else bandwidth, jnp.float32)
        bias = self.encoder_bias()
        theta = self.threshold()
        x_hat, l0, counts, f_sum, overflow = sparse.sparse_forward(
            x,
            self.W_enc,
            bias,
            theta,
            self.W_dec,
            self.b_dec,
            eps,
            sparse.Capacity.for_batch(capacity, x.shape[0], self.width),
            self.compute_dtype,
        )
        out = {
            "x_hat": x_hat,
            "l0": l0,
            "counts": counts,
            "f_sum": f_sum,
            "fired_per_latent": jax.lax.stop_gradient(counts),
            "overflow": overflow,
            "z_sum": jnp.sum(x, axis=0) @ self.W_enc + x.shape[0] * bias,
        }
        if z_variance:
            out["z_var"] = sparse.z_variance(x, self.W_enc)
        return out


def threshold_of(params: dict) -> jax.Array:
    """θ from a params dict of either parameterisation."""
    if "log_threshold" in params:
        return jnp.exp(params["log_threshold"])
    return params["threshold"]


def jumprelu_loss(model, params: dict, x: jax.Array, sparsity_coefficient) -> tuple[jax.Array, dict]:
    """The paper's loss (`make_loss()` without stats). x: [B, d_model] normalised. Returns (loss, metrics)."""
    loss, (metrics, _) = make_loss()(model, params, {}, x, sparsity_coefficient)
    return loss, metrics


def make_loss(target_l0: float | None = None, target_rate: float = 0.01, target_gain: float = 0.5, recipe=None):
    """The JumpReLU loss in the kinds' interface: (model, params, stats, x, λ) -> (loss, (metrics, stats)).

    With a target L0 T, λ is no longer a fixed (warmed-up) constant but the output of a
    proportional-integral controller on e = log(batch L0 / T): log λ = I + gain · clip(e, ±1),
    and after each step I += rate · e (dual ascent on the constraint E[L0] = T, with a
    proportional term that reacts at once when L0 crosses T, damping the overshoot an integral
    alone leaves while θ catches up). λ grows while too many latents fire and shrinks while too
    few do. With the step loss the loss stays the paper's squared error + λ·L0, so the gradients
    that reach θ have the size a fixed λ giving that L0 would produce, which Adam handles well.
    (A penalty on the L0 error itself gives θ gradients that shrink by orders of magnitude as
    L0 approaches T, and Adam's second-moment memory then freezes θ short of it.)
    """
    r = recipe or Recipe(target_l0=target_l0, target_rate=target_rate, target_gain=target_gain)
    if r.batchtopk_steps and r.sparse_capacity:
        return _phase_then_sparse(r)

    def loss(model, params, stats, x, sparsity_coefficient):
        eps = r.bandwidth * stats["z_scale"] if r.bandwidth_mode == "relative" else None
        sparse_step = r.sparse_capacity > 0
        if sparse_step:
            out = model.apply(
                {"params": params},
                x,
                r.sparse_capacity,
                bandwidth=eps,
                z_variance=r.bandwidth_mode == "relative",
                method=JumpReLUSAE.sparse_outputs,
            )
        elif r.batchtopk_steps:
            batchtopk_now = stats["steps_seen"] < r.batchtopk_steps
            k = max(1, round(r.target_l0))
            out = model.apply({"params": params}, x, bandwidth=eps, batchtopk_k=k, batchtopk_now=batchtopk_now)
        else:
            out = model.apply({"params": params}, x, bandwidth=eps)
        theta = threshold_of(params)
        batch_l0 = jax.lax.stop_gradient(jnp.mean(out["l0"]))
        new_stats, lam = {}, sparsity_coefficient
        if r.target_l0 is not None:  # this batch's L0 (no gradient through it) sets this step's λ
            error = jnp.log(jnp.maximum(batch_l0, 1e-3) / r.target_l0)
            lam = jnp.exp(stats["log_lambda"] + r.target_gain * jnp.clip(error, -1.0, 1.0))
            integral = jnp.clip(stats["log_lambda"] + r.target_rate * error, _LOG_LAMBDA_MIN, _LOG_LAMBDA_MAX)
            new_stats["log_lambda"] = jax.lax.stop_gradient(integral)
        if r.matryoshka_widths:  # the weighted mean over nested prefixes of their reconstruction errors
            x_hats = losses.nested_reconstructions(out["f"], params["W_dec"], params["b_dec"], r.matryoshka_widths)
            sq_err = sum(w * losses.squared_error(x, h) for w, h in zip(r.matryoshka_weights, x_hats, strict=True))
            metrics = losses.reconstruction_metrics(x, out["x_hat"], out["l0"], out["fired_per_latent"])
        else:
            sq_err, metrics = losses.reconstruction(x, out)
        norms = (
            jnp.linalg.norm(params["W_dec"], axis=-1) if r.sparsity_loss == "tanh" or r.pre_act_coefficient else None
        )
        if r.sparsity_loss == "step":  # summed per row with the error, exactly as the paper writes it
            sq_err, penalty = sq_err + lam * out["l0"], 0.0
        elif r.sparsity_loss == "quadratic":
            penalty = sparsity.quadratic_loss(out["l0"], lam, r.target_l0)
        elif r.sparsity_loss == "quadratic_rows":
            penalty = sparsity.quadratic_rows_loss(out["l0"], lam, r.target_l0)
        else:
            penalty = sparsity.tanh_loss(out["f"], norms, lam, r.tanh_scale)
        eps_now = r.bandwidth if eps is None else eps
        if r.frequency_penalty and sparse_step:
            rows = x.shape[0]
            freq = sparsity.frequency_penalty_of_counts(out["counts"], rows, r.frequency_penalty, r.frequency_limit)
            penalty, metrics = penalty + freq, dict(metrics, frequency_penalty=freq)
        elif r.frequency_penalty:
            freq = sparsity.frequency_penalty(out["z"], theta, eps_now, r.frequency_penalty, r.frequency_limit)
            if r.batchtopk_steps:
                # not in the phase: it would raise the shadow θ of latents still firing at t, and λ, cut
                # to make up for it, starts the hand-over too low (seed 1, target 100: L0 95 → 141)
                freq = jnp.where(batchtopk_now, 0.0, freq)
            penalty, metrics = penalty + freq, dict(metrics, frequency_penalty=freq)
        if r.pre_act_coefficient:
            since = stats["tokens_since_fired"]
            dead = since >= r.dead_window_tokens
            if sparse_step:
                sums = (out["z_sum"], out["f_sum"], out["counts"])
                pre = sparsity.pre_act_loss_of_sums(*sums, theta, dead, norms, x.shape[0], r.pre_act_coefficient)
            else:
                pre = sparsity.pre_act_loss(out["z"], theta, dead, norms, r.pre_act_coefficient)
            penalty, metrics = penalty + pre, dict(metrics, pre_act_loss=pre, dead_fraction=jnp.mean(dead))
            fired = out["fired_per_latent"] > 0
            new_stats["tokens_since_fired"] = jnp.where(fired, 0, jnp.minimum(since + x.shape[0], _SINCE_FIRED_CAP))
        if r.bandwidth_mode == "relative":
            if sparse_step:
                spread = jnp.median(jnp.sqrt(out["z_var"]))
            else:
                spread = jnp.median(jnp.std(jax.lax.stop_gradient(out["z"]), axis=0))
            new_stats["z_scale"] = _Z_SCALE_DECAY * stats["z_scale"] + (1 - _Z_SCALE_DECAY) * spread
            metrics = dict(metrics, bandwidth=eps)
        if r.batchtopk_steps:
            # Through the phase θ trains in the shadow of the BatchTopK forward: the reconstruction
            # error and L0 of the SAE firing at θ (λ from the controller on that L0), with a gradient
            # for θ only. At the hand-over θ, its Adam moments and λ are already those of a JumpReLU
            # SAE at the target L0, instead of jumping from the pull's scale to the step loss's.
            penalty = penalty + jnp.mean(out["shadow_error"])
            new_stats["steps_seen"] = stats["steps_seen"] + 1
            metrics = dict(metrics, batchtopk_phase=batchtopk_now.astype(jnp.float32))
        total = jnp.mean(sq_err) + penalty
        metrics = dict(metrics, loss=total)
        if r.target_l0 is not None:
            metrics["sparsity_coefficient_adaptive"] = lam
        # Recorded in every run: 1 when this batch took the sparse step, 0 when the plan is dense
        # (sparse_plan) or the batch overflowed the sparse step's capacity.
        metrics["sparse_step"] = 1.0 - out["overflow"] if sparse_step else jnp.zeros(())
        return total, (metrics, {**stats, **new_stats})

    return loss


def _phase_then_sparse(r: Recipe):
    """The BatchTopK phase on the dense path (it fires at the batch's threshold, so it needs z for
    every latent), then the sparse step from the hand-over on: one lax.cond on the step counter,
    whose branches give the same metrics and stats as the dense loss with the phase."""
    in_phase = make_loss(recipe=dataclasses.replace(r, sparse_capacity=0))
    after = make_loss(recipe=dataclasses.replace(r, batchtopk_steps=0))

    def loss(model, params, stats, x, sparsity_coefficient):
        def phase_branch(p):
            return in_phase(model, p, stats, x, sparsity_coefficient)

        def sparse_branch(p):
            total, (metrics, new) = after(model, p, stats, x, sparsity_coefficient)
            metrics = dict(metrics, batchtopk_phase=jnp.zeros((), jnp.float32))
            return total, (metrics, dict(new, steps_seen=stats["steps_seen"] + 1))

        return jax.lax.cond(stats["steps_seen"] < r.batchtopk_steps, phase_branch, sparse_branch, params)

    return loss


def export(params: dict, stats: dict) -> dict:
    return jumprelu_arrays(params, threshold_of(params))


def build(sae_cfg, d_model: int, train_steps: int = 0) -> Kind:
    model = JumpReLUSAE(
        **common_module_args(sae_cfg, d_model),
        bandwidth=sae_cfg.bandwidth,
        threshold_init=sae_cfg.threshold_init,
        threshold_param=sae_cfg.threshold_param,
        ste_pre_activations=sae_cfg.ste_pre_activations,
    )
    recipe = Recipe.from_config(sae_cfg, train_steps)
    lam0, width = sae_cfg.sparsity_coefficient, sae_cfg.width
    stats = lambda: init_stats(recipe, width, lam0)  # noqa: E731
    return Kind("jumprelu", model, make_loss(recipe=recipe), stats, export, step_path=sparse_plan(sae_cfg)[1])


SPEC = register(
    KindSpec(
        name="jumprelu",
        build=build,
        config_fields=config_fields,
        validate=validate,
        param_specs={
            "log_threshold": layout.THRESHOLD_SPEC,  # [M]
            "threshold": layout.THRESHOLD_SPEC,  # [M]
            "tokens_since_fired": layout.THRESHOLD_SPEC,  # [M] stats, with the pre-activation loss
        },
        stackable=True,
        needs_data=init_lib.needs_data,
        init_from_data=init_lib.start_from_data,
    )
)

"""The folded SAE: parameters in raw activation units, the form users load and files hold.

Training sees x/C. With row vectors, z = (x/C - b_dec) W_enc + b_enc; multiplying
through by C gives parameters that take raw x directly:
  W_enc' = W_enc,  b_enc' = C (b_enc - b_dec W_enc),  θ' = C θ,
  W_dec' = W_dec,  b_dec' = C b_dec,
so that f' = JumpReLU_θ'(x W_enc' + b_enc') = C f and x̂ = f' W_dec' + b_dec' = C x̂_norm.
This is the layout Gemma Scope releases (`params.npz`). Every kind exports to it (TopK with
its k), and the encode/decode math here is the one copy that loading, evaluation and the
spliced LM evaluation all use.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.core.kinds.jumprelu_loss import threshold_of

FOLDED_KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


def fold(params: dict, scale, pre_encoder_bias: bool = True) -> dict:
    """Training params (normalised units) -> folded params in raw activation units.

    `params` holds θ as `threshold` or `log_threshold` (a kind's `export` gives `threshold`);
    a TopK SAE's `k` passes through unchanged.
    """
    c = jnp.asarray(scale, jnp.float32)
    w_enc, b_enc, b_dec = params["W_enc"], params["b_enc"], params["b_dec"]
    if pre_encoder_bias:
        b_enc = b_enc - b_dec @ w_enc
    return {
        "W_enc": w_enc,
        "b_enc": c * b_enc,
        "threshold": c * threshold_of(params),
        "W_dec": params["W_dec"],
        "b_dec": c * b_dec,
        **({"k": params["k"]} if "k" in params else {}),
    }


def active_mask(z, threshold, k: int | None = None):
    """Which latents fire: z > θ, and for TopK SAEs only the k largest of each token."""
    mask = z > threshold
    if k is not None:
        kth = jax.lax.top_k(z, k)[0][..., -1:]
        mask &= z >= kth
    return mask


def encode(w_enc, b_enc, threshold, x, k: int | None = None):
    """f = (x W_enc + b_enc) where active, else 0. x: [..., d_model] (any float) -> [..., width] float32."""
    z = jnp.asarray(x).astype(jnp.float32) @ w_enc + b_enc
    # a NaN pre-activation stays NaN, as under jax.nn.relu: `NaN > θ` is False, so a row of NaN
    # input read as "nothing fires" (L0 0, x̂ = b_dec), hiding the bad row
    return jnp.where(active_mask(z, threshold, k), z, jnp.where(jnp.isnan(z), z, 0.0))


def decode(w_dec, b_dec, f):
    """x̂ = f W_dec + b_dec. f: [..., width] -> [..., d_model]."""
    return f @ w_dec + b_dec


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; identity keeps `jax.jit(sae)` hashable
class SAE:
    """A JumpReLU SAE in folded form: it takes raw activations x: [..., d_model].

    f = JumpReLU_θ(x W_enc + b_enc): [..., width], and x̂ = f W_dec + b_dec. This is
    the Gemma Scope `params.npz` convention; f is C times the training-time features.
    A pytree of its arrays (k, scale, step and config ride along as static data), so it can be
    an argument of a jitted or vmapped function: `jax.jit(lambda sae, x: sae(x))(sae, x)`. The
    mask is a hard step (the threshold gets no gradient); `jumprelu.jumprelu(sae.pre_activations(x),
    sae.threshold, eps)` is the straight-through op.
    """

    W_enc: jax.Array  # [d_model, width]
    b_enc: jax.Array  # [width]
    threshold: jax.Array  # [width]
    W_dec: jax.Array  # [width, d_model]
    b_dec: jax.Array  # [d_model]
    k: int | None = None  # TopK SAEs: keep the k largest pre-activations (threshold is then 0)
    # Gemma Scope 2 affine transcoders only: x̂ = f W_dec + b_dec + x affine_skip, [d_model, d_out].
    affine_skip: jax.Array | None = None
    scale: float = 1.0  # C used in training (already folded into the arrays above)
    step: int = 0
    config: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def d_model(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def width(self) -> int:
        return int(self.W_enc.shape[1])

    def pre_activations(self, x):
        _check_last(x, self.d_model, "pre_activations", "x", "d_model")
        return jnp.asarray(x, jnp.float32) @ self.W_enc + self.b_enc

    def encode(self, x):
        _check_last(x, self.d_model, "encode", "x", "d_model")
        return encode(self.W_enc, self.b_enc, self.threshold, x, self.k)

    def decode(self, f):
        _check_last(f, self.width, "decode", "f", "width")
        return decode(self.W_dec, self.b_dec, jnp.asarray(f))  # a list too, as encode takes

    def __call__(self, x):
        out = self.decode(self.encode(x))
        if self.affine_skip is not None:
            out = out + jnp.asarray(x, jnp.float32) @ self.affine_skip
        return out

    def params(self) -> dict[str, np.ndarray | int]:
        """The five arrays, and what else the computation needs where it is set (a TopK SAE's `k`, a
        transcoder's `affine_skip`): `SAE(**sae.params())` computes what `sae` does (without `k` a
        TopK SAE's copy kept every positive latent)."""
        out = {k: np.asarray(getattr(self, k)) for k in FOLDED_KEYS}
        if self.k is not None:
            out["k"] = int(self.k)
        if self.affine_skip is not None:
            out["affine_skip"] = np.asarray(self.affine_skip)
        return out


def _check_last(a, n: int, method: str, name: str, what: str) -> None:
    """A wrong last dimension named in the SAE's terms (it was dot_general's "contracting dimensions")."""
    shape = tuple(np.shape(a))  # static, under jit too (a tracer has .shape; a list is read as an array)
    if not shape or shape[-1] != n:
        raise ValueError(f"SAE.{method}: {name} has shape {list(shape)}; expected [..., {n}] (the SAE's {what})")


_ARRAYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec", "affine_skip")


class _Static:
    """A config dict as pytree static data (a dict is unhashable): compared and hashed by its
    canonical JSON, so two loads of one SAE at one step share a tree structure (tree_map over both);
    SAEs whose step or config differ (stacked members, two steps) do not, until given the same
    (README "Restoring a trained SAE")."""

    def __init__(self, value):
        self.value = value
        self._key = json.dumps(value, sort_keys=True, default=repr)

    def __eq__(self, other):
        return isinstance(other, _Static) and other._key == self._key

    def __hash__(self):
        return hash(self._key)


jax.tree_util.register_pytree_node(
    SAE,
    lambda sae: (
        tuple(getattr(sae, n) for n in _ARRAYS),
        (sae.k, sae.scale, sae.step, _Static(sae.config)),
    ),
    lambda aux, arrays: SAE(
        **dict(zip(_ARRAYS, arrays, strict=True)), k=aux[0], scale=aux[1], step=aux[2], config=aux[3].value
    ),
)

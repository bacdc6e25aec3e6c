"""Gemma 2 through the `gemma` package: the model, its params, and the paper's three sites.

Sites of layer L (the module structure of gemma's `Block`):
  resid  the block's output (the residual stream after layer L)
  mlp    the MLP output after the post-FFW norm, before it is added to the residual
  attn   the attention output before W_O: the per-head outputs concatenated, [num_heads·head_dim]
         (the input of `attn_vec_einsum`; 16 × 256 = 4,096 on 9B)

Harvesting runs a truncated forward (embedder and blocks 0..L only: later layers and the 256K
unembedding are never computed). Evaluation replaces the site's value in the full forward.
Both go through `nn.intercept_methods` on the model's own modules. gemma wraps
`Transformer.__call__` in `nn.jit`, whose trace cache ignores interceptors (a splice would be
silently dropped after the first call), so every forward here is our own method called with
`method=` on the unjitted modules, and the jit is ours.

Importing this module imports gemma (and through kauldron, tensorflow): only the harvest and
the LM evaluation do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from jumprelu.core import layout
from jumprelu.errors import DataError


def _import_gm():
    # gemma 3.3.0 subclasses kd.ckpts.AbstractPartialLoader, which kauldron 1.4 renamed.
    from kauldron import kd

    if not hasattr(kd.ckpts, "AbstractPartialLoader"):
        kd.ckpts.AbstractPartialLoader = kd.ckpts.InitTransform
    from gemma import gm

    return gm


gm = _import_gm()

SITES = ("resid", "mlp", "attn")
MODELS = {"gemma2_2b": gm.nn.Gemma2_2B, "gemma2_9b": gm.nn.Gemma2_9B, "gemma2_27b": gm.nn.Gemma2_27B}


def tiny_config(vocab_size: int, num_layers: int = 2, embed_dim: int = 64):
    """A Gemma 2-shaped config small enough for tests: alternating local/global attention, GQA,
    post-attention and post-FFW norms, logit soft-caps, as in 2B/9B/27B."""
    kinds = (gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL)
    return gm.nn.config.TransformerConfig(
        num_embed=vocab_size,
        embed_dim=embed_dim,
        hidden_dim=2 * embed_dim,
        num_heads=4,
        head_dim=16,
        num_kv_heads=2,
        final_logit_softcap=30.0,
        attention_types=tuple(kinds[i % 2] for i in range(num_layers)),
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        attn_logits_soft_cap=50.0,
        sliding_window_size=8,
    )


def _positions_and_mask(tokens, pad_id: int = 0):
    """gemma's defaults for text: positions count non-pad tokens; causal mask over non-pad keys."""
    valid = tokens != pad_id
    pos = jnp.cumsum(valid, -1)
    pos = pos - (pos >= 1)
    t = tokens.shape[-1]
    return pos, valid[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]


class Gemma2(gm.nn.Transformer):
    """gemma's Transformer with two methods of ours (the params tree is unchanged)."""

    def forward_to_layer(self, tokens, layer: int):
        """The residual stream after block `layer`, computing nothing later."""
        pos, mask = _positions_and_mask(tokens)
        x = self.embedder.encode(tokens)
        for block in self.blocks[: layer + 1]:
            _, x = block(x, pos, None, mask)
        return x

    def logits(self, tokens):
        """The full forward (same value as __call__'s logits), without gemma's nn.jit."""
        pos, mask = _positions_and_mask(tokens)
        x = self.embedder.encode(tokens)
        for block in self.blocks:
            _, x = block(x, pos, None, mask)
        out = self.embedder.decode(self.final_norm(x))
        cap = self.config.final_logit_softcap
        return jnp.tanh(out / cap) * cap if cap is not None else out


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    layer: int

    @property
    def module_path(self) -> tuple[str, ...]:
        block = f"layer_{self.layer}"
        return {"resid": (block,), "mlp": (block, "post_ffw_norm"), "attn": (block, "attn", "attn_vec_einsum")}[
            self.name
        ]


def site_width(config, site: str) -> int:
    return config.num_heads * config.head_dim if site == "attn" else config.embed_dim


def check_site(config, site: str, layer: int) -> Site:
    if site not in SITES:
        raise DataError(f"unknown site {site!r}: expected one of {SITES}")
    if not (isinstance(layer, int) and 0 <= layer < config.num_layers):
        raise DataError(f"layer {layer} is out of range: this model has layers 0..{config.num_layers - 1}")
    return Site(site, layer)


def _interceptor(site: Site, replace=None, captured: dict | None = None):
    """Captures (and with `replace`, substitutes) the site's value as the model computes it."""

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or context.module.path != site.module_path:
            return next_fun(*args, **kwargs)
        if site.name == "attn":  # the site is the input of W_O: [B, T, N, H] -> [B, T, N·H]
            eqn, enc = args
            b, t, n, h = enc.shape
            flat = enc.reshape(b, t, n * h)
            if captured is not None:
                captured["x"] = flat
            if replace is not None:
                enc = replace(flat).astype(enc.dtype).reshape(b, t, n, h)
            return next_fun(eqn, enc, **kwargs)
        out = next_fun(*args, **kwargs)
        value = out[1] if site.name == "resid" else out  # a Block returns (cache, x)
        if captured is not None:
            captured["x"] = value
        if replace is not None:
            new = replace(value).astype(value.dtype)
            out = (out[0], new) if site.name == "resid" else new
        return out

    return intercept


def make_model(name: str, config=None, dtype=jnp.bfloat16) -> Gemma2:
    if name == "tiny":
        if config is None:
            raise DataError("model 'tiny' needs a config (gemma_model.tiny_config)")
        return Gemma2(config=config, dtype=dtype)
    if name not in MODELS:
        raise DataError(f"unknown model {name!r}: expected one of {sorted(MODELS)} or 'tiny'")
    return Gemma2(config=MODELS[name].config, dtype=dtype)


def device_mesh():
    """The SAE's ('data', 'model') mesh with every device on 'model': the LM's params are split
    over it (see abstract_params), and so is a spliced SAE (`jumprelu.core.layout`)."""
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((1, jax.device_count()), layout.AXES, axis_types=(auto, auto))


def abstract_params(model: Gemma2, mesh):
    """The params' shapes with shardings: each parameter split along its largest axis that the
    device count divides, else replicated.

    With params sharded this way the model needs 1/n of its weights per device (9B in bf16:
    18.5 GB, 2.3 GB per chip of a v5e-8); XLA gathers each layer's weights as it uses them.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.shape[layout.MODEL]
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"])

    def spec(leaf):
        axes = sorted(range(leaf.ndim), key=lambda a: -leaf.shape[a])
        for a in axes:
            if leaf.shape[a] % n == 0 and leaf.shape[a] >= n:
                return NamedSharding(mesh, P(*[layout.MODEL if i == a else None for i in range(leaf.ndim)]))
        return NamedSharding(mesh, P())

    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=spec(leaf)), abstract)


def load_params(path: str, target):
    """Params from a gemma checkpoint directory (official flat layout or nested), local or gs://,
    restored straight into `target` (abstract_params: shapes, dtypes, shardings)."""
    if "://" not in path and not os.path.isdir(path):
        raise DataError(f"checkpoint {path}: no such directory (expected a Gemma 2 orbax checkpoint)")
    path = os.path.abspath(path) if "://" not in path else path
    return gm.ckpts.load_params(path, params=target, donate=False)


def sites_fn(model: Gemma2, sites):
    """jit(params, tokens [B, T]) -> one [B, T, d] float32 array per site, from one truncated
    forward up to the deepest site's layer (so the three sites of a layer, or sites of several
    layers, cost one pass)."""

    @jax.jit
    def run(params, tokens):
        captured = [{} for _ in sites]
        with contextlib.ExitStack() as stack:
            for site, into in zip(sites, captured, strict=True):
                stack.enter_context(nn.intercept_methods(_interceptor(site, captured=into)))
            model.apply({"params": params}, tokens, max(s.layer for s in sites), method=Gemma2.forward_to_layer)
        return tuple(c["x"].astype(jnp.float32) for c in captured)

    return run


def site_fn(model: Gemma2, site: Site):
    """jit(params, tokens [B, T]) -> the site's activations [B, T, d] float32, via a truncated forward."""
    run = sites_fn(model, (site,))
    return jax.jit(lambda params, tokens: run(params, tokens)[0])


def token_losses(model: Gemma2, site: Site | None = None, replace=None):
    """jit(params, tokens, *replace_args) -> next-token cross-entropy [B, T-1] (float32).

    With `site` and `replace(x, *replace_args)`, the site's value is replaced in the forward;
    replace_args (e.g. SAE parameters) are traced, so one compile serves every SAE of a shape.
    """

    @jax.jit
    def run(params, tokens, *replace_args):
        if site is None:
            logits = model.apply({"params": params}, tokens, method=Gemma2.logits)
        else:

            def sub(x):
                return replace(*replace_args, x)

            with nn.intercept_methods(_interceptor(site, replace=sub)):
                logits = model.apply({"params": params}, tokens, method=Gemma2.logits)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    return run

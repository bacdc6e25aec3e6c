"""Gemma 2 and Gemma 3 through the `gemma` package: the model, its params, and the three sites.

Both families are gemma's one `Transformer` with one `Block`; Gemma 3 differs only inside it
(`use_qk_norm`: RMSNorms on queries and keys before RoPE; no attention or final logit
soft-caps; 5 sliding-window layers per global one, with separate RoPE bases) and in its 262K
vocabulary. Sites of layer L, the same module paths in both (gemma's `Block`):
  resid  the block's output (the residual stream after layer L)
  mlp    the MLP output after the post-FFW norm, before it is added to the residual
  attn   the attention output before W_O: the per-head outputs concatenated, [num_heads·head_dim]
         (the input of `attn_vec_einsum`; 16 × 256 = 4,096 on Gemma 2 9B). Gemma 3's QK norms
         act on queries and keys, upstream of this, and its post-attention norm downstream of
         W_O, so the site is still exactly the input of o_proj (Gemma Scope 2's attn site).
Gemma 3 4B/12B/27B are multimodal; here they are text only: the config drops the vision
encoder (gemma's `text_only`), and `load_params` restores only the text weights.

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
FAMILIES = ("gemma2", "gemma3")
_GEMMA3 = {
    "270m": gm.nn.Gemma3_270M,
    "1b": gm.nn.Gemma3_1B,
    "4b": gm.nn.Gemma3_4B,
    "12b": gm.nn.Gemma3_12B,
    "27b": gm.nn.Gemma3_27B,
}
# Our model names -> gemma's class. Gemma 3's pt and it checkpoints share an architecture; the
# name says which one a store was harvested from (it is recorded in the store's metadata).
MODELS = {
    "gemma2_2b": gm.nn.Gemma2_2B,
    "gemma2_9b": gm.nn.Gemma2_9B,
    "gemma2_27b": gm.nn.Gemma2_27B,
    **{f"gemma3_{size}_{kind}": cls for size, cls in _GEMMA3.items() for kind in ("pt", "it")},
}
# The tiny test models: random weights, vocabulary from the tiny world's tokenizer.
TINY = {"tiny": "gemma2", "tiny_gemma3": "gemma3"}


def family(name: str) -> str:
    """gemma2 or gemma3, from a model name of MODELS or TINY."""
    if name in TINY:
        return TINY[name]
    if name in MODELS:
        return name.split("_")[0]
    raise DataError(f"unknown model {name!r}: expected one of {sorted(MODELS)} or {sorted(TINY)}")


def _positions_and_mask(tokens, pad_id: int = 0):
    """gemma's defaults for text: positions count non-pad tokens; causal mask over non-pad keys."""
    valid = tokens != pad_id
    pos = jnp.cumsum(valid, -1)
    pos = pos - (pos >= 1)
    t = tokens.shape[-1]
    return pos, valid[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]


class Gemma(gm.nn.Transformer):
    """gemma's Transformer with two methods of ours (the params tree is unchanged); Gemma 2 or 3
    by its config."""

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


Gemma2 = Gemma  # the name before Gemma 3 (tests and callers use Gemma2.logits etc.)


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


def make_model(name: str, config=None, dtype=jnp.bfloat16) -> Gemma:
    if name in TINY:
        if config is None:
            raise DataError(f"model {name!r} needs a config (harvest.tiny.tiny_config)")
        return Gemma(config=config, dtype=dtype)
    family(name)  # the one-line error for an unknown name
    config = MODELS[name].config
    if config.vision_encoder is not None:  # Gemma 3 4B/12B/27B: text only (gemma's text_only)
        config = dataclasses.replace(config, vision_encoder=None)
    return Gemma(config=config, dtype=dtype)


def device_mesh():
    """The SAE's ('data', 'model') mesh with every device on 'model': the LM's params are split
    over it (see abstract_params), and so is a spliced SAE (`jumprelu.core.layout`)."""
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((1, jax.device_count()), layout.AXES, axis_types=(auto, auto))


def abstract_params(model: Gemma, mesh):
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
    restored straight into `target` (abstract_params: shapes, dtypes, shardings). A multimodal
    Gemma 3 checkpoint's vision weights are skipped: gemma restores what `target` has."""
    if "://" not in path and not os.path.isdir(path):
        raise DataError(f"checkpoint {path}: no such directory (expected a Gemma orbax checkpoint)")
    path = os.path.abspath(path) if "://" not in path else path
    try:
        return gm.ckpts.load_params(path, params=target, donate=False)
    except (ValueError, KeyError, FileNotFoundError) as e:  # another model's tree, or not a checkpoint
        from jumprelu.train.failures import reason  # orbax's error as one line

        raise DataError(
            f"checkpoint {path}: does not hold this model's parameters (another size or family, or not a "
            f"Gemma checkpoint): {reason(e)}"
        ) from None


def sites_fn(model: Gemma, sites):
    """jit(params, tokens [B, T]) -> one [B, T, d] float32 array per site, from one truncated
    forward up to the deepest site's layer (so the three sites of a layer, or sites of several
    layers, cost one pass)."""

    @jax.jit
    def run(params, tokens):
        captured = [{} for _ in sites]
        with contextlib.ExitStack() as stack:
            for site, into in zip(sites, captured, strict=True):
                stack.enter_context(nn.intercept_methods(_interceptor(site, captured=into)))
            model.apply({"params": params}, tokens, max(s.layer for s in sites), method=Gemma.forward_to_layer)
        return tuple(c["x"].astype(jnp.float32) for c in captured)

    return run


def site_fn(model: Gemma, site: Site):
    """jit(params, tokens [B, T]) -> the site's activations [B, T, d] float32, via a truncated forward."""
    run = sites_fn(model, (site,))
    return jax.jit(lambda params, tokens: run(params, tokens)[0])


def token_losses(model: Gemma, site: Site | None = None, replace=None):
    """jit(params, tokens, *replace_args) -> next-token cross-entropy [B, T-1] (float32).

    With `site` and `replace(x, *replace_args)`, the site's value is replaced in the forward;
    replace_args (e.g. SAE parameters) are traced, so one compile serves every SAE of a shape.
    """

    @jax.jit
    def run(params, tokens, *replace_args):
        if site is None:
            logits = model.apply({"params": params}, tokens, method=Gemma.logits)
        else:

            def sub(x):
                return replace(*replace_args, x)

            with nn.intercept_methods(_interceptor(site, replace=sub)):
                logits = model.apply({"params": params}, tokens, method=Gemma.logits)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    return run

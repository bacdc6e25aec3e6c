"""Where an SAE reads its input, in the names other tools use, and where it came from.

Our Gemma 2 sites (jumprelu.harvest.gemma_model) map to the hook names the released SAEs use:

  site   SAELens / TransformerLens             Hugging Face (Gemma Scope 2)
  resid  blocks.{L}.hook_resid_post            model.layers.{L}.output
  mlp    blocks.{L}.hook_mlp_out               model.layers.{L}.post_feedforward_layernorm.output
  attn   blocks.{L}.attn.hook_z (reshape       model.layers.{L}.self_attn.o_proj.input
         "hook_z": heads concatenated, as ours)

Stores made with `jumprelu store convert` may name a site freely: `resid_post`, `mlp_out` and
`attn_out` (Gemma Scope's folder names) are understood too; anything else has no hook name.
"""

from __future__ import annotations

import os

# Our harvest's model names -> (TransformerLens name, Hugging Face id).
MODELS = {
    "gemma2_2b": ("gemma-2-2b", "google/gemma-2-2b"),
    "gemma2_9b": ("gemma-2-9b", "google/gemma-2-9b"),
    "gemma2_27b": ("gemma-2-27b", "google/gemma-2-27b"),
    # Gemma 3 (Gemma Scope 2's models): the Hugging Face ids; the 270M base model has no -pt suffix there.
    **{
        f"gemma3_{size}_{kind}": (hf.removeprefix("google/"), hf)
        for size in ("270m", "1b", "4b", "12b", "27b")
        for kind in ("pt", "it")
        for hf in [f"google/gemma-3-{size}" + ("" if (size, kind) == ("270m", "pt") else f"-{kind}")]
    },
}
_SITE_ALIASES = {
    "resid": "resid",
    "resid_post": "resid",
    "mlp": "mlp",
    "mlp_out": "mlp",
    "attn": "attn",
    "attn_out": "attn",
}
_SAELENS = {"resid": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out", "attn": "blocks.{L}.attn.hook_z"}
_HF = {
    "resid": "model.layers.{L}.output",
    "mlp": "model.layers.{L}.post_feedforward_layernorm.output",
    "attn": "model.layers.{L}.self_attn.o_proj.input",
}


def model_family(name: str | None) -> str | None:
    """The model a name means, whichever naming it uses (ours, TransformerLens's, Hugging Face's),
    without a Gemma 3 -pt/-it suffix; None for a name not in MODELS (a converted store's own)."""
    for ours, names in MODELS.items():
        if name == ours or name in names:
            return ours.removesuffix("_pt").removesuffix("_it")
    return None


def canonical_site(site: str | None) -> str | None:
    """resid / mlp / attn, or None for a site with no known hook."""
    return _SITE_ALIASES.get(str(site or "").lower())


def saelens_hook(site: str | None, layer: int | None) -> str | None:
    """The TransformerLens hook name of our site (e.g. resid, 12 -> blocks.12.hook_resid_post)."""
    s = canonical_site(site)
    return None if s is None or layer is None else _SAELENS[s].format(L=int(layer))


def hf_hook_point(site: str | None, layer: int | None) -> str | None:
    """The Hugging Face module path Gemma Scope 2 names (e.g. resid, 12 -> model.layers.12.output)."""
    s = canonical_site(site)
    return None if s is None or layer is None else _HF[s].format(L=int(layer))


def site_of_hook(hook: str | None) -> tuple[str, int] | None:
    """(site, layer) of a SAELens or Hugging Face hook name, the inverse of the two above."""
    for table in (_SAELENS, _HF):
        for site, pattern in table.items():
            head, tail = pattern.split("{L}")
            if hook and hook.startswith(head) and hook.endswith(tail) and hook[len(head) : -len(tail)].isdigit():
                return site, int(hook[len(head) : -len(tail)])
    return None


def model_names(model: str | None) -> tuple[str | None, str | None]:
    """(TransformerLens name, Hugging Face id) of a model named in any of the three namings."""
    for ours, names in MODELS.items():
        if model == ours or model in names:
            return names
    return model, model


def transcoder_reason(sae) -> str | None:
    """Why `sae` is a transcoder (it reads one site and writes another), or None for an SAE: an
    affine skip, another output width, or its Gemma Scope 2 release saying so (type "transcoder",
    or an output hook other than its input's) even when the arrays look like an SAE's."""
    d_in, d_out = sae.W_enc.shape[-2], sae.W_dec.shape[-1]
    if sae.affine_skip is not None:
        return "an affine skip connection"
    if d_out != d_in:
        return f"output width {d_out} against input {d_in}"
    released = (sae.config or {}).get("gemma_scope_2")
    if isinstance(released, dict):
        if released.get("type") == "transcoder":
            return "its release's type is 'transcoder'"
        hook_in, hook_out = released.get("hf_hook_point_in"), released.get("hf_hook_point_out")
        if hook_in and hook_out and hook_out != hook_in:
            return f"it writes {hook_out}, not its input {hook_in}"
    return None


def released_provenance(config: dict) -> dict | None:
    """The provenance a released SAE's own config records (a SAELens cfg.json or a Gemma Scope 2
    config.json loaded by `jumprelu.load`), so converting it between formats keeps it; None otherwise."""
    if isinstance(config.get("saelens"), dict):
        cfg = config["saelens"]
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        model = meta.get("model_name") or cfg.get("model_name")
        context, dataset = meta.get("context_size") or cfg.get("context_size"), meta.get("dataset_path")
    elif isinstance(config.get("gemma_scope_2"), dict):
        cfg = config["gemma_scope_2"]
        hook, model, context, dataset = cfg.get("hf_hook_point_in"), cfg.get("model_name"), None, None
        hook_out = cfg.get("hf_hook_point_out")
    else:
        return None
    site, layer = site_of_hook(hook) or (None, None)
    family = model_family(model)
    if "gemma_scope_2" not in config:
        hook_out = None
    tl_name, hf_name = model_names(model)
    return {
        "model": family or model,
        "model_name": tl_name,
        "hf_model": hf_name,
        "site": site,
        "layer": layer,
        "context_size": context,
        "dataset": dataset,
        # a hook we have no site for is kept as it was written
        "hook_name": saelens_hook(site, layer) or (hook if "saelens" in config else None),
        "hf_hook_point": hf_hook_point(site, layer) or (hook if "gemma_scope_2" in config else None),
        "hf_hook_point_out": hook_out,  # a transcoder's output site, as its release records it
    }


def provenance(config: dict) -> dict:
    """What the SAE was trained on, from its training config and its store's metadata.json
    (or, for a released SAE loaded from its own format, what its config records).

    Returns model (our name), model_name (TransformerLens), hf_model (Hugging Face id), site,
    layer, context_size (the harvest's seq_len), dataset (the texts), hook_name, hf_hook_point;
    None where unknown (synthetic data, a converted .npy with no model).
    """
    from jumprelu.data import recorded_source
    from jumprelu.errors import UserError
    from jumprelu.store.reader import read_metadata

    released = released_provenance(config)
    if released is not None:
        return released
    source = recorded_source(config) if (config.get("data") or {}).get("source") else ""
    recorded = config.get("trained_on") or {}  # saved in training since 2026-12-01
    if not recorded and source == "lm":  # an on-the-fly run from before: its harvest config says
        lm = (config.get("data") or {}).get("lm") or {}
        recorded = {k: lm.get(k) for k in ("model", "site", "layer", "seq_len")}
    meta: dict = {"model": "synthetic", "site": None, "layer": None} if source == "synthetic" else {}
    if source and source != "synthetic" and os.path.isdir(source):
        try:
            meta = read_metadata(source)
        except UserError:
            meta = {}
    if not meta.get("model") and recorded:  # run from another directory, or the store moved or is remote
        meta = dict(recorded, extra={"seq_len": recorded.get("seq_len")})
    model, site, layer = meta.get("model") or None, meta.get("site") or None, meta.get("layer")
    tl_name, hf_name = model_names(model)
    extra = meta.get("extra") or {}
    return {
        "model": model,
        "model_name": tl_name,
        "hf_model": hf_name,
        "site": site,
        "layer": layer,
        "context_size": extra.get("seq_len"),
        "dataset": meta.get("text_source") or None,
        "hook_name": saelens_hook(site, layer),
        "hf_hook_point": hf_hook_point(site, layer),
    }

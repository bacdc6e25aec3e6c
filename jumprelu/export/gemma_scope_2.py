"""Gemma Scope 2 folders, both ways: the layout Gemma Scope 2 released its SAEs and transcoders in.

A folder (e.g. resid_post/layer_12_width_16k_l0_medium/) holds
  params.safetensors   float32, exactly: w_enc [d_in, W], w_dec [W, d_out], b_enc [W], b_dec [d_out],
                       threshold [W], and affine_skip_connection [d_in, d_out] for affine transcoders
  config.json          hf_hook_point_in, hf_hook_point_out, width, model_name,
                       architecture "jump_relu", l0 (int), affine_connection (bool), type "sae"|"transcoder"
It encodes with no b_dec subtraction, f = ReLU(x w_enc + b_enc)·[· > θ], and decodes
x̂ = f w_dec + b_dec (+ x affine_skip_connection): our folded form, so loading and exporting
only rename arrays. An SAE has d_out = d_in.

  jumprelu export WORKDIR OUT_DIR --format gemma-scope-2 [--member i] [--step N]
"""

from __future__ import annotations

import json
import os

import numpy as np

from jumprelu import fs
from jumprelu.export import hooks, tensors
from jumprelu.export.tensors import FormatError

PARAMS, CONFIG = "params.safetensors", "config.json"
# Gemma Scope 2's lowercase keys -> jumprelu.SAE fields.
KEYS = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
SKIP = "affine_skip_connection"


def is_gemma_scope_2_dir(path: str) -> bool:
    return fs.exists(fs.join(path, PARAMS))


def _files(path: str) -> tuple[str, str]:
    """(the params file, its config.json) for a folder or a named .safetensors file in one."""
    if path.endswith(".safetensors"):
        return path, fs.join(os.path.dirname(path) or ".", CONFIG)
    return fs.join(path, PARAMS), fs.join(path, CONFIG)


def read_params(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json or {} when absent, the checked arrays under their Gemma Scope 2 names).

    path: a Gemma Scope 2 folder, or a .safetensors file in one (read as named, whatever its name).
    """
    file, cfg_file = _files(path)
    found = tensors.read(file)
    missing = [k for k in KEYS if k not in found]
    if missing:
        raise FormatError(f"{file}: missing keys {missing}; expected {list(KEYS)} (and optionally {SKIP})")
    w_enc, w_dec = found["w_enc"], found["w_dec"]
    if w_enc.ndim != 2 or w_dec.ndim != 2:
        raise FormatError(f"{file}: w_enc and w_dec must be 2-D, found {list(w_enc.shape)} and {list(w_dec.shape)}")
    (d_in, width), d_out = w_enc.shape, w_dec.shape[1]
    expected = {"w_enc": (d_in, width), "w_dec": (width, d_out), "b_enc": (width,), "b_dec": (d_out,)}
    expected["threshold"] = (width,)
    if SKIP in found:
        expected[SKIP] = (d_in, d_out)
    tensors.check_exact(file, found, expected)
    cfg = {}
    if fs.exists(cfg_file):
        try:
            cfg = json.loads(fs.read_text(cfg_file))
        except ValueError as e:
            raise FormatError(f"{cfg_file}: not readable JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{cfg_file}: expected a JSON object of the release's keys, found {type(cfg).__name__}")
        if cfg.get("architecture", "jump_relu") != "jump_relu":
            raise FormatError(f"{cfg_file}: architecture {cfg['architecture']!r}, expected 'jump_relu'")
        for key in ("hf_hook_point_in", "hf_hook_point_out", "model_name", "type"):  # names: strings or null
            if cfg.get(key) is not None and not isinstance(cfg[key], str):
                raise FormatError(f"{cfg_file}: {key} must be a string, found {cfg[key]!r}")
        found_width = cfg.get("width", width)
        if isinstance(found_width, bool) or not isinstance(found_width, int):
            raise FormatError(f"{cfg_file}: width must be an integer, found {found_width!r}")
        if found_width != width:
            raise FormatError(f"{cfg_file}: width {found_width} but {os.path.basename(file)} holds {width} latents")
    return cfg, {k: np.asarray(v, np.float32) for k, v in found.items()}


def load(path: str):
    """A Gemma Scope 2 folder (or a .safetensors file in one, read as named) as a `jumprelu.SAE`."""
    import jax.numpy as jnp

    from jumprelu.core.folded import SAE

    cfg, p = read_params(path)
    skip = p.pop(SKIP, None)
    p["threshold"] = np.maximum(p["threshold"], np.float32(0))  # ReLU(h)·[h > θ] = h·[h > max(θ, 0)]
    return SAE(
        **{KEYS[k]: jnp.asarray(v) for k, v in p.items()},
        affine_skip=None if skip is None else jnp.asarray(skip),
        config={"source": path if fs.is_remote(path) else os.path.abspath(path), "gemma_scope_2": cfg},
    )


def config(sae, provenance: dict | None = None, l0: float | None = None) -> dict:
    """config.json for `sae`: the 8 keys of the release."""
    p = provenance or hooks.provenance(sae.config)
    hook = p.get("hf_hook_point")
    return {
        "hf_hook_point_in": hook,
        "hf_hook_point_out": p.get("hf_hook_point_out") or hook,
        "width": sae.width,
        "model_name": p.get("hf_model"),
        "architecture": "jump_relu",
        "l0": int(round(l0)) if l0 is not None else _recorded_l0(sae),
        "affine_connection": sae.affine_skip is not None,
        "type": "sae" if hooks.transcoder_reason(sae) is None else "transcoder",
    }


def _recorded_l0(sae):
    """A re-exported release's own l0; else unknown (null), not a wrong 0."""
    for key in ("gemma_scope_2", "saelens"):
        cfg = sae.config.get(key)
        if isinstance(cfg, dict) and isinstance(cfg.get("l0"), int | float) and not isinstance(cfg.get("l0"), bool):
            return int(round(cfg["l0"]))
    return None


def export(sae, path: str, provenance: dict | None = None, l0: float | None = None) -> dict:
    """Writes `sae` as a Gemma Scope 2 folder at `path`; returns its config.json.

    `l0` is the held-out mean L0 (the report's); the release records it rounded.
    """
    if sae.k is not None:
        raise FormatError(f"{path}: a TopK SAE (k={sae.k}) has no exact JumpReLU form; BatchTopK, ReLU and Gated do")
    arrays = {lower: np.asarray(getattr(sae, upper), np.float32) for lower, upper in KEYS.items()}
    if arrays["threshold"].size and arrays["threshold"].min() < 0:
        raise FormatError(f"{path}: a negative threshold ({arrays['threshold'].min():g}) has no Gemma Scope 2 form")
    if sae.affine_skip is not None:
        arrays[SKIP] = np.asarray(sae.affine_skip, np.float32)
    cfg = config(sae, provenance, l0)
    fs.makedirs(path)
    fs.remove(fs.join(path, CONFIG))  # as saelens.export: never this SAE's params beside another's config.json
    tensors.write(fs.join(path, PARAMS), arrays)
    fs.write_text_atomically(fs.join(path, CONFIG), json.dumps(cfg, indent=2))
    return cfg

"""SAELens directories, both ways: what `sae_lens.SAE.load_from_disk(DIR)` (SAELens 6.x) reads.

A directory holds
  cfg.json                  architecture ("jumprelu", or "topk" with k), d_in, d_sae, dtype,
                            apply_b_dec_to_input, normalize_activations "none", metadata {...}
  sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
                            threshold [d_sae] (jumprelu only); exactly these keys
SAELens encodes h = (x - b_dec·apply_b_dec_to_input) W_enc + b_enc, then f = ReLU(h)·[h > θ]
(jumprelu) or ReLU(TopK(h, k)) (topk), and decodes x̂ = f W_dec + b_dec. Our parameters are
folded (jumprelu.core.folded), so we write apply_b_dec_to_input = false and the arrays as they
are: SAELens then computes exactly what `jumprelu.SAE` does. BatchTopK, ReLU and Gated SAEs are
written as "jumprelu" (SAELens saves its own BatchTopK that way too), with
metadata.training_architecture naming what was trained.

  jumprelu export WORKDIR OUT_DIR --format saelens [--member i] [--step N]
"""

from __future__ import annotations

import json
import os

import numpy as np

from jumprelu import fs
from jumprelu.export import hooks, tensors
from jumprelu.export.tensors import FormatError

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# The SAELens release the layout was checked against (load_from_disk runs a legacy conversion on
# a metadata.sae_lens_version below 6.0.0).
SAELENS_VERSION = "6.54.12"
ARCHITECTURES = ("jumprelu", "topk", "standard")


def is_saelens_dir(path: str) -> bool:
    """Either SAELens file: both, or one without the other (a killed export), which `read_params` names."""
    return fs.exists(fs.join(path, CFG)) or fs.exists(fs.join(path, WEIGHTS))


def config(sae, provenance: dict | None = None) -> dict:
    """The cfg.json SAELens reads for `sae` (a `jumprelu.SAE`)."""
    p = provenance or hooks.provenance(sae.config)
    kind = (sae.config.get("sae") or {}).get("kind")
    architecture = "topk" if sae.k is not None else "jumprelu"
    hook = p.get("hook_name")
    cfg = {
        "architecture": architecture,
        "d_in": sae.d_model,
        "d_sae": sae.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # folded parameters take raw x
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook and hook.endswith("hook_z") else "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": p.get("model_name"),
            "hook_name": hook,
            "hook_head_index": None,
            "context_size": p.get("context_size"),
            "prepend_bos": True,  # the harvest starts every sequence with BOS (and stores no BOS row)
            "dataset_path": p.get("dataset"),
            "training_architecture": kind or architecture,
            "trained_with": "jumprelu",
            "training_steps": int(sae.step),
            "input_scale": float(sae.scale),
        },
    }
    if architecture == "topk":
        cfg.update(k=int(sae.k), rescale_acts_by_decoder_norm=False)
    return cfg


def export(sae, path: str, provenance: dict | None = None) -> dict:
    """Writes `sae` as a SAELens directory at `path`; returns its cfg.json."""
    threshold = np.asarray(sae.threshold, np.float32)
    if sae.k is None and threshold.size and threshold.min() < 0:
        raise FormatError(f"{path}: a negative threshold ({threshold.min():g}) has no SAELens JumpReLU form")
    transcoder = hooks.transcoder_reason(sae)
    if transcoder:
        raise FormatError(f"{path}: a transcoder ({transcoder}) has no SAELens SAE form; export it as gemma-scope-2")
    cfg = config(sae, provenance)
    arrays = {
        "W_enc": np.asarray(sae.W_enc, np.float32),
        "W_dec": np.asarray(sae.W_dec, np.float32),
        "b_enc": np.asarray(sae.b_enc, np.float32),
        "b_dec": np.asarray(sae.b_dec, np.float32),
    }
    if cfg["architecture"] == "jumprelu":
        arrays["threshold"] = threshold
    fs.makedirs(path)
    # each file is atomic, the pair is not: an earlier export's cfg.json goes first, so a kill between
    # the two writes leaves weights without metadata (refused by name), never beside another SAE's
    fs.remove(fs.join(path, CFG))
    tensors.write(fs.join(path, WEIGHTS), arrays)
    fs.write_text_atomically(fs.join(path, CFG), json.dumps(cfg, indent=2))
    return cfg


def read_config(path: str) -> dict:
    file = fs.join(path, CFG)
    try:
        cfg = json.loads(fs.read_text(file))
    except FileNotFoundError:
        raise FormatError(f"{file}: no such file") from None
    except ValueError as e:
        raise FormatError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{file}: expected a JSON object")
    cfg = _before_6_0(file, cfg)
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise FormatError(f"{file}: lacks the field {key!r}")
    if cfg["architecture"] not in ARCHITECTURES:
        raise FormatError(f"{file}: architecture {cfg['architecture']!r} is not one of {list(ARCHITECTURES)}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise FormatError(
            f"{file}: normalize_activations is {norm!r}; only 'none' loads (fold the scaling into the weights)"
        )
    for key in ("d_in", "d_sae") + (("k",) if "k" in cfg else ()):
        _require(file, key, cfg[key], int, positive=True)
    meta = cfg.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise FormatError(f"{file}: metadata must be a JSON object, found {type(meta).__name__}")
    meta = meta or {}
    for where, fields in (("", cfg), ("metadata.", meta)):  # names: strings or null
        for key in ("hook_name", "model_name", "dataset_path"):
            if fields.get(key) is not None and not isinstance(fields[key], str):
                raise FormatError(f"{file}: {where}{key} must be a string, found {fields[key]!r}")
    if meta.get("input_scale") is not None:
        _require(file, "metadata.input_scale", meta["input_scale"], (int, float), positive=True)
    if meta.get("training_steps") is not None:
        _require(file, "metadata.training_steps", meta["training_steps"], int)
    return cfg


def _before_6_0(file: str, cfg: dict) -> dict:
    """A cfg.json as SAELens 6 reads one of its older releases (its `handle_pre_6_0_config`): no
    architecture means "standard", whose activation_fn "topk" with activation_fn_kwargs.k is a TopK
    SAE, and normalize_activations false means "none". Any other activation function is refused
    rather than read as a ReLU SAE."""
    cfg = dict(cfg)
    for old, new in (("activation_fn_str", "activation_fn"), ("hook_point", "hook_name")):
        if old in cfg:
            cfg.setdefault(new, cfg.pop(old))
    cfg.setdefault("architecture", "standard")
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    act = cfg.get("activation_fn")
    kwargs = cfg.get("activation_fn_kwargs")
    k = kwargs.get("k") if isinstance(kwargs, dict) else None
    if act == "topk" and k is not None and "k" not in cfg:  # SAELens 5 wrote "topk" SAEs with k only there
        cfg["k"] = k
    if cfg["architecture"] == "standard" and act not in (None, "relu"):
        if act != "topk" or k is None:
            raise FormatError(f"{file}: activation_fn {act!r} (with architecture 'standard'): only relu, and topk with "
                              "activation_fn_kwargs.k, load")  # fmt: skip
        cfg.update(architecture="topk", k=k)
    return cfg


def _require(file: str, key: str, value, types, positive: bool = False) -> None:
    """A one-line FormatError naming the file and field when value is not of `types` (bools refused)."""
    kind = "an integer" if types is int else "a number"
    if isinstance(value, bool) or not isinstance(value, types):
        raise FormatError(f"{file}: {key} must be {kind}, found {value!r}")
    if positive and not value > 0:
        raise FormatError(f"{file}: {key} must be positive, found {value!r}")


def read_params(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(cfg.json, the weights checked against it: exact keys, shapes from d_in and d_sae)."""
    cfg = read_config(path)
    d, m = int(cfg["d_in"]), int(cfg["d_sae"])
    expected = {"W_enc": (d, m), "W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
    if cfg["architecture"] == "jumprelu":
        expected["threshold"] = (m,)
    file = fs.join(path, WEIGHTS)
    found = tensors.read(file)
    tensors.check_exact(file, found, expected)
    return cfg, {k: np.asarray(v, np.float32) for k, v in found.items()}


def load(path: str):
    """A SAELens directory as a `jumprelu.SAE` computing what SAELens computes."""
    import jax.numpy as jnp

    from jumprelu.core.folded import SAE

    if path.endswith(WEIGHTS):
        path = os.path.dirname(path) or "."
    cfg, p = read_params(path)
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks (x·W_enc + b_enc)·‖W_dec,i‖ and decodes f_i/‖W_dec,i‖: the same SAE with the
        # norms moved into the encoder and out of the decoder (a no-op on its saved inference files,
        # whose decoder rows it already normalised)
        norms = np.linalg.norm(p["W_dec"], axis=1)
        if not norms.all():
            raise FormatError(
                f"{fs.join(path, WEIGHTS)}: W_dec has a zero row, which rescale_acts_by_decoder_norm divides by"
            )
        p.update(W_enc=p["W_enc"] * norms, b_enc=p["b_enc"] * norms, W_dec=p["W_dec"] / norms[:, None])
    if cfg.get("apply_b_dec_to_input", True):  # SAELens's default: fold the subtraction into b_enc
        p["b_enc"] = p["b_enc"] - p["b_dec"] @ p["W_enc"]
    k = None
    if cfg["architecture"] == "topk":
        k = int(cfg.get("k", 100))  # SAELens's default k
        p["threshold"] = np.zeros(int(cfg["d_sae"]), np.float32)
    elif cfg["architecture"] == "standard":
        p["threshold"] = np.zeros(int(cfg["d_sae"]), np.float32)
    else:  # ReLU(h)·[h > θ] = h·[h > max(θ, 0)]
        p["threshold"] = np.maximum(p["threshold"], np.float32(0))
    meta = cfg.get("metadata") or {}
    return SAE(
        **{n: jnp.asarray(v) for n, v in p.items()},
        k=k,
        scale=float(meta.get("input_scale") or 1.0),
        step=int(meta.get("training_steps") or 0),
        config={"source": os.path.abspath(path) if not fs.is_remote(path) else path, "saelens": cfg},
    )

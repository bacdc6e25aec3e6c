"""Gemma Scope `params.npz` files, both ways: the format Gemma Scope released its SAEs in.

A file holds five float32 arrays in folded form, taking raw activations x [..., d_model]:
  W_enc [d_model, M], b_enc [M], threshold [M], W_dec [M, d_model], b_dec [d_model]
  f = (x W_enc + b_enc) masked by (x W_enc + b_enc > threshold);  x̂ = f W_dec + b_dec
This is exactly `jumprelu.SAE`, so loading and exporting only check and copy arrays.

  jumprelu export WORKDIR OUT.npz --format gemma-scope [--member i]
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from jumprelu import fs
from jumprelu.core.folded import FOLDED_KEYS as KEYS
from jumprelu.errors import UserError
from jumprelu.export import hooks


class GemmaScopeError(UserError):
    """A params.npz that is not in the released layout; the message names the file and the problem."""


def read_params(path: str) -> dict[str, np.ndarray]:
    """The five arrays of a Gemma Scope params.npz, checked for presence and matching shapes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: np.asarray(npz[k]) for k in npz.files}
    except FileNotFoundError:
        raise GemmaScopeError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not a zip (or cut short), or pickled arrays
        if "pickled" in str(e) and not fs.is_remote(path) and not zipfile.is_zipfile(path):
            raise GemmaScopeError(f"{path}: not an .npz file (it is not a zip archive)") from None
        raise GemmaScopeError(f"{path}: not a readable .npz without pickle ({e})") from None
    missing = [k for k in KEYS if k not in found]
    if missing:
        raise GemmaScopeError(f"{path}: missing keys {missing}; found {sorted(found)}, expected {list(KEYS)}")
    d, m = found["W_enc"].shape if found["W_enc"].ndim == 2 else (None, None)
    expected = {"W_enc": (d, m), "b_enc": (m,), "threshold": (m,), "W_dec": (m, d), "b_dec": (d,)}
    for k in KEYS:
        if d is None or found[k].shape != expected[k]:
            want = "[d_model, M]" if d is None else str(list(expected[k]))
            raise GemmaScopeError(f"{path}: {k} has shape {list(found[k].shape)}, expected {want} (from W_enc)")
        if not np.issubdtype(found[k].dtype, np.floating):
            raise GemmaScopeError(f"{path}: {k} has dtype {found[k].dtype}, expected a float type")
        if not np.isfinite(found[k]).all():  # as a training checkpoint holding them is refused
            raise GemmaScopeError(f"{path}: {k} holds NaN or Inf")
    out = {k: found[k].astype(np.float32) for k in KEYS}
    if "k" in found:  # not Gemma Scope's, but `np.savez(f, **sae.params())` of a TopK SAE: its k, kept
        k = found["k"]
        if k.shape != () or not np.issubdtype(k.dtype, np.integer) or not 0 < int(k) <= m:
            raise GemmaScopeError(f"{path}: k is {k.tolist()!r}, expected a TopK SAE's k, an integer in 1..{m}")
        out["k"] = int(k)
    return out


def run_file(params_path: str) -> str:
    """Beside a params.npz that `jumprelu refit` wrote, the run it came from: params.run.json."""
    return params_path.removesuffix(".npz") + ".run.json"


def load(path: str):
    """A Gemma Scope params.npz as a `jumprelu.SAE` (identical computation); a refit's carries its
    run's config, step and scale (from params.run.json beside it), so its exports name the model and hook."""
    import jax.numpy as jnp

    from jumprelu.export.load import SAE

    params = read_params(path)
    # Gemma Scope's encoder is mask · ReLU(h): ReLU(h)·[h > θ] = h·[h > max(θ, 0)] (ours train θ > 0)
    params["threshold"] = np.maximum(params["threshold"], np.float32(0))
    arrays = {k: v if k == "k" else jnp.asarray(v) for k, v in params.items()}
    record = run_file(os.path.abspath(path))
    if not os.path.isfile(record):
        return SAE(**arrays, config={"source": os.path.abspath(path)})
    try:
        run = json.loads(fs.read_text(record))
        config, step, scale = dict(run["config"], source=os.path.abspath(path)), int(run["step"]), float(run["scale"])
    except (ValueError, KeyError, TypeError) as e:
        raise GemmaScopeError(f"{record}: not the run record jumprelu refit writes ({e!r})") from None
    return SAE(**arrays, config=config, step=step, scale=scale)


def export(sae, path: str) -> None:
    """Writes `sae` (a `jumprelu.SAE`) as a Gemma Scope params.npz, atomically."""
    if sae.k is not None:
        raise GemmaScopeError(
            f"{path}: a TopK SAE (k={sae.k}) has no exact JumpReLU form; BatchTopK, ReLU and Gated SAEs do"
        )
    # params.npz holds an SAE's five arrays: a transcoder's skip connection or other output width has no place
    transcoder = hooks.transcoder_reason(sae)
    if transcoder:
        raise GemmaScopeError(
            f"{path}: a transcoder ({transcoder}) has no Gemma Scope params.npz form; export it as gemma-scope-2"
        )
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in sae.params().items() if k in KEYS})
    fs.write_bytes_atomically(path, buf.getvalue())

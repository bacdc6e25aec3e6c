"""Write a SAELens-v6-format SAE directory with numpy only (no torch), and the numpy
reference of SAELens's encode/decode.  Self-test: writes random JumpReLU and TopK SAEs, loads
each with SAELens (check_saelens_load.py in the peer venv) and compares.

    python3 benchmarks/peers/write_saelens_dir.py --selftest /tmp/saelens_selftest

Any python with numpy: the `safetensors` package is used when importable, otherwise the file
is written by `save_safetensors` below (the format is an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes).  The
self-test needs benchmarks/peers/.venv (setup.sh) for the SAELens side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# The SAELens version the format was checked against; load_from_disk treats a metadata
# sae_lens_version < 6.0.0 (or none) as an old config and runs its conversion instead.
FORMAT_VERSION = "6.54.12"


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Pure-numpy safetensors writer (what safetensors.numpy.save_file produces)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        b = a.tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the reference writer pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_saelens_dir(
    path: str,
    params: dict[str, np.ndarray],
    architecture: str = "jumprelu",
    *,
    k: int | None = None,
    rescale_acts_by_decoder_norm: bool = False,
    apply_b_dec_to_input: bool = False,
    dtype: str = "float32",
    metadata: dict | None = None,
) -> None:
    """params: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
    and threshold [d_sae] for jumprelu (no threshold for topk)."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        save_file = save_safetensors

    d_in, d_sae = params["W_enc"].shape
    names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if architecture == "jumprelu" else [])
    if set(params) != set(names):
        raise ValueError(f"{architecture} needs exactly {names}, got {sorted(params)}")
    np_dtype = {"float32": np.float32, "float16": np.float16, "float64": np.float64}[dtype]
    tensors = {n: np.ascontiguousarray(params[n], dtype=np_dtype) for n in names}
    cfg = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": FORMAT_VERSION,
            "model_name": None,
            "hook_name": None,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": None,
            "dataset_path": None,
            **(metadata or {}),
        },
    }
    if architecture == "topk":
        if k is None:
            raise ValueError("topk needs k (SAELens silently defaults a missing k to 100)")
        cfg["k"] = int(k)
        cfg["rescale_acts_by_decoder_norm"] = bool(rescale_acts_by_decoder_norm)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "sae_weights.safetensors"))
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def reference(params, x, architecture="jumprelu", *, k=None, rescale=False, apply_b_dec_to_input=False):
    """numpy float64 copy of SAELens 6.x inference: returns (hidden_pre, feature_acts, recon)."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    x = np.asarray(x, np.float64)
    h = (x - p["b_dec"] * apply_b_dec_to_input) @ p["W_enc"] + p["b_enc"]
    if architecture == "jumprelu":
        f = np.maximum(h, 0) * (h > p["threshold"])
        return h, f, f @ p["W_dec"] + p["b_dec"]
    norms = np.linalg.norm(p["W_dec"], axis=1)
    hr = h * norms if rescale else h
    idx = np.argpartition(-hr, k - 1, axis=-1)[:, :k]
    f = np.zeros_like(hr)
    np.put_along_axis(f, idx, np.maximum(np.take_along_axis(hr, idx, -1), 0), -1)
    dec_in = f / norms if rescale else f
    return h, f, dec_in @ p["W_dec"] + p["b_dec"]


def random_params(d_in, d_sae, rng, architecture):
    W_dec = rng.normal(size=(d_sae, d_in)) * rng.uniform(0.5, 2.0, size=(d_sae, 1)) / np.sqrt(d_in)
    out = {
        "W_enc": rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in),
        "W_dec": W_dec,
        "b_enc": rng.normal(size=d_sae) * 0.1,
        "b_dec": rng.normal(size=d_in) * 0.5,
    }
    if architecture == "jumprelu":
        out["threshold"] = rng.uniform(0.5, 1.5, size=d_sae)
    return {n: v.astype(np.float32) for n, v in out.items()}


def selftest(root: str) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    py = os.path.join(here, ".venv", "bin", "python")
    rng = np.random.default_rng(0)
    d_in, d_sae, n = 64, 256, 200
    x = (rng.normal(size=(n, d_in)) + 0.3).astype(np.float32)
    os.makedirs(root, exist_ok=True)
    np.save(os.path.join(root, "x.npy"), x)
    cases = [
        ("jumprelu", dict(apply_b_dec_to_input=False)),
        ("jumprelu_applybdec", dict(apply_b_dec_to_input=True)),
        ("topk", dict(k=16, rescale_acts_by_decoder_norm=False, apply_b_dec_to_input=False)),
        ("topk_rescale", dict(k=16, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True)),
    ]
    ok = True
    for name, kw in cases:
        arch = name.split("_")[0]
        params = random_params(d_in, d_sae, rng, arch)
        d = os.path.join(root, name)
        write_saelens_dir(d, params, arch, **kw)
        out = os.path.join(root, f"{name}.npz")
        subprocess.run([py, os.path.join(here, "check_saelens_load.py"), d, "--input",
                        os.path.join(root, "x.npy"), "--out", out], check=True)  # fmt: skip
        got = np.load(out)
        h, f, r = reference(params, x, arch, k=kw.get("k"), rescale=kw.get("rescale_acts_by_decoder_norm", False),
                            apply_b_dec_to_input=kw["apply_b_dec_to_input"])  # fmt: skip
        errs = {
            "hidden_pre": float(np.abs(got["hidden_pre"] - h).max()),
            "feature_acts": float(np.abs(got["feature_acts"] - f).max()),
            "recon": float(np.abs(got["recon"] - r).max()),
            "forward": float(np.abs(got["forward"] - r).max()),
            "same_support": bool(((got["feature_acts"] != 0) == (f != 0)).all()),
        }
        good = errs["same_support"] and max(v for kk, v in errs.items() if kk != "same_support") < 1e-4
        ok &= good
        print(json.dumps({"case": name, "ok": good, **errs, "l0": float((f != 0).sum(-1).mean())}))
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--selftest", metavar="DIR", required=True)
    sys.exit(selftest(ap.parse_args().selftest))

"""Gemma Scope `params.npz` files, both ways: the format Gemma Scope released its SAEs in.

A file holds five float32 arrays in folded form, taking raw activations x [..., d_model]:
  W_enc [d_model, M], b_enc [M], threshold [M], W_dec [M, d_model], b_dec [d_model]
  f = (x W_enc + b_enc) masked by (x W_enc + b_enc > threshold);  x̂ = f W_dec + b_dec
This is exactly `jumprelu.SAE`, so loading and exporting only check and copy arrays.

  python -m jumprelu.gemma_scope export WORKDIR OUT.npz [--member i]
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np

from jumprelu import fs

KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


class GemmaScopeError(ValueError):
    """A params.npz that is not in the released layout; the message names the file and the problem."""


def read_params(path: str) -> dict[str, np.ndarray]:
    """The five arrays of a Gemma Scope params.npz, checked for presence and matching shapes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: np.asarray(npz[k]) for k in npz.files}
    except FileNotFoundError:
        raise GemmaScopeError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:  # not a zip, or an object array that would need pickle
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
    return {k: found[k].astype(np.float32) for k in KEYS}


def load(path: str):
    """A Gemma Scope params.npz as a `jumprelu.SAE` (identical computation)."""
    import jax.numpy as jnp

    from jumprelu.load import SAE

    params = read_params(path)
    return SAE(**{k: jnp.asarray(v) for k, v in params.items()}, config={"source": os.path.abspath(path)})


def export(sae, path: str) -> None:
    """Writes `sae` (a `jumprelu.SAE`) as a Gemma Scope params.npz, atomically."""
    if sae.k is not None:
        raise GemmaScopeError(
            f"{path}: a TopK SAE (k={sae.k}) has no exact JumpReLU form; BatchTopK, ReLU and Gated SAEs do"
        )
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in sae.params().items()})
    fs.write_bytes_atomically(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a trained SAE as a Gemma Scope params.npz")
    e.add_argument("workdir")
    e.add_argument("output")
    e.add_argument("--member", type=int, default=None, help="which SAE of a stacked run")
    e.add_argument("--step", type=int, default=None)
    args = p.parse_args(argv)
    from jumprelu.load import load as load_workdir

    try:
        sae = load_workdir(args.workdir, step=args.step, member=args.member)
        export(sae, args.output)
    except (GemmaScopeError, FileNotFoundError, ValueError) as err:
        print(f"jumprelu: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: d_model {sae.d_model}, width {sae.width}, step {sae.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

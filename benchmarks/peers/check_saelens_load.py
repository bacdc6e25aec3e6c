"""Load an SAE directory with SAELens and write its encode/decode of an input to an .npz.

Run with the peer venv (benchmarks/peers/setup.sh), so that the project's own test (in the
project's venv, no torch) can compare SAELens's numbers with its own:

    benchmarks/peers/.venv/bin/python benchmarks/peers/check_saelens_load.py DIR \
        --input x.npy --out saelens_out.npz

DIR is a SAELens-format directory (cfg.json + sae_weights.safetensors), loaded with
`sae_lens.SAE.load_from_disk(DIR, device=...)` (the sae-lens 6.x API; it is strict about the
tensor names and shapes).  The .npz holds, all float32 unless said:
  feature_acts  [N, d_sae]  sae.encode(x)
  recon         [N, d_in]   sae.decode(feature_acts)
  forward       [N, d_in]   sae(x)
  hidden_pre    [N, d_sae]  the `hook_sae_acts_pre` hook (x' W_enc + b_enc, before any
                            TopK decoder-norm rescaling / gate)
  param_<name>              every loaded parameter, as SAELens holds it after loading
  info          JSON string: sae_lens version, SAE class, architecture, the loaded cfg
With --fold-w-dec-norm the SAE is loaded with fold_W_dec_norm=True.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="SAELens-format SAE directory")
    p.add_argument("--input", required=True, help="[N, d_in] .npy")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="override cfg.json's dtype (e.g. float32)")
    p.add_argument("--fold-w-dec-norm", action="store_true")
    args = p.parse_args(argv)

    import numpy as np
    import sae_lens
    import torch
    from sae_lens import SAE

    sae = SAE.load_from_disk(args.dir, device=args.device, dtype=args.dtype, fold_W_dec_norm=args.fold_w_dec_norm)
    sae.eval()
    x_np = np.load(args.input)
    x = torch.from_numpy(np.asarray(x_np, dtype=np.float32)).to(args.device)
    with torch.no_grad():
        feature_acts = sae.encode(x)
        recon = sae.decode(feature_acts)
        _, cache = sae.run_with_cache(x, names_filter=["hook_sae_acts_pre"])
        forward = sae(x)
    hidden_pre = cache["hook_sae_acts_pre"]

    def f32(t):
        t = t.to_dense() if t.is_sparse else t
        return t.detach().float().cpu().numpy()

    cfg = sae.cfg.to_dict()
    info = {
        "sae_lens_version": sae_lens.__version__,
        "torch": torch.__version__,
        "class": type(sae).__name__,
        "architecture": sae.cfg.architecture(),
        "dtype": str(sae.dtype),
        "cfg": cfg,
        "param_dtypes": {n: str(t.dtype) for n, t in sae.named_parameters()},
    }
    out = {
        "feature_acts": f32(feature_acts),
        "recon": f32(recon),
        "forward": f32(forward),
        "hidden_pre": f32(hidden_pre),
        "info": np.array(json.dumps(info, default=str)),
    }
    for name, t in sae.named_parameters():
        out[f"param_{name}"] = f32(t)
    np.savez(args.out, **out)
    l0 = float((feature_acts != 0).float().sum(-1).mean())
    print(json.dumps({"class": info["class"], "architecture": info["architecture"], "rows": int(x.shape[0]),
                      "l0": l0, "out": args.out, "sae_lens_version": sae_lens.__version__}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

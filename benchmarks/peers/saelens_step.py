"""Time SAELens's JumpReLU training step at given shapes; print one JSON line with ms/step.

Run with the peer venv (benchmarks/peers/setup.sh):

    benchmarks/peers/.venv/bin/python benchmarks/peers/saelens_step.py \
        --d-in 576 --width 16384 --batch 4096 --l0 50

What is timed: `SAETrainer.step(batch)` of sae-lens 6.x, i.e. exactly what `fit()` runs per
step: `JumpReLUTrainingSAE.training_forward_pass` (θ projection, encode with the JumpReLU
STE, decode, MSE, quadratic target-L0 sparsity loss), the firing statistics update,
`loss.backward()`, grad-norm clip 1.0, Adam step, zero_grad, lr and coefficient scheduler
steps.  Not timed: data loading (one fixed batch, already on the device).

Thresholds: before timing, every latent's θ is set to its own (1 − l0/width) quantile of the
pre-activations on the batch, so the batch L0 is ≈ --l0 with no dense latents.  Adam's first
steps are lr-sized for every weight, which would move L0 far from the target within a few
steps, so the parameters (not Adam's state) are restored to that starting point before each
step, outside the timed region; the L0 of the first and last timed step are reported.
SAELens's step is all dense, so its time does not depend on L0 anyway.
Data: standard normal rows by default, or the first --batch rows of --data X.npy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l0", type=float, default=50.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bandwidth", type=float, default=0.01)
    p.add_argument("--l0-coefficient", type=float, default=5.0)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--autocast", action="store_true", help="SAETrainer's bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--data", default=None, help="optional [N, d_in] .npy to take the batch from")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import sae_lens
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)

    if args.data:
        import numpy as np

        rows = np.load(args.data, mmap_mode="r")[: args.batch]
        x = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        x = x / x.norm(dim=-1).pow(2).mean().sqrt()  # E‖x‖² = 1, as the project's data
        if x.shape != (args.batch, args.d_in):
            raise SystemExit(f"--data gives {tuple(x.shape)}, need ({args.batch}, {args.d_in})")
    else:
        x = torch.randn(args.batch, args.d_in)
    x = x.to(dev)

    cfg = JumpReLUTrainingSAEConfig(
        d_in=args.d_in, d_sae=args.width, dtype="float32", device=str(dev),
        jumprelu_sparsity_loss_mode="quadratic", target_l0=args.l0,
        jumprelu_bandwidth=args.bandwidth, jumprelu_init_threshold=0.01,
        l0_coefficient=args.l0_coefficient,
    )  # fmt: skip
    sae = JumpReLUTrainingSAE(cfg).to(dev)
    with torch.no_grad():  # per-latent θ at the (1 - l0/width) quantile of this batch
        pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        k = max(1, min(args.batch, round(args.batch * (1 - args.l0 / args.width))))
        theta = pre.kthvalue(k, dim=0).values.clamp(min=0)
        sae.threshold.data.copy_(theta.float())
        del pre

    steps_total = args.warmup + args.steps
    tcfg = SAETrainerConfig(
        total_training_samples=steps_total * args.batch, train_batch_size_samples=args.batch,
        lr=args.lr, lr_end=args.lr / 10, device=str(dev), autocast=args.autocast,
    )  # fmt: skip
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    start = {n: t.detach().clone() for n, t in sae.named_parameters()}
    times, l0s = [], []
    for i in range(steps_total):
        with torch.no_grad():
            for n, t in sae.named_parameters():
                t.copy_(start[n])
        sync()
        t0 = time.perf_counter()
        out = trainer.step(x)
        sync()
        dt = time.perf_counter() - t0
        trainer.n_training_steps += 1
        if i >= args.warmup:
            times.append(dt)
            l0s.append(float((out.feature_acts != 0).float().sum(-1).mean()))

    ms = [1000 * t for t in times]
    print(json.dumps({
        "impl": "sae_lens", "sae_lens_version": sae_lens.__version__, "torch": torch.__version__,
        "device": str(dev), "threads": torch.get_num_threads(), "autocast": args.autocast,
        "d_in": args.d_in, "width": args.width, "batch": args.batch, "target_l0": args.l0,
        "ms_per_step": statistics.median(ms), "ms_mean": statistics.fmean(ms),
        "ms_min": min(ms), "ms_max": max(ms), "steps": args.steps, "warmup": args.warmup,
        "l0_first": l0s[0], "l0_last": l0s[-1],
    }), flush=True)  # fmt: skip
    return 0


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())

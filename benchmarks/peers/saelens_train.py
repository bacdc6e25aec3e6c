"""Train one SAE with SAELens's own trainer on in-memory activations; print one JSON line.

Run with the peer venv (benchmarks/peers/setup.sh), not the project's:

    benchmarks/peers/.venv/bin/python benchmarks/peers/saelens_train.py \
        --train train.npy --eval eval.npy --arch jumprelu --target-l0 50 \
        --width 4096 --batch 1024 --tokens 2000000 --lr 1e-3

API used (sae-lens 6.x): `sae_lens.saes.jumprelu_sae.JumpReLUTrainingSAE` /
`sae_lens.saes.topk_sae.TopKTrainingSAE` with their training configs, driven by
`sae_lens.training.sae_trainer.SAETrainer` (Adam, lr scheduler, coefficient warm-up,
grad-norm clip 1.0, dead-latent tracking, activation-scaler fold at the end: all SAELens's
code).  `SAETrainer` takes any `Iterator[torch.Tensor]` as its data provider, so we feed it
shuffled batches of the --train rows instead of an LM-backed ActivationsStore.  After
`fit()` the SAE is written with `save_inference_model` and read back with
`SAE.load_from_disk`; the eval metrics come from that inference SAE's encode/decode.

Normalisation (--normalize):
  unit_ms (default): the jumprelu project's convention (E‖x/C‖² = 1, C from the train rows),
      set as SAELens's ActivationScaler.scaling_factor = 1/C, so SAELens scales every batch
      and folds 1/C into the weights at the end (its fold_activation_norm_scaling_factor).
  sae_lens: SAELens's own `normalize_activations="expected_average_only_in"`
      (mean ‖x‖ = √d_in, estimated by the trainer, folded at the end).
  none: raw activations.
Threshold / bandwidth values are in the normalised units.

Metrics, on the --eval rows in raw units: L0 = mean active latents per token;
FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²; dead = share of latents never active (dead_count too);
dense10 = share of latents active on > 10% of eval tokens.  `seconds` is the wall time of
`SAETrainer.fit()` alone (no data loading, no eval).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bars would go to stderr
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="[N, d] float32/float16 .npy (already split)")
    p.add_argument("--eval", required=True, help="[M, d] float32/float16 .npy")
    p.add_argument("--arch", choices=["jumprelu", "topk"], default="jumprelu")
    p.add_argument("--target-l0", type=float, default=50.0, help="jumprelu: quadratic-mode target L0")
    p.add_argument("--k", type=int, default=50, help="topk: k")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bandwidth", type=float, default=0.01, help="jumprelu STE bandwidth")
    p.add_argument("--init-threshold", type=float, default=0.01, help="jumprelu initial θ")
    p.add_argument("--l0-coefficient", type=float, default=5.0, help="jumprelu sparsity coefficient")
    p.add_argument("--l0-warmup-steps", type=int, default=0)
    p.add_argument(
        "--sparsity-mode", choices=["quadratic", "step", "tanh"], default="quadratic",
        help="jumprelu_sparsity_loss_mode",
    )  # fmt: skip
    p.add_argument("--normalize", choices=["unit_ms", "sae_lens", "none"], default="unit_ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save", default=None, help="also keep the SAELens inference SAE in this directory")
    return p.parse_args(argv)


def batches(rows: np.ndarray, batch: int, seed: int):
    """Endless shuffled float32 batches of rows (reshuffled every pass)."""
    import torch

    rng = np.random.default_rng(seed)
    n = rows.shape[0]
    if n < batch:
        raise SystemExit(f"--train has {n} rows, fewer than --batch {batch}")
    while True:
        perm = rng.permutation(n)
        for s in range(0, n - batch + 1, batch):
            idx = np.sort(perm[s : s + batch])  # sorted gather: faster on memory-mapped files
            yield torch.from_numpy(np.asarray(rows[idx], dtype=np.float32))


def build_sae(args, d_in: int, device: str):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    norm = "expected_average_only_in" if args.normalize == "sae_lens" else "none"
    common = dict(d_in=d_in, d_sae=args.width, dtype="float32", device=device, normalize_activations=norm)
    if args.arch == "jumprelu":
        cfg = JumpReLUTrainingSAEConfig(
            **common,
            jumprelu_init_threshold=args.init_threshold,
            jumprelu_bandwidth=args.bandwidth,
            jumprelu_sparsity_loss_mode=args.sparsity_mode,
            l0_coefficient=args.l0_coefficient,
            l0_warm_up_steps=args.l0_warmup_steps,
            target_l0=args.target_l0 if args.sparsity_mode == "quadratic" else None,
        )
        return JumpReLUTrainingSAE(cfg)
    cfg = TopKTrainingSAEConfig(**common, k=args.k)
    return TopKTrainingSAE(cfg)


def evaluate(sae, rows: np.ndarray, device: str, chunk: int = 8192) -> dict:
    """L0, FVU, dead and dense shares of an (inference) SAELens SAE on raw rows."""
    import torch

    n, d = rows.shape
    width = sae.cfg.d_sae
    counts = torch.zeros(width, dtype=torch.float64)
    sq_err = active = sum_sq = 0.0
    sum_x = np.zeros(d, np.float64)
    with torch.no_grad():
        for s in range(0, n, chunk):
            x_np = np.asarray(rows[s : s + chunk], dtype=np.float32)
            x = torch.from_numpy(x_np).to(device)
            f = sae.encode(x)
            x_hat = sae.decode(f)
            fired = f != 0
            sq_err += float(((x - x_hat).double() ** 2).sum())
            active += float(fired.sum())
            counts += fired.sum(0).double().cpu()
            x64 = x_np.astype(np.float64)
            sum_x += x64.sum(0)
            sum_sq += float((x64 * x64).sum())
    mean = sum_x / n
    total_var = sum_sq - n * float(mean @ mean)
    freq = counts.numpy() / n
    return {
        "L0": active / n,
        "FVU": sq_err / max(total_var, 1e-30),
        "dead": float(np.mean(counts.numpy() == 0)),
        "dead_count": int((counts == 0).sum()),
        "dense10": float(np.mean(freq > 0.1)),
        "mse": sq_err / n,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import sae_lens
    import torch
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train = np.load(args.train, mmap_mode="r")
    eval_rows = np.load(args.eval, mmap_mode="r")
    if train.ndim != 2 or eval_rows.ndim != 2 or train.shape[1] != eval_rows.shape[1]:
        raise SystemExit(f"expected [N, d] arrays with one d; got {train.shape} and {eval_rows.shape}")
    d_in = train.shape[1]
    if train.shape[0] * d_in * 4 <= 4 << 30:  # small enough: load once, as float32
        train = np.asarray(train, dtype=np.float32)

    sae = build_sae(args, d_in, args.device)
    steps = args.tokens // args.batch
    tcfg = SAETrainerConfig(
        total_training_samples=steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,  # LanguageModelSAERunnerConfig's default; unused by "constant"
        lr_scheduler_name="constant",
        device=args.device,
        n_batches_for_norm_estimate=min(1000, max(1, steps)),
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=batches(train, args.batch, args.seed))
    scale = None
    if args.normalize == "unit_ms":
        sample = np.asarray(train[: min(train.shape[0], 65536)], dtype=np.float64)
        scale = 1.0 / float(np.sqrt(np.mean(np.sum(sample * sample, axis=1))))
        trainer.activation_scaler.scaling_factor = scale  # SAELens scales batches, folds at the end

    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        out = args.save or tmp
        sae.save_inference_model(out)
        inf = SAE.load_from_disk(out, device=args.device)
        inf.eval()
        t1 = time.perf_counter()
        metrics = evaluate(inf, eval_rows, args.device)
        eval_seconds = time.perf_counter() - t1

    result = {
        "arch": args.arch,
        **{k: metrics[k] for k in ("L0", "FVU", "dead", "dense10")},
        "seconds": seconds,
        "sae_lens_version": sae_lens.__version__,
        "dead_count": metrics["dead_count"],
        "mse": metrics["mse"],
        "steps": steps,
        "ms_per_step": 1000 * seconds / max(steps, 1),
        "eval_seconds": eval_seconds,
        "width": args.width,
        "batch": args.batch,
        "tokens": steps * args.batch,
        "lr": args.lr,
        "normalize": args.normalize,
        "scale": scale,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "eval_rows": int(eval_rows.shape[0]),
    }
    if args.arch == "jumprelu":
        result.update(
            target_l0=args.target_l0, sparsity_mode=args.sparsity_mode, bandwidth=args.bandwidth,
            init_threshold=args.init_threshold, l0_coefficient=args.l0_coefficient,
        )  # fmt: skip
    else:
        result["k"] = args.k
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

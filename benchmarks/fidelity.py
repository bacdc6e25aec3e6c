"""Fidelity at equal budget: this project's JumpReLU recipe against TopK, BatchTopK, Matryoshka
JumpReLU and (when its virtualenv exists) SAELens's JumpReLU and TopK, on one held-out split.

  python benchmarks/fidelity.py ../shared/data/smollm2_135m_l15_resid_dev.npy --out /tmp/fidelity
  python benchmarks/fidelity.py DATA --out DIR --tokens 8000000 --targets 50 --kinds jumprelu,topk

DATA is a .npy [N, d_model] of activations (float16 or float32, rows in any order). It is
shuffled with --seed and split: --eval_rows rows (20,000) are held out, the rest become an
activation store every trainer reads (SAELens gets the same rows as .npy files). With
--window_rows W the held-out rows are whole blocks of W consecutive rows instead (for data stored
in window order, such as ../shared/data: text the SAEs never saw any token of). For each target
L0 (20, 50, 100) every trainer gets the same width (4,096), batch (1,024) and token budget (2M):
  jumprelu     the recommended short-budget recipe (`smollm2_pareto:jumprelu,target_l0=T`: its
               BatchTopK phase over the first 80% of the steps, and the controller reading the L0
               of 1,024 of the store's held-out rows, both since 2026-12-01; the frequency
               penalty sparing the 0.5% most frequent latents since 2026-12-02); from 8M tokens on
               the long recipe (lr 5e-3 decaying over the last 40%; since 2026-12-05)
  jumprelu_refit  that run plus `jumprelu refit` (least-squares decoder on the last --refit_rows
               training rows, ridge --refit_ridge; no new rows, encoder and L0 unchanged)
  matryoshka   the same recipe with nested prefixes (width/8, width/4, width/2, width; or
               --matryoshka_divisors) whose reconstruction errors are weighted 1:1:1:9
               (--matryoshka_weights auto: the whole SAE has 3/4 of the loss, the prefixes
               share the rest);
               --matryoshka_frequency_penalty sets μ of Gemma Scope 2's penalty on latents above 10%
               (default: the recipe's)
  topk         k = T;  batchtopk  k = T (Adam β1 0.9, lr 1e-3, the recipe's warm-up)
  matryoshka_refit, batchtopk_refit  the same decoder refit of those runs (BatchTopK's SAE is a
               JumpReLU SAE with one threshold; Matryoshka's fits its nested loss since 2026-12-05)
  saelens_jumprelu  SAELens 6.x's own trainer: quadratic target-L0 mode, lr 1e-3, bandwidth
               0.01, θ init 0.01, l0 coefficient 5 (benchmarks/peers/saelens_train.py)
  saelens_topk SAELens's TopK, lr 1e-3
It prints a table of held-out L0, FVU, dead latents and latents firing on > 10% of tokens, and
writes fidelity.csv, fidelity.png (L0 against FVU) and fidelity.json under --out. Finished runs
are kept (results.jsonl) and skipped on a rerun with the same config (a hash of our trainers'
configs names each run, so a changed recipe or baseline trains afresh).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from jumprelu.config import set_fields
from jumprelu.errors import EXIT_PREEMPTED
from jumprelu.store.convert import convert

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_PYTHON = os.path.join(HERE, "peers", ".venv", "bin", "python")
OURS = ("jumprelu", "jumprelu_refit", "matryoshka", "matryoshka_refit", "topk", "batchtopk", "batchtopk_refit")
PEERS = ("saelens_jumprelu", "saelens_topk")
FIELDS = ("trainer", "target", "l0", "fvu", "dead_fraction", "dense_fraction", "tokens", "seconds", "prefix_fvu")


def held_out(n: int, eval_rows: int, seed: int, window_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(eval row indices, training row indices), each sorted.

    window_rows 0: eval_rows rows drawn at random. window_rows W: whole blocks of W consecutive
    rows (the data's text windows, when it is stored in window order) are held out, so no eval
    row's window is also trained on; the rest of the last chosen block beyond eval_rows is dropped
    from both sides.
    """
    rng = np.random.default_rng(seed)
    if not window_rows:
        perm = rng.permutation(n)
        return np.sort(perm[:eval_rows]), np.sort(perm[eval_rows:])
    blocks = rng.permutation(-(-n // window_rows))
    sizes = np.minimum(window_rows, n - blocks * window_rows)  # the last block may be short
    chosen = blocks[: np.searchsorted(np.cumsum(sizes), eval_rows) + 1]
    rows = np.concatenate([np.arange(b * window_rows, min(n, (b + 1) * window_rows)) for b in chosen])
    if rows.size < eval_rows:
        raise SystemExit(f"--window_rows {window_rows}: the held-out blocks give {rows.size} rows < --eval_rows")
    taken = np.zeros(n, bool)
    taken[rows] = True
    return np.sort(rows[:eval_rows]), np.flatnonzero(~taken)


def split(data: str, out: str, eval_rows: int, seed: int, window_rows: int = 0) -> tuple[str, str, str]:
    """(train .npy, eval .npy, store dir) under out, written once."""
    train_npy, eval_npy, store = (os.path.join(out, n) for n in ("train.npy", "eval.npy", "store"))
    made = os.path.join(out, "split.json")
    spec = dict(data=os.path.abspath(data), eval_rows=eval_rows, seed=seed)
    if window_rows:  # recorded only when set, so splits made before the option still match
        spec["window_rows"] = window_rows
    if os.path.exists(eval_npy) and os.path.exists(made):
        was = json.load(open(made))
        if was != spec:
            raise SystemExit(
                f"{out} holds the split {was}; pass another --out for this data, --eval_rows, --seed or --window_rows"
            )
    if not os.path.exists(eval_npy):
        x = np.load(data, mmap_mode="r")
        if x.ndim != 2 or eval_rows >= x.shape[0]:
            raise SystemExit(f"{data}: expected [N, d_model] with N > --eval_rows={eval_rows}, found {list(x.shape)}")
        eval_idx, train_idx = held_out(x.shape[0], eval_rows, seed, window_rows)
        np.save(train_npy, np.asarray(x[train_idx], np.float32))
        np.save(eval_npy + ".tmp.npy", np.asarray(x[eval_idx], np.float32))
        os.replace(eval_npy + ".tmp.npy", eval_npy)
        with open(made, "w") as f:
            json.dump(spec, f)
    if not os.path.exists(os.path.join(store, "metadata.json")):
        convert(train_npy, store, shuffle_seed=seed)
    return train_npy, eval_npy, store


def matryoshka_widths(args) -> tuple[int, ...]:
    """The nested prefixes' widths, smallest first: --width over each of --matryoshka_divisors."""
    return tuple(args.width // int(d) for d in args.matryoshka_divisors.split(","))


def our_config(trainer: str, target: int, args, store: str):
    from jumprelu.launch import experiment

    kind = {"matryoshka": "jumprelu"}.get(trainer, trainer)
    arg = f"{kind},target_l0={target},tokens={args.tokens}"
    cfg = experiment.load("smollm2_pareto").get_config(arg)
    cfg.data.source = store
    # the store's own small split, which the recipe's L0 controller reads; the reported metrics use eval.npy
    cfg.data.eval_rows = 1024
    cfg.sae.width = args.width
    cfg.train.batch_size = args.batch
    cfg.train.steps = args.tokens // args.batch
    cfg.log.progress = False
    if trainer == "matryoshka":  # nested prefixes (Gemma Scope 2 pairs them with a frequency penalty)
        cfg.sae.matryoshka_widths = matryoshka_widths(args)
        n = len(cfg.sae.matryoshka_widths)
        if args.matryoshka_weights == "auto":  # the whole SAE 3/4 of the loss: 1:1:1:9 for four prefixes
            cfg.sae.matryoshka_weights = (1.0,) * (n - 1) + (3.0 * (n - 1),)
        elif args.matryoshka_weights:
            cfg.sae.matryoshka_weights = tuple(float(v) for v in args.matryoshka_weights.split(","))
        if args.matryoshka_frequency_penalty is not None:
            cfg.sae.frequency_penalty = args.matryoshka_frequency_penalty
    if kind in ("topk", "batchtopk"):
        cfg.sae.k = target
        # Gao et al.'s Adam (β1 0.9) at SAELens's TopK lr. With the Pareto sweep's lr 3e-3 and β1 0
        # the k 50 run on a seed-1 split blew up at step 650 (batch FVU 5,925; the divergence guard
        # stopped it); with these, FVU 0.152 held out.
        cfg.train.adam_b1, cfg.train.lr = 0.9, 1e-3
        # Gao et al.'s 10M-token dead window never passes in a few million tokens, so AuxK does
        # not run here; the recipe's 50k-token window and lr decay (--override) helped k 100 and
        # hurt k 50 (benchmarks/results/fidelity_history.md), so the baseline keeps the published window.
    for item in args.override:  # FIELD=VALUE, e.g. train.encoder_weight_decay=0.3, parsed as experiment args are
        set_fields(cfg, experiment.parse_arg(item))
    return cfg


def check_configs(p, args, targets: list[int]) -> None:
    """Every config our trainers will get, with the --override fields (a misspelt one trained the
    recipe under its label), is valid: one line before anything is written or trained."""
    from jumprelu.config import validate
    from jumprelu.errors import ConfigError

    for trainer in {t.removesuffix("_refit") for t in args.kinds.split(",") if t and t not in PEERS}:
        for target in targets:
            try:
                validate(our_config(trainer, target, args, "store"))
            except ConfigError as e:
                p.error(f"{trainer} at L0 {target} with --override {' '.join(args.override) or '(none)'}: {e}")


def config_sha(trainer: str, target: int, args, store: str) -> str:
    """A short hash of the config our trainer gets: finished runs are reused only for the same one,
    so a change of recipe or baseline in the code is trained afresh, not read back."""
    if trainer in PEERS:  # its settings: another --width, --batch or --seed is another run
        cfg = {"peer": peer_arguments(trainer, target, args)}
    else:
        cfg = our_config(trainer.removesuffix("_refit"), target, args, store).to_dict()
        # a field added with a default that changes nothing keeps earlier runs' hashes (and rows)
        if cfg["sae"].get("matmul_precision") == "default":
            del cfg["sae"]["matmul_precision"]
    if trainer.endswith("_refit"):
        cfg["refit"] = [args.refit_rows, args.refit_ridge]
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_dir(trainer: str, target: int, args, store: str) -> str:
    """The training run of a trainer; a refit row refits the plain trainer's run (its own row is
    keyed by --refit_rows/--refit_ridge too, but it must not train the same SAE a second time)."""
    base = trainer.removesuffix("_refit")
    # the budget names the run: a rerun with other --tokens must not resume this one
    tag = "".join(f"_{o}" for o in args.override)  # overrides name the run too, and so does its config_sha
    sha = config_sha(base, target, args, store)
    return os.path.join(args.out, "runs", f"{base}_l0={target}_tokens={args.tokens}{tag}_{sha}")


def run_ours(trainer: str, target: int, args, store: str, eval_rows: np.ndarray) -> dict:
    import jumprelu
    from jumprelu.evaluate.metrics import evaluate_rows
    from jumprelu.train import loop

    base = trainer.removesuffix("_refit")
    workdir = run_dir(trainer, target, args, store)
    ckpts = os.path.join(workdir, "checkpoints")
    # a run stopped (SIGTERM, Ctrl-C) and run again resumes: its seconds then count only this part
    resumed = max((int(n) for n in os.listdir(ckpts) if n.isdigit()), default=0) if os.path.isdir(ckpts) else 0
    t0 = time.perf_counter()
    loop.train(our_config(base, target, args, store), workdir)  # a finished run returns at once
    if trainer.endswith("_refit"):
        from jumprelu.cli.refit import refit_workdir

        workdir = refit_workdir(workdir, None, args.refit_rows, args.refit_ridge)["params"]
    seconds = time.perf_counter() - t0
    sae = jumprelu.load(workdir)
    m = evaluate_rows(dict(sae.params(), k=sae.k), eval_rows)
    r = dict(l0=m["l0"], fvu=m["fvu"], dead_fraction=m["dead_fraction"], dense_fraction=m["dense_fraction"],
             seconds=seconds)  # fmt: skip
    if resumed:
        r["resumed_at_step"] = resumed
    if sae.k is None:  # what the nested loss buys: the first prefix's latents reconstructing alone
        r.update(prefix_fvu(sae.params(), matryoshka_widths(args)[0], eval_rows))
    return r


def prefix_fvu(params: dict, width: int, eval_rows: np.ndarray) -> dict:
    """FVU and L0 of the SAE's first `width` latents alone (for a plain SAE, an arbitrary subset)."""
    from jumprelu.evaluate.metrics import evaluate_rows, prefix

    m = evaluate_rows(prefix(params, width), eval_rows)
    return dict(prefix_width=width, prefix_l0=m["l0"], prefix_fvu=m["fvu"])


def peer_arguments(trainer: str, target: int, args) -> list[str]:
    """saelens_train.py's arguments for this trainer and target, but the data files."""
    arch = trainer.removeprefix("saelens_")
    cmd = ["--arch", arch, "--width", str(args.width), "--batch", str(args.batch), "--tokens", str(args.tokens)]
    # SAELens's own normalisation (mean ‖x‖ = √d): its JumpReLU values below (θ init, bandwidth) are
    # in those units; on our E‖x‖² = 1 scale they left 90% of its latents dead (FVU 0.341 at L0 50).
    cmd += ["--lr", "1e-3", "--seed", str(args.seed), "--normalize", "sae_lens"]
    if arch == "jumprelu":
        cmd += ["--target-l0", str(target), "--bandwidth", "0.01", "--init-threshold", "0.01", "--l0-coefficient", "5"]
    else:
        cmd += ["--k", str(target)]
    return cmd


def run_peer(trainer: str, target: int, args, train_npy: str, eval_npy: str) -> dict:
    cmd = [PEER_PYTHON, os.path.join(HERE, "peers", "saelens_train.py"), "--train", train_npy, "--eval", eval_npy]
    cmd += peer_arguments(trainer, target, args)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"SAELens run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(l0=r["L0"], fvu=r["FVU"], dead_fraction=r["dead"], dense_fraction=r["dense10"], seconds=r["seconds"])


def append_line(path: str, line: str) -> None:
    """Appends one line, first ending a line a crash left unfinished (so the new one stays whole)."""
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def plot(rows: list[dict], path: str, title: str) -> None:
    from jumprelu.evaluate.plots import plot_pareto

    plot_pareto([dict(kind=r["trainer"], l0=r["l0"], fvu=r["fvu"]) for r in rows], path, title=title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help=".npy [N, d_model] of activations")
    p.add_argument("--out", required=True)
    p.add_argument("--targets", default="20,50,100")
    p.add_argument("--kinds", default=",".join(OURS + PEERS), help="trainers to run (peers need their venv)")
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--eval_rows", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--window_rows",
        type=int,
        default=0,
        help="hold out whole blocks of this many consecutive rows (256: the shared data's text windows); 0: rows",
    )
    p.add_argument("--override", action="append", default=[], help="FIELD=VALUE on our configs (repeatable)")
    p.add_argument("--refit_rows", type=int, default=131072, help="jumprelu_refit: last training rows fitted")
    p.add_argument("--refit_ridge", type=float, default=0.01, help="jumprelu_refit: ridge ρ")
    p.add_argument(
        "--matryoshka_frequency_penalty", type=float, default=None, help="μ for the matryoshka trainer (the recipe's)"
    )
    p.add_argument("--matryoshka_divisors", default="8,4,2,1", help="matryoshka prefixes: width/8, width/4, ...")
    p.add_argument(
        "--matryoshka_weights",
        default="auto",
        help="each prefix's loss share, e.g. 1,1,1,3 ('': equal; auto: the whole SAE 3/4, the rest equal)",
    )
    args = p.parse_args()
    if args.window_rows < 0:
        p.error(f"--window_rows must be >= 0, found {args.window_rows}")
    # checked before the split and the store are written, and before hours of training
    if not os.path.isfile(args.data):
        p.error(f"{args.data}: no such file")
    for name in ("tokens", "width", "batch", "eval_rows", "refit_rows"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0, found {getattr(args, name)}")
    if args.tokens < args.batch:
        p.error(f"--tokens {args.tokens} is less than one batch of {args.batch}: no training step")
    try:
        targets = [int(t) for t in args.targets.split(",") if t]
    except ValueError:
        p.error(f"--targets must be integers separated by commas, found {args.targets!r}")
    if not targets or not all(0 < t < args.width for t in targets):
        p.error(f"--targets must be L0s between 1 and the width ({args.width}), found {args.targets!r}")
    unknown = [t for t in args.kinds.split(",") if t and t not in OURS + PEERS]
    if unknown:
        p.error(f"--kinds: unknown trainer {unknown[0]!r}; expected some of {','.join(OURS + PEERS)}")
    try:
        divisors = [int(d) for d in args.matryoshka_divisors.split(",")]
    except ValueError:
        divisors = []
    if not divisors or min(divisors) <= 0:
        p.error(
            f"--matryoshka_divisors must be positive integers separated by commas, found {args.matryoshka_divisors!r}"
        )
    check_configs(p, args, targets)
    dtype = np.load(args.data, mmap_mode="r").dtype
    if not np.issubdtype(dtype, np.floating):  # a bf16 store's uint16 shard
        p.error(f"{args.data}: expected float activations, found dtype {dtype}")
    args.out = os.path.abspath(args.out)  # the store path enters each run's config hash: one spelling
    os.makedirs(args.out, exist_ok=True)
    train_npy, eval_npy, store = split(args.data, args.out, args.eval_rows, args.seed, args.window_rows)
    eval_rows = np.load(eval_npy)
    trainers = [t for t in args.kinds.split(",") if t]
    if any(t in PEERS for t in trainers) and not os.path.exists(PEER_PYTHON):
        print(f"SAELens not installed ({PEER_PYTHON} missing): run bash benchmarks/peers/setup.sh; skipping it")
        trainers = [t for t in trainers if t not in PEERS]
    results_path = os.path.join(args.out, "results.jsonl")
    done = {}
    if os.path.exists(results_path):
        for number, line in enumerate(open(results_path), 1):
            try:
                r = json.loads(line)
            except ValueError:  # a line torn by a crash: that run is trained again
                print(f"{results_path}:{number}: not a JSON line (torn by a crash?); ignored")
                continue
            done[(r["trainer"], r["target"], r["tokens"], tuple(r.get("override", ())), r.get("config_sha", ""))] = r
    from jumprelu.train.preemption import Preempted

    rows = []
    for target in targets:
        for trainer in trainers:
            overrides = tuple(args.override) if trainer in OURS else ()
            key = (trainer, target, args.tokens, overrides, config_sha(trainer, target, args, store))
            if key not in done:
                if trainer in PEERS:
                    r = run_peer(trainer, target, args, train_npy, eval_npy)
                else:
                    try:
                        r = run_ours(trainer, target, args, store, eval_rows)
                    except Preempted as e:  # its step is saved: the same command resumes it
                        print(f"fidelity: {trainer} at L0 {target}: {e}", file=sys.stderr)
                        sys.exit(EXIT_PREEMPTED)
                done[key] = dict(
                    trainer=trainer, target=target, tokens=args.tokens, override=list(key[3]), config_sha=key[4], **r
                )
                append_line(results_path, json.dumps(done[key]))
            r = done[key]
            rows.append(r)
            print(
                f"{trainer:<17} L0 target {target:>4}: L0 {r['l0']:7.2f}  FVU {r['fvu']:.4f}  "
                f"dead {100 * r['dead_fraction']:5.1f}%  >10% {100 * r['dense_fraction']:4.1f}%  "
                f"({r['seconds']:.0f} s)"
                + (
                    f"  first {r['prefix_width']}: FVU {r['prefix_fvu']:.4f} at L0 {r['prefix_l0']:.2f}"
                    if "prefix_fvu" in r
                    else ""
                ),
                flush=True,
            )
    with open(os.path.join(args.out, "fidelity.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(args.out, "fidelity.png"), f"width {args.width}, {args.tokens:,} tokens, held-out rows")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    print()
    print_table(rows)
    print(f"reproduce: {command}")


def print_table(rows: list[dict]) -> None:
    """The rows as a markdown table: trainer, target, held-out L0, FVU, dead and >10% latents."""
    print("| trainer | target L0 | L0 | FVU | dead | >10% |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trainer']} | {r['target']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{100 * r['dead_fraction']:.1f}% | {100 * r['dense_fraction']:.2f}% |"
        )


if __name__ == "__main__":
    main()

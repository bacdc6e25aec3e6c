"""Does a requested L0 come out? JumpReLU in target-L0 mode on real activations, one run per target.

  python benchmarks/l0_control.py --data ../shared/data/smollm2_135m_l15_resid_dev.npy --out /tmp/l0 --steps 1500

Trains the JumpReLU config of experiments/smollm2_pareto.py (width 4,096, raw θ; 500 steps of
1,024 tokens unless --steps) with `sae.target_l0` = each target instead of a fixed λ (λ then
follows a controller, see core/kinds/jumprelu_loss.make_loss), and measures L0 on the held-out split. A
target is met when the held-out L0 is within ±10% of it. Prints a table and writes
OUT/l0_control.json; finished runs in OUT/runs/ are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ensure_store, train_run  # noqa: E402
from jumprelu.launch import experiment  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="activation store directory, or a .npy [N, d_model]")
    p.add_argument("--out", required=True)
    p.add_argument("--experiment", default="smollm2_pareto:jumprelu")
    p.add_argument("--targets", default="20,50,100")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative error of the held-out L0")
    p.add_argument("--threshold-param", default=None, choices=("raw", "log"), help="override sae.threshold_param")
    p.add_argument("--rate", type=float, default=None, help="override sae.target_l0_rate (λ controller gain)")
    p.add_argument("--gain", type=float, default=None, help="override sae.target_l0_gain (proportional term)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    args = p.parse_args()

    os.makedirs(args.out, exist_ok=True)
    store = ensure_store(args.data, args.out)
    name, arg = experiment.split(args.experiment)
    base = experiment.load(name).get_config(arg)
    results = []
    for target in [float(t) for t in args.targets.split(",")]:
        overrides = {"data.source": store, "log.progress": False, "sae.kind": "jumprelu", "sae.target_l0": target}
        if args.threshold_param:
            overrides["sae.threshold_param"] = args.threshold_param
        if args.rate:
            overrides["sae.target_l0_rate"] = args.rate
        if args.gain is not None:
            overrides["sae.target_l0_gain"] = args.gain
        if args.steps:
            overrides["train.steps"] = args.steps
        cfg = experiment.apply_overrides(base, overrides)
        s = cfg.sae
        tag = f"target={target:g}_theta={s.threshold_param}_rate={s.target_l0_rate:g}_gain={s.target_l0_gain:g}"
        report = train_run(cfg, os.path.join(args.out, "runs", f"{tag}_steps={cfg.train.steps}"))
        l0 = report["eval"]["l0"]
        error = l0 / target - 1
        results.append(
            dict(
                target=target,
                l0=l0,
                relative_error=error,
                met=abs(error) <= args.tolerance,
                fvu=report["eval"]["fvu"],
                tokens=report["tokens"],
                seconds=report["seconds"],
            )
        )
        print(
            f"target {target:g}: held-out L0 {l0:.1f} ({100 * error:+.1f}%)  FVU {report['eval']['fvu']:.4f}",
            flush=True,
        )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    met = sum(r["met"] for r in results)
    print(f"{met}/{len(results)} targets met within ±{100 * args.tolerance:g}%")
    with open(os.path.join(args.out, "l0_control.json"), "w") as f:
        json.dump({"command": command, "tolerance": args.tolerance, "results": results}, f, indent=2)
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()

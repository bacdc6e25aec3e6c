"""The end-of-run report: held-out metrics, recovered features, where things are."""

from __future__ import annotations

import io
import json

import ml_collections
import numpy as np

from jumprelu import config as config_lib
from jumprelu import data as data_lib
from jumprelu import fs
from jumprelu.core import init as init_lib
from jumprelu.core import kinds
from jumprelu.core.folded import fold
from jumprelu.data import synthetic
from jumprelu.evaluate.metrics import MIN_ROWS, evaluate_rows
from jumprelu.evaluate.plots import plot_training_curves
from jumprelu.train import distributed, metrics_log
from jumprelu.train.checkpoint import MEMBER_FILE, checkpoint_dir, member_dir
from jumprelu.train.metrics_log import read_metrics
from jumprelu.train.state import member_of


def final_report(cfg, workdir: str, state, stream, start_step: int) -> dict:
    """Evaluates the trained SAE (or each of K stacked ones) on the held-out rows; writes report.json."""
    params, scale, stats, skipped = distributed.to_host((state.params, state.scale, state.stats, state.skipped))
    skipped = np.atleast_1d(skipped)  # one count per stacked SAE
    steps = int(state.step)
    # the rows the target-L0 controller read are left out: λ was set from their L0
    eval_rows = init_lib.report_rows(stream.eval_set(), config_lib.controller_rows(cfg))
    lams = tuple(cfg.stack.sparsity_coefficients)
    if not lams:
        return _sae_report(cfg, workdir, workdir, params, scale, stats, eval_rows, steps, start_step, int(skipped[0]))
    members = []
    for i, lam in enumerate(lams):
        member_cfg = member_config(cfg, i)
        mdir = member_dir(workdir, i)
        r = _sae_report(
            member_cfg,
            workdir,
            mdir,
            member_of(params, i),
            scale,
            member_of(stats, i),
            eval_rows,
            steps,
            start_step,
            int(skipped[i]),
        )
        if distributed.is_lead():
            write_member_files(cfg, workdir, i)
        members.append(dict(r, member=i, sparsity_coefficient=float(lam)))
    out = {k: members[0][k] for k in ("steps", "tokens", "resumed_from_step", "scale", "checkpoint")}
    out.update(workdir=fs.abspath(workdir), members=members)
    if distributed.is_lead():
        fs.write_text_atomically(fs.join(workdir, "report.json"), metrics_log.dumps(out, indent=2))
    return out


def member_config(cfg, i: int) -> ml_collections.ConfigDict:
    """Stacked member i's own config: one SAE at its λ."""
    member_cfg = ml_collections.ConfigDict(cfg.to_dict())
    member_cfg.sae.sparsity_coefficient = float(cfg.stack.sparsity_coefficients[i])
    member_cfg.stack.sparsity_coefficients = ()
    return member_cfg


def write_member_files(cfg, workdir: str, i: int) -> None:
    """WORKDIR/sae-i's config.json and member.json, which make the folder loadable
    (`jumprelu.load("WORKDIR/sae-i")`): written when training starts, so a member of a run that was
    stopped, preempted or diverged loads from its last checkpoint like the run does."""
    mdir = member_dir(workdir, i)
    fs.write_text_atomically(fs.join(mdir, "config.json"), json.dumps(member_config(cfg, i).to_dict(), indent=2))
    fs.write_text_atomically(fs.join(mdir, MEMBER_FILE), json.dumps({"member": i, "workdir": ".."}))


def _sae_report(cfg, workdir, report_dir, params, scale, stats, eval_rows, steps, start_step, skipped) -> dict:
    kind = kinds.from_config(cfg.sae, cfg.data.d_model)
    folded = fold(kind.export(params, stats), scale, cfg.sae.pre_encoder_bias)
    folded = {k: np.asarray(v) for k, v in folded.items()}
    # one row left beside the controller's has no spread to measure FVU against (see data.eval_rows)
    metrics = evaluate_rows(folded, eval_rows) if len(eval_rows) >= MIN_ROWS else {}
    metrics.pop("firing_frequency", None)
    out = {
        "steps": steps,
        "tokens": steps * cfg.train.batch_size,
        "resumed_from_step": start_step,
        "scale": float(scale),
        "skipped_batches": skipped,  # dropped as non-finite (train.skip_nonfinite_batches): not trained on
        "eval": metrics,
        "checkpoint": fs.abspath(fs.join(checkpoint_dir(workdir), str(steps))),  # from any directory
        "workdir": fs.abspath(report_dir),
    }
    truth = data_lib.ground_truth(cfg.data)
    if truth is not None:
        out["features_recovered"] = synthetic.features_recovered(params["W_dec"], truth)
        out["true_features"] = int(truth.shape[0])
    if not distributed.is_lead():  # every process evaluates; only the lead writes
        return out
    records = read_metrics(fs.join(report_dir, "metrics.jsonl"))
    if records:
        curves = fs.abspath(fs.join(report_dir, "training_curves.png"))
        title = f"{cfg.data.source}  width {cfg.sae.width}  λ {cfg.sae.sparsity_coefficient:g}"
        buf = io.BytesIO()
        plot_training_curves(records, buf, title=title)
        fs.write_bytes_atomically(curves, buf.getvalue())
        out["curves"] = curves
    fs.write_text_atomically(fs.join(report_dir, "report.json"), metrics_log.dumps(out, indent=2))
    return out


def format_report(r: dict) -> str:
    if "members" in r:
        return _format_stacked(r)
    lines = [f"jumprelu: {r['steps']:,} steps, {r['tokens']:,} tokens (input scale C = {r['scale']:.4g})"]
    lines += _skipped_line(r.get("skipped_batches", 0), r["steps"])
    e = r.get("eval")
    if e:
        lines.append(
            f"  held-out ({e['tokens']:,} tokens): L0 {e['l0']:.2f}   FVU {e['fvu']:.4f}   "
            f"dead latents {100 * e['dead_fraction']:.1f}%   firing on >10% of tokens {100 * e['dense_fraction']:.1f}%"
        )
    elif "eval" in r:
        why = "data.eval_rows is 0, or fewer than 2 are left beside the L0 controller's"
        lines.append(f"  held-out: no rows left to report on ({why})")
    if "features_recovered" in r:
        n = r["true_features"]
        k = round(r["features_recovered"] * n)
        lines.append(
            f"  true features recovered (decoder row at cosine >= 0.9): {k}/{n} = {100 * r['features_recovered']:.1f}%"
        )
    lines.append(f"  checkpoint: {r['checkpoint']}")
    lines.append(f"  load it:    import jumprelu; sae = jumprelu.load({r['workdir']!r})")
    if "curves" in r:
        lines.append(f"  curves:     {r['curves']}")
    lines.append(f"  report:     {fs.join(r['workdir'], 'report.json')}")
    return "\n".join(lines)


def _skipped_line(skipped: int, steps: int, member: str = "") -> list[str]:
    """The warning line of a run that dropped non-finite batches (none when it dropped none)."""
    if not skipped:
        return []
    return [
        f"  WARNING{member}: {skipped:,} of {steps:,} batches were skipped as non-finite (train.skip_nonfinite_batches)"
        " and not trained on"
    ]


def _format_stacked(r: dict) -> str:
    lines = [
        f"jumprelu: {len(r['members'])} stacked SAEs, {r['steps']:,} steps, {r['tokens']:,} tokens each "
        f"(input scale C = {r['scale']:.4g})",
        f"  {'member':>6}  {'λ':>10}  {'L0':>8}  {'FVU':>8}  {'dead':>6}  load path",
    ]
    for m in r["members"]:
        e = m.get("eval") or {}
        lines.append(
            f"  {m['member']:>6}  {m['sparsity_coefficient']:>10.4g}  {e.get('l0', float('nan')):>8.2f}  "
            f"{e.get('fvu', float('nan')):>8.4f}  {100 * e.get('dead_fraction', float('nan')):>5.1f}%  {m['workdir']}"
        )
    for m in r["members"]:
        lines += _skipped_line(m.get("skipped_batches", 0), r["steps"], f" (member {m['member']})")
    lines.append(f"  checkpoint: {r['checkpoint']}")
    lines.append(f"  load one:   import jumprelu; sae = jumprelu.load({r['members'][0]['workdir']!r})")
    lines.append(f"  report:     {fs.join(r['workdir'], 'report.json')}")
    return "\n".join(lines)

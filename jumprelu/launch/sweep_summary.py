"""What a sweep's runs have done: each run's status from its workdir (new, interrupted, finished,
or another config's run under the same name), and the summary table of their held-out metrics,
ROOT/sweep_summary.csv (with the rows of other sweeps sharing ROOT) and its L0-FVU plot.
"""

from __future__ import annotations

import csv
import io
import json
import sys

from jumprelu import fs
from jumprelu.config_shape import flat_fields
from jumprelu.launch import experiment as experiments

SUMMARY_CSV, SUMMARY_PNG = "sweep_summary.csv", "sweep_summary.png"


def status(workdir: str, config=None) -> str:
    """new, interrupted (resumes from its last checkpoint), finished, or "other config": the
    workdir holds a run whose config.json is not `config` (the same run name from another
    experiment argument, e.g. `l0=20` then `l0=50` under one --root), which must be neither
    reported as this run nor resumed as it."""
    started = fs.exists(fs.join(workdir, "checkpoints"))
    if (
        config is not None
        and (started or fs.exists(fs.join(workdir, "report.json")))
        and config_changes(workdir, config)
    ):
        return "other config"
    if fs.exists(fs.join(workdir, "report.json")):
        # a damaged report (a hand edit, a copy cut short) is rewritten by training again: the run
        # resumes at its last step and writes the report
        return "finished" if read_report(workdir) is not None else "bad report"
    return "interrupted" if started else "new"


def read_report(workdir: str) -> dict | None:
    """The run's report.json, or None where it is missing or not a report (unreadable, not JSON,
    without its tokens): the summary then says so instead of failing on it."""
    try:
        report = json.loads(fs.read_text(fs.join(workdir, "report.json")))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    members = report.get("members") if isinstance(report, dict) else None
    entries = members if isinstance(members, list) else [report]
    ok = all(isinstance(m, dict) and isinstance(m.get("tokens"), int) for m in entries)
    ok = ok and all(isinstance(m.get("eval") or {}, dict) for m in entries)
    return report if ok and (members is None or all(isinstance(m.get("member"), int) for m in members)) else None


def config_changes(workdir: str, config) -> list[str]:
    """'field: saved -> wanted' for each field where the run's saved config.json differs from
    `config`; fields the config leaves None (d_model, an estimated scale) are the run's to fill in."""
    file = fs.join(workdir, "config.json")
    if not fs.exists(file):
        return []
    try:
        saved = flat_fields(json.loads(fs.read_text(file)))
    except ValueError:
        return [f"{file}: not readable JSON"]
    wanted = flat_fields(json.loads(json.dumps(config.to_dict())))
    keys = sorted(k for k in set(saved) | set(wanted) if wanted.get(k) is not None and saved.get(k) != wanted.get(k))
    return [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys]


def summary_rows(runs: list[experiments.Run], root: str) -> list[dict]:
    """One row per trained SAE (a stacked run gives one per member) from the runs' report.json."""
    from jumprelu.train.checkpoint import member_item  # late: the dry run should not import orbax

    rows = []
    for run in runs:
        workdir = run.workdir(root)
        base = {"run": run.name, "kind": run.config.sae.kind, "status": status(workdir, run.config)}
        if base["status"] != "finished":
            rows.append(base)
            continue
        report = read_report(workdir)
        stacked = "members" in report
        for member in report["members"] if stacked else [report]:
            e = member.get("eval") or {}
            row = dict(base, tokens=member["tokens"])
            if stacked:
                name = f"{run.name}/{member_item(member['member'])}"
                row.update(run=name, sparsity_coefficient=member["sparsity_coefficient"])
            row.update({k: e[k] for k in ("l0", "fvu", "dead_fraction", "dense_fraction") if _number(e.get(k))})
            rows.append(row)
    return rows


def _with_other_sweeps(rows: list[dict], root: str) -> list[dict]:
    """The rows other sweeps (another experiment or argument) wrote to ROOT's summary, then this
    sweep's, which replace its own earlier ones: ROOT's summary is of every run in it."""
    file = fs.join(root, SUMMARY_CSV)
    if not fs.exists(file):
        return rows
    mine = {r["run"].split("/")[0] for r in rows}  # a stacked member's row is RUN/sae-i
    try:
        earlier = list(csv.DictReader(io.StringIO(fs.read_text(file))))
    except (OSError, ValueError, csv.Error) as e:  # derived from the runs: rebuilt, not failed on
        print(f"jumprelu sweep: {file} is not readable ({e}); written anew from this sweep's runs", file=sys.stderr)
        return rows
    kept = []
    for r in earlier:
        r = {
            k: experiments.parse_value(v) for k, v in r.items() if isinstance(k, str) and k and isinstance(v, str) and v
        }
        if all(isinstance(r.get(k), str) for k in ("run", "kind", "status")) and r["run"].split("/")[0] not in mine:
            kept.append({k: v for k, v in r.items() if k not in METRICS or _number(v)})  # a damaged cell is dropped
    return kept + rows


METRICS = ("tokens", "l0", "fvu", "dead_fraction", "dense_fraction")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_summary(rows: list[dict], root: str) -> str:
    rows = _with_other_sweeps(rows, root)
    fields = ["run", "kind", "status", "tokens", "l0", "fvu", "dead_fraction", "dense_fraction"]
    fields += sorted({k for r in rows for k in r} - set(fields))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(rows)
    fs.makedirs(root)
    fs.write_text_atomically(fs.join(root, SUMMARY_CSV), buf.getvalue())
    points = [{"kind": r["kind"], "l0": r["l0"], "fvu": r["fvu"]} for r in rows if r.get("l0", 0) > 0 and "fvu" in r]
    if len(points) >= 2:
        from jumprelu.evaluate.plots import plot_pareto

        png = io.BytesIO()
        plot_pareto(points, png, title=root)
        fs.write_bytes_atomically(fs.join(root, SUMMARY_PNG), png.getvalue())
    elif fs.exists(fs.join(root, SUMMARY_PNG)):  # not left to show points the csv no longer has
        fs.remove(fs.join(root, SUMMARY_PNG))
    lines = [f"{'run':<60} {'status':<11} {'L0':>8} {'FVU':>8} {'dead':>6}"]
    for r in rows:
        l0 = f"{r['l0']:8.2f}" if "l0" in r else f"{'':8}"
        fvu = f"{r['fvu']:8.4f}" if "fvu" in r else f"{'':8}"
        dead = f"{100 * r['dead_fraction']:5.1f}%" if "dead_fraction" in r else ""
        lines.append(f"{r['run']:<60} {r['status']:<11} {l0} {fvu} {dead}")
    return "\n".join(lines)

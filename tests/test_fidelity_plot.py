"""benchmarks/fidelity_plot.py: the newest row of each trainer, target and budget; bad rows named."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "..", "benchmarks", "fidelity_plot.py")
SPEC = importlib.util.spec_from_file_location("fidelity_plot", SCRIPT)
fidelity_plot = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(fidelity_plot)


def _row(trainer, target, tokens, fvu):
    return dict(trainer=trainer, target=target, tokens=tokens, l0=target, fvu=fvu, dead_fraction=0, dense_fraction=0)


def test_the_last_row_of_each_trainer_target_and_budget_is_kept(tmp_path):
    rows = [
        _row("jumprelu", 50, 2_000_000, 0.20),  # an older recipe
        _row("topk", 50, 2_000_000, 0.18),
        _row("jumprelu", 50, 8_000_000, 0.10),  # another budget
        _row("jumprelu", 20, 2_000_000, 0.25),
        _row("jumprelu", 50, 2_000_000, 0.15),  # today's recipe
        _row("saelens_jumprelu", 50, 2_000_000, 0.17),  # not asked for
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = fidelity_plot.newest_rows(str(path), 2_000_000, ["topk", "jumprelu"])
    assert [(r["trainer"], r["target"], r["fvu"]) for r in got] == [
        ("topk", 50, 0.18),
        ("jumprelu", 20, 0.25),
        ("jumprelu", 50, 0.15),
    ]


def test_plot_and_table_from_the_command_line_and_bad_rows_named(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(_row("jumprelu", 50, 2_000_000, 0.15)) + "\n")
    out = subprocess.run(
        [sys.executable, SCRIPT, str(path), "--out", str(tmp_path / "f.png")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "| jumprelu | 50 | 50.0 | 0.1500 | 0.0% | 0.00% |" in out.stdout and "--override" not in out.stdout
    assert (tmp_path / "f.png").stat().st_size > 0
    tried = dict(_row("topk", 50, 2_000_000, 0.22), override=["sae.dead_window_tokens=50000"])
    path.write_text(json.dumps(_row("topk", 50, 2_000_000, 0.15)) + "\n" + json.dumps(tried) + "\n")
    out = subprocess.run(
        [sys.executable, SCRIPT, str(path), "--out", str(tmp_path / "f.png")], capture_output=True, text=True
    )
    # the newest row is shown, and said to be an experiment on the trainer, not the trainer
    assert "topk at L0 target 50: trained with --override sae.dead_window_tokens=50000" in out.stdout
    path.write_text(json.dumps(_row("jumprelu", 50, 2_000_000, 0.15)) + "\n" + '{"trainer": "topk"}\n')
    with pytest.raises(SystemExit, match=r"results.jsonl:2: not a fidelity result row \(no target, tokens, l0"):
        fidelity_plot.newest_rows(str(path), 2_000_000, ["jumprelu"])

"""FVU interpolated at a requested L0 along a kind's measured curve."""

import math

import pytest

from jumprelu.evaluate import pareto


def test_interpolates_in_log_l0_and_never_extrapolates():
    pts = [(10.0, 0.4), (100.0, 0.2), (40.0, 0.3)]  # unsorted on purpose
    assert pareto.fvu_at_l0(pts, 10.0) == pytest.approx(0.4)
    assert pareto.fvu_at_l0(pts, 20.0) == pytest.approx(0.4 - 0.1 * math.log(2) / math.log(4))
    assert pareto.fvu_at_l0(pts, 63.245553) == pytest.approx(0.25, abs=1e-6)  # geometric midpoint of 40 and 100
    assert pareto.fvu_at_l0(pts, 5.0) is None and pareto.fvu_at_l0(pts, 150.0) is None


def test_table_and_markdown():
    points = [
        {"kind": "topk", "l0": 16.0, "fvu": 0.3},
        {"kind": "topk", "l0": 64.0, "fvu": 0.2},
        {"kind": "relu", "l0": 30.0, "fvu": 0.35},
    ]
    t = pareto.table(points, (20, 50))
    assert t["topk"][20] == pytest.approx(0.3 - 0.1 * math.log(20 / 16) / math.log(4))
    assert t["relu"] == {20: None, 50: None}
    md = pareto.markdown_table(t)
    assert md.splitlines()[0] == "| kind | FVU @ L0=20 | FVU @ L0=50 |" and "| relu | — | — |" in md


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--targets", "20,x"], "--targets must be numbers separated by commas, found '20,x'"),
        (["--width", "64"], "run kind=jumprelu_target_l0=64 with --width 64 --steps None: config field sae.target_l0"),
        (["--steps", "0"], "--steps must be > 0, found 0"),
    ],
)
def test_bad_arguments_stop_before_anything_trains(tmp_path, flags, message):
    """Found by an audit: --targets was read after every run had trained (a traceback, and a
    pareto.json of the previous invocation beside the new CSV), a bad --width failed at the third
    run, and --steps 0 trained the experiment's default budget."""
    import os
    import subprocess
    import sys

    import numpy as np

    root = os.path.join(os.path.dirname(__file__), "..")
    np.save(tmp_path / "acts.npy", np.zeros((100, 8), np.float32))
    cmd = [sys.executable, "benchmarks/pareto.py", "--data", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "o")]
    out = subprocess.run([*cmd, "--kinds", "topk,jumprelu", *flags], cwd=root, capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and not (tmp_path / "o").exists(), out.stderr

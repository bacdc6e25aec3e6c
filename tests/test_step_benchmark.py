"""benchmarks/step.py as a user runs it: the recipe's dense, sparse and BatchTopK-phase steps at a
target L0 all compile, run and report the keys the README's tables are read from."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_step_benchmark_times_the_recipe_dense_sparse_and_in_its_batchtopk_phase():
    cmd = [sys.executable, "benchmarks/step.py", "--d-model", "16", "--width", "256", "--batch", "64"]
    cmd += ["--l0", "8", "--repeats", "2", "--warmup", "1", "--phase"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("dense_ms_per_step", "sparse_ms_per_step", "phase_ms_per_step", "matmul_floor_ms"):
        assert out[key] > 0, key
    assert out["sparse_path_taken"] is True  # the sparse step ran, not its dense fallback
    assert abs(out["l0"] - 8) <= 2  # θ set from the batch's quantile
    assert "width 256 < 4096" in out["recipe_auto_plan"]  # auto's plan for the recipe as run, phase included
    assert out["command"].endswith("--l0 8 --phase")


def test_step_benchmark_refuses_phase_without_a_target_l0():
    cmd = [sys.executable, "benchmarks/step.py", "--width", "256", "--batch", "64", "--phase"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--phase" in proc.stderr.strip().splitlines()[-1]


def _step_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_benchmark", os.path.join(ROOT, "benchmarks", "step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "0"], "--width: expected an integer >= 1, found 0"),
        (["--batch", "-4"], "--batch: expected an integer >= 1, found -4"),
        (["--repeats", "0"], "--repeats: expected an integer >= 1, found 0"),
        (["--l0", "0"], "--l0: expected a target in (0, --width=4096), found 0.0"),
        (["--width", "64", "--l0", "64"], "--l0: expected a target in (0, --width=64), found 64.0"),
        (["--data", "/nonexistent/rows.npy"], "--data /nonexistent/rows.npy: no such file"),
        (["--data", "NOT_NPY"], "not a readable .npy array"),
    ],
)
def test_step_benchmark_refuses_bad_arguments_in_one_line(args, message, tmp_path, monkeypatch):
    """Before anything compiles: a width of 0 was an XLA shape error, an --l0 of 0 timed the dense step
    alone as if no target had been given, a text file as --data was numpy's pickle traceback."""
    bad = tmp_path / "rows.txt"
    bad.write_text("not an array\n")
    args = [str(bad) if a == "NOT_NPY" else a for a in args]
    monkeypatch.setattr(sys, "argv", ["step.py", *args])
    step = _step_module()
    monkeypatch.setattr(step, "_measure", lambda a: pytest.fail("measured despite bad arguments"))
    if args[0] == "--data" and args[1] == str(bad):  # the file exists: refused when it is read
        monkeypatch.setattr(step, "_measure", lambda a: step._batch(a, 16))
    with pytest.raises(SystemExit, match=re.escape(message)):
        step.main()


PEER_PYTHON = os.path.join(ROOT, "benchmarks", "peers", ".venv", "bin", "python")


@pytest.mark.skipif(not os.path.exists(PEER_PYTHON), reason="SAELens's virtualenv (benchmarks/peers/setup.sh)")
def test_side_by_side_with_saelens_runs_both_steps():
    """It imports step.py's helpers: a change of their signatures broke it once without a test noticing."""
    cmd = [sys.executable, "benchmarks/step_vs_saelens.py", "--d-model", "16", "--width", "256", "--batch", "64"]
    cmd += ["--l0", "8", "--rounds", "1", "--steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("saelens_ms_per_step", "ours_dense_ms_per_step", "ours_sparse_ms_per_step"):
        assert out[key] > 0, key

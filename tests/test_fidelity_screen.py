"""The fidelity screen: variants run on the tuning split, only the screen's winner goes to the
reported split, and a deadline keeps what finished. The fidelity runs are a stand-in script that
writes the rows fidelity.py would, from a table keyed by the overrides."""

import importlib.util
import json
import os
import textwrap

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location(
    "fidelity_screen", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fidelity_screen.py")
)
screen = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(screen)

# FVU and L0 (as a multiple of the target) by override; the recipe (no override) is 0.09 at the target
FAKE = textwrap.dedent(
    """
    import argparse, json, os, time
    p = argparse.ArgumentParser()
    p.add_argument("data"); p.add_argument("--out"); p.add_argument("--eval_rows"); p.add_argument("--seed")
    p.add_argument("--tokens", type=int); p.add_argument("--targets", type=int); p.add_argument("--kinds")
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args()
    table = {"train.lr=9": (0.08, 1.0), "train.lr=8": (0.07, 1.5), "train.lr=7": (0.085, 1.0), "slow=1": (0.01, 1.0)}
    fvu, l0 = table.get(" ".join(a.override), (0.09, 1.0))
    if a.override == ["slow=1"]:
        time.sleep(60)
    if a.override == ["fail=1"] or (a.override == [] and os.environ.get("FAKE_RECIPE_FAILS")):
        raise SystemExit("fidelity.py: error: a failure")
    if os.path.exists(os.path.join(a.out, "results.jsonl")):  # finished before: fidelity.py reuses the run
        raise SystemExit(0)
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        for trainer in a.kinds.split(","):
            f.write(json.dumps(dict(trainer=trainer, target=a.targets, tokens=a.tokens, override=a.override,
                    l0=l0 * a.targets, fvu=fvu, dead_fraction=0.0, dense_fraction=0.0, seconds=1.0)) + "\\n")
    """
)


@pytest.fixture
def data(tmp_path, monkeypatch):
    fake = tmp_path / "fake_fidelity.py"
    fake.write_text(FAKE)
    monkeypatch.setattr(screen, "FIDELITY", str(fake))
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
    return str(path)


def run_code(tmp_path, data, *flags) -> int:
    return screen.main([data, "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results.jsonl"),
                        "--eval_rows", "16", "--tokens", "1024", "--jobs", "3", *flags])  # fmt: skip


def run(tmp_path, data, *flags):
    assert run_code(tmp_path, data, *flags) == 0
    return [json.loads(line) for line in open(tmp_path / "results.jsonl")]


def test_only_the_admissible_winner_of_the_tuning_split_reaches_the_reported_split(tmp_path, data, capsys):
    # lr 8 has the lowest FVU but an L0 50% over the target: not admissible; lr 9 beats the recipe
    rows = run(tmp_path, data, "--variant", "train.lr=9", "--variant", "train.lr=8", "--variant", "train.lr=7")
    assert "screen's choice on seed 1: train.lr=9" in capsys.readouterr().out
    got = {(r["seed"], r["target"], r["trainer"], r["variant"]) for r in rows}
    screened = {(1, 100, "jumprelu", v) for v in ("", "train.lr=9", "train.lr=8", "train.lr=7")}
    baselines = {(s, 100, t, "") for s in (0, 1) for t in ("batchtopk", "batchtopk_refit")}
    needing_no_choice = {(0, 100, "jumprelu", "")} | {(1, t, "jumprelu", "") for t in (20, 50)}
    winner = {(0, t, "jumprelu", "train.lr=9") for t in (100, 20, 50)}
    winner |= {(1, t, "jumprelu", "train.lr=9") for t in (20, 50)}
    assert got == screened | baselines | needing_no_choice | winner
    # every run read its seed's one split through links, with fidelity.py's own split record
    split = json.load(open(tmp_path / "work" / "split_0" / "split.json"))
    assert split["seed"] == 0 and split["eval_rows"] == 16
    link = tmp_path / "work" / "s0_t100_n1024_jumprelu_train.lr-9" / "store"
    assert os.path.islink(link) and os.readlink(link) == str(tmp_path / "work" / "split_0" / "store")


def test_no_variant_goes_on_when_none_beats_the_recipe(tmp_path, data, capsys):
    rows = run(tmp_path, data, "--variant", "worse=1", "--other_targets", "20")  # 0.09 ties the recipe: not better
    assert "the recipe (no variant beat it)" in capsys.readouterr().out
    assert {r["variant"] for r in rows if r["seed"] == 0} == {""}


def test_a_relative_work_folder_a_rerun_and_another_budget(tmp_path, data, monkeypatch, capsys):
    """Links hold from the runs' own folders; a rerun adds no row twice; another --tokens trains anew."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results.jsonl"
    flags = [data, "--work", "work", "--results", str(results), "--eval_rows", "16", "--other_targets", ""]
    assert screen.main([*flags, "--tokens", "1024", "--variant", "train.lr=9"]) == 0
    first = results.read_text().splitlines()
    assert len(first) == 1 + 2 + 1 + 1 + 2 + 1  # recipe, BatchTopK and refit, lr 9, both on seed 0 and lr 9
    assert screen.main([*flags, "--tokens", "1024", "--variant", "train.lr=9"]) == 0
    assert results.read_text().splitlines() == first
    assert screen.main([*flags, "--tokens", "2048"]) == 0
    assert sorted({json.loads(line)["tokens"] for line in open(results)}) == [1024, 2048]


def test_failed_runs_are_named_and_the_screen_exits_1(tmp_path, data, monkeypatch, capsys):
    assert run_code(tmp_path, data, "--variant", "fail=1", "--other_targets", "") == 1
    out = capsys.readouterr().out
    assert "failed (exit 1): seed 1 target 100 jumprelu fail=1; see " in out
    assert "screen's choice on seed 1: the recipe (no variant beat it)" in out
    monkeypatch.setenv("FAKE_RECIPE_FAILS", "1")
    assert run_code(tmp_path / "b", data, "--variant", "train.lr=9", "--other_targets", "") == 1
    assert "screen's choice on seed 1: none: the recipe's run left no row" in capsys.readouterr().out


def test_the_deadline_stops_runs_and_keeps_what_finished(tmp_path, data, capsys):
    rows = run(tmp_path, data, "--variant", "slow=1", "--other_targets", "", "--jobs", "6", "--deadline", "5")
    out = capsys.readouterr().out
    assert "stopped at the deadline: seed 1 target 100 jumprelu slow=1" in out
    assert "slow=1" not in {r["variant"] for r in rows}
    assert (1, "") in {(r["seed"], r["variant"]) for r in rows if r["trainer"] == "jumprelu"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--report_seed", "1"], "--tune_seed and --report_seed must differ"),
        (["--variant", "train.lr"], "--variant: expected space-separated FIELD=VALUE overrides, found 'train.lr'"),
        (["--other_targets", "20,x"], "--other_targets must be integers"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--variant", "train.lr=9", "--variant", "train.lr=9"], "--variant: each variant once"),
        (["--eval_rows", "-5"], "--eval_rows must be >= 1"),
        (["--tokens", "100"], "--tokens 100 is less than one batch of 1024"),
        (["--other_targets", "20,100"], "--other_targets must be distinct L0s >= 1 other than --target 100"),
    ],
)
def test_bad_arguments_stop_before_any_work(tmp_path, data, flags, message, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, data, *flags)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()

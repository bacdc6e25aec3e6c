"""Experiments, sweep expansion, the local sweep runner and the TPU launcher's dry run."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jumprelu.config import ConfigError, validate
from jumprelu.launch import experiment, sweep_summary, tpu
from jumprelu.train.loop import train

EXPERIMENTS = sorted(
    f[:-3] for f in os.listdir(experiment.EXPERIMENTS_DIR) if f.endswith(".py") and not f.startswith("_")
)


def test_flag_words_take_only_true_or_false():
    """Any other value was a non-empty word, so `stacked=no` switched stacking on."""
    args = experiment.parse_arg("a,b=false,c=true,d=no,e=3")
    assert [experiment.flag(args, k) for k in "abcz"] == [True, False, True, False]
    for key, value in (("d", "no"), ("e", "3")):
        with pytest.raises(ConfigError, match=f"argument {key} is a flag: .* found {key}={value}"):
            experiment.flag(args, key)
    assert experiment.load("quickstart").get_config("stacked=false").stack.sparsity_coefficients == ()


def test_flag_spellings_are_read_alike():
    """`--dry-run` is `--dry_run`, and absl's single-dash `-config=X` is `--config=X` (the experiment
    was then not resolved: an OSError about a file `config_config`); values and `-1` are left alone."""
    from jumprelu.cli.common import underscore_flags

    argv = ["-config=quickstart", "--dry-run", "-config.train.steps=5", "--step", "-1", "-h", "x-y", "--a=b-c"]
    assert underscore_flags(argv) == [
        "--config=quickstart",
        "--dry_run",
        "--config.train.steps=5",
        "--step",
        "-1",
        "-h",
        "x-y",
        "--a=b-c",
    ]


def test_parse_arg():
    assert experiment.parse_arg("jumprelu,layer=20,lam=1e-3,stores=/gcs/b/x") == {
        "jumprelu": True,
        "layer": 20,
        "lam": 1e-3,
        "stores": "/gcs/b/x",
    }
    assert experiment.parse_arg(None) == {}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_loads_and_its_runs_validate(name):
    module = experiment.load(name)
    assert module.__doc__.lstrip().splitlines()[0]  # docstring opens with what it is
    assert "jumprelu " in module.__doc__ and "Hardware" in module.__doc__ and "run time" in module.__doc__
    runs = experiment.expand(module)
    assert len({r.name for r in runs}) == len(runs) >= 1
    for run in runs:
        validate(run.config)


def test_a_config_missing_a_field_or_with_an_unknown_one_is_one_line():
    """Found by an audit: `c.sae.widht = 64` in an experiment file trained the default width (the
    field was added and ignored), and `--config.sae={...}`, which replaces the whole section, was an
    AttributeError traceback at the first field it dropped."""
    from jumprelu.config import base_config

    c = base_config()
    c.sae.widht = 64
    with pytest.raises(ConfigError, match=r"^config field sae.widht is not one the config has"):
        validate(c)
    c = base_config()
    c.sae = {"width": 10}
    with pytest.raises(
        ConfigError, match=r"^config field sae\.\w+ is missing \(an override of a whole section, --config.sae="
    ):
        validate(c)
    c = base_config()
    del c["ckpt"]
    with pytest.raises(ConfigError, match=r"^config section ckpt is missing$"):
        validate(c)
    c = base_config()
    c.data.lm = {"model": "gemma2_2b"}  # the on-the-fly LM's own section is open
    validate(c)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_runlocal_form_trains_a_few_steps(tmp_path, name):
    runs = experiment.expand(experiment.load(name), "runlocal")
    run = runs[-1]  # the last run: for the 9B comparison an attention site with TopK
    k = run.config.sae.k if run.config.sae.kind in ("topk", "batchtopk") else 0  # runlocal keeps k (width 2k)
    assert run.config.train.steps <= 20 and run.config.sae.width <= max(256, 2 * k)
    report = train(run.config, str(tmp_path / "run"))
    assert report["steps"] == run.config.train.steps
    assert "members" in report or report["eval"]["fvu"] > 0


def test_sweep_expansion_counts_names_and_overrides():
    module = experiment.load("gemma2_9b_comparison")
    runs = experiment.expand(module)
    assert len(runs) == 3 * 3 * 3 * 6  # sites × layers × kinds × values
    attn = [r for r in runs if r.overrides["data.source"].endswith("attn_l31") and r.config.sae.kind == "topk"]
    assert [r.config.sae.k for r in attn] == [10, 20, 40, 80, 160, 320]
    assert {r.config.data.d_model for r in attn} == {4096}
    stacked = experiment.expand(module, "stack,layer=20,site=mlp")
    assert [r.config.sae.kind for r in stacked] == ["jumprelu", "gated"] + ["topk"] * 6
    assert len(stacked[0].config.stack.sparsity_coefficients) == 6
    ladder = experiment.expand(experiment.load("gemma_scope_ladder"))
    widths = sorted({r.config.sae.width for r in ladder})
    assert widths == [2**n for n in range(14, 21)]
    budget = {r.config.sae.width: r.config.train.steps * r.config.train.batch_size for r in ladder}
    assert budget[2**14] == 4e9 - 4e9 % 4096 and budget[2**17] == 8e9 - 8e9 % 4096 and budget[2**20] == 16e9


def test_recipe_asks_for_matryoshka_at_its_width():
    c = experiment.load("recipe").get_config("l0=50,width=4096,matryoshka")
    assert c.sae.matryoshka_widths == (512, 1024, 2048, 4096) and c.sae.matryoshka_weights == (1.0, 1.0, 1.0, 9.0)
    assert c.sae.target_l0 == 50.0 and c.sae.batchtopk_fraction > 0  # still the short recipe
    validate(c)
    c.sae.width = 8192  # a later --config.sae.width that the prefixes do not end at
    with pytest.raises(ConfigError, match="sae.matryoshka_widths must be increasing integer prefix sizes ending at"):
        validate(c)


def test_the_long_recipe_is_the_short_one_with_its_lr_and_decay_and_smollm2_pareto_picks_it_from_8m_tokens():
    from jumprelu.recipes import RECIPES

    module = experiment.load("recipe")
    short, long = module.get_config("l0=50"), module.get_config("l0=50,long")
    assert (short.train.lr, short.train.lr_decay_fraction) == (4e-3, 0.2)
    assert (long.train.lr, long.train.lr_decay_fraction) == (5e-3, 0.4)
    long.train.update(lr=4e-3, lr_decay_fraction=0.2)
    assert long.to_dict() == short.to_dict()  # nothing else differs
    assert set(RECIPES["long"]) == set(RECIPES["short"])
    with pytest.raises(ConfigError, match="recipe argument names recipes paper and long; expected at most one"):
        module.get_config("l0=50,paper,long")
    pareto = experiment.load("smollm2_pareto")
    for tokens, lr in ((2_000_000, 4e-3), (7_999_999, 4e-3), (8_000_000, 5e-3), (32_000_000, 5e-3)):
        c = pareto.get_config(f"jumprelu,target_l0=20,tokens={tokens}")
        assert c.train.lr == lr and c.sae.target_l0 == 20.0, tokens
    assert pareto.get_config("topk,tokens=8000000").train.lr == 3e-3  # the baselines keep theirs


def test_recipe_runlocal_shrinks_the_run_and_its_matryoshka_prefixes():
    module = experiment.load("recipe")
    c = module.get_config("l0=50,runlocal")  # `jumprelu train --config recipe:l0=50,runlocal` reads this
    assert (c.sae.width, c.train.steps, c.data.source) == (256, 20, "synthetic") and c.sae.target_l0 == 50.0
    m = module.get_config("l0=50,width=4096,matryoshka,runlocal")
    assert m.sae.matryoshka_widths == (32, 64, 128, 256)
    validate(m)
    (run,) = experiment.expand(module, "l0=50,matryoshka,runlocal")  # the sweep's path: shrunk again
    assert run.config.sae.matryoshka_widths == (32, 64, 128, 256) and run.config.train.steps == 20
    validate(run.config)


@pytest.mark.parametrize(
    "name, arg, word",
    [
        ("recipe", "target_l0=50", "target_l0"),  # recipe's word is l0: a silent untargeted run before
        ("recipe", "l0=50,matryoska", "matryoska"),
        ("quickstart", "runlokal", "runlokal"),
        ("smollm2_pareto", "jumprelu,l0=20", "l0"),
        ("harvest/gemma2", "layr=9", "layr"),  # would have harvested layer 20
        ("harvest/gemma3", "model=gemma3_1b_pt,sites=resid,lyers=3", "lyers"),
        ("onthefly", "tiny=/w,site=resid,layr=1", "layr"),
        ("gemma2_9b_comparison", "stores=/x,stacked", "stacked"),
    ],
)
def test_an_experiment_argument_it_does_not_read_is_refused(name, arg, word):
    module = experiment.load(name)
    with pytest.raises(ConfigError, match=f"{name} argument '{word}' is not one it reads; expected one of .*runlocal"):
        experiment.expand(module, arg)


def test_experiment_arguments_they_read_still_work():
    assert experiment.load("recipe").get_config("l0=20,runlocal").sae.target_l0 == 20.0
    assert experiment.load("harvest/gemma3").get_config("model=gemma3_1b_it,layer=13,chat_template=True").layer == 13
    assert experiment.load("onthefly").get_config("tiny=/w,site=resid,layer=1,runlocal").data.lm.layer == 1
    assert len(experiment.expand(experiment.load("quickstart"), "stacked,runlocal")) == 1
    # an audit: onthefly's bad value was called "harvest/gemma2 argument" (the config it reuses)
    with pytest.raises(ConfigError, match=r"^onthefly argument layer must be a number \(layer=N\), found 'abc'$"):
        experiment.load("onthefly").get_config("layer=abc")


def test_unknown_override_field_is_named():
    base = experiment.load("quickstart").get_config()
    with pytest.raises(ConfigError, match="sae.widht"):
        experiment.apply_overrides(base, {"sae.widht": 3})


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_experiment_number_is_one_line(value):
    with pytest.raises(ConfigError, match=r"^recipe argument width must be a finite number, found (inf|nan)$"):
        experiment.number({"width": value}, "width", 4096, name="recipe", cast=int)


def test_an_override_of_the_wrong_type_from_get_sweep_is_a_config_error():
    base = experiment.load("quickstart").get_config()
    with pytest.raises(ConfigError, match=r"^override 'train.steps': .*steps"):
        experiment.apply_overrides(base, {"train.steps": "100"})


def test_ctrl_c_in_tpu_watch_is_one_line(tmp_path, monkeypatch, capsys):
    from jumprelu.cli import tpu as tpu_cli

    def interrupt(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(tpu, "main", interrupt)
    assert tpu_cli.run(["watch", "sae-pod"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "jumprelu tpu: stopped (the slice and its runs are not touched)"
    ]


def _sweep(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jumprelu", "sweep", *args], cwd=cwd, capture_output=True, text=True)


def test_local_sweep_runs_skips_finished_and_summarises(tmp_path):
    root = str(tmp_path / "sweep")
    out = _sweep("quickstart:runlocal", "--dry-run", "--root", root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("new ") == 4 and "sae.sparsity_coefficient=0.003" in out.stdout
    out = _sweep("quickstart:runlocal", "--local", "--root", root, "--parallel", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done ") == 4
    names = sorted(os.listdir(root))
    assert len([n for n in names if n.startswith("sparsity_coefficient=")]) == 4
    assert "sweep_summary.csv" in names and "sweep_summary.png" in names
    os.remove(os.path.join(root, "sparsity_coefficient=0.1", "report.json"))  # as if it was interrupted
    out = _sweep("quickstart:runlocal", "--local", "--root", root)
    assert out.stdout.count("skip ") == 3 and out.stdout.count("done ") == 1, out.stdout
    with open(os.path.join(root, "sparsity_coefficient=0.1", "report.json")) as f:
        assert json.load(f)["resumed_from_step"] == 20  # finished run resumed at its last checkpoint
    # Found by an audit: a run of the same name from another config (`recipe:l0=20` then `l0=50` under
    # one --root) was skipped as finished and summarised as this one's, or resumed with the new config
    saved = os.path.join(root, "sparsity_coefficient=0.03", "config.json")
    with open(saved) as f:
        other = json.load(f)
    other["train"]["lr"] = 0.5
    with open(saved, "w") as f:
        json.dump(other, f)
    out = _sweep("quickstart:runlocal", "--dry_run", "--root", root)
    assert out.stdout.count("other config") == 1 and out.stdout.count("finished") == 3, out.stdout
    out = _sweep("quickstart:runlocal", "--local", "--root", root)
    assert out.returncode == 1 and out.stdout.count("skip ") == 3, (out.stdout, out.stderr)
    assert "holds a run of another config (train.lr: 0.5 -> 0.003); give this sweep another --root" in out.stdout
    with open(os.path.join(root, "sweep_summary.csv")) as f:
        row = [r for r in csv.DictReader(f) if r["run"] == "sparsity_coefficient=0.03"][0]
    assert row["status"] == "other config" and not row.get("fvu")


def test_smollm2_pareto_refuses_two_kinds_and_a_sweep_target():
    """Found by an audit: `relu,gated` swept ReLU alone, and a sweep's `target_l0=50` was dropped."""
    module = experiment.load("smollm2_pareto")
    with pytest.raises(ConfigError, match="names kinds relu, gated; expected at most one"):
        experiment.expand(module, "relu,gated")
    with pytest.raises(ConfigError, match="target_l0 is the single run's, not the sweep's"):
        experiment.expand(module, "jumprelu,target_l0=50")
    assert module.get_config("jumprelu,target_l0=50").sae.target_l0 == 50.0
    with pytest.raises(ConfigError, match="argument tokens must be at least one batch of 1024, found 100"):
        module.get_config("tokens=100")  # named train.steps, which the user did not set


def test_a_harvest_experiment_given_to_train_or_sweep_is_one_line(tmp_path):
    """Found by an audit: `train --config harvest/gemma2` and `sweep harvest/gemma2` were tracebacks."""
    with pytest.raises(ConfigError, match="gemma2.py: not a training experiment .*jumprelu harvest --config"):
        experiment.expand(experiment.load("harvest/gemma2"))
    cmd = [sys.executable, "-m", "jumprelu", "train", "--config", "harvest/gemma2", "--workdir", str(tmp_path / "w")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--config " in out.stderr and "harvest/gemma2.py: not a training experiment" in out.stderr  # names it
    assert not (tmp_path / "w").exists()


_BASE = "from jumprelu.experiments.quickstart import get_config\n"
_BAD_SWEEPS = [
    ("syntax.py", "def get_config(arg=None:\n    pass\n", r"experiment .*syntax.py: SyntaxError: invalid syntax"),
    ("acts.npy", None, r"experiment .*acts.npy: SyntaxError: source code string cannot contain null bytes"),
    ("notes.txt", "hello\n", r"experiment .*notes.txt: NameError: name 'hello' is not defined"),
    ("grid.py", _BASE + "def get_sweep(arg=None):\n    return {'sae.width': [64, 128]}\n",
     r"grid.py: get_sweep must return a list of override dicts .*, found dict"),
    ("none.py", _BASE + "def get_sweep(arg=None):\n    return []\n", r"none.py: get_sweep returned no runs"),
    ("typo.py", _BASE + "def get_sweeps(arg=None):\n    return [{'sae.width': 64}]\n",
     r"typo.py has get_sweeps\(\) but no get_sweep\(arg\)"),
    ("raises.py", _BASE + "def get_sweep(arg=None):\n    return [{'sae.width': w} for w in WIDTHS]\n",
     r"raises.py: get_sweep: NameError: name 'WIDTHS' is not defined"),
]  # fmt: skip


@pytest.mark.parametrize("name, text, message", _BAD_SWEEPS, ids=[b[0] for b in _BAD_SWEEPS])
def test_a_broken_experiment_file_is_one_line_in_sweep(tmp_path, name, text, message):
    """Found by an audit: `jumprelu sweep FILE --dry_run` on a file with a syntax error, a .npy or
    .txt given by mistake, or a get_sweep returning a grid dict was a traceback (exit 1), where
    `train --config` gives one line; a misspelt get_sweep silently swept the base config once, and
    an empty list "swept" 0 runs with exit 0."""
    path = tmp_path / name
    if text is None:
        np.save(path, np.zeros(3))
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        experiment.expand(experiment.load(str(path)))
    cli = _sweep(str(path), "--dry_run", "--root", str(tmp_path / "runs"))
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert re.search(message, cli.stderr), cli.stderr


def test_a_one_run_experiment_with_helpers_and_a_generator_sweep_still_expand(tmp_path):
    """The review of the check above: a helper named like get_sweep (get_steps, get_site) was
    taken for a misspelt get_sweep, and a get_sweep yielding its dicts was refused."""
    helpers = tmp_path / "helpers.py"
    helpers.write_text(_BASE + "def get_steps(arg=None):\n    return 20\ndef get_site(arg=None):\n    return 1\n")
    assert [r.name for r in experiment.expand(experiment.load(str(helpers)))] == ["run"]
    gen = tmp_path / "gen.py"
    gen.write_text(_BASE + "def get_sweep(arg=None):\n    return ({'sae.width': w} for w in (64, 128))\n")
    assert [r.name for r in experiment.expand(experiment.load(str(gen)))] == ["width=64", "width=128"]


def test_config_given_twice_is_one_line(tmp_path):
    """Found by an audit: `--config quickstart --config recipe:l0=20` trained the last one silently
    (width 16,384 for 100,000 steps), and with an override added absl said "defined twice"."""
    for extra in ([], ["--config.train.steps=5"]):
        cmd = [sys.executable, "-m", "jumprelu", "train", "--config", "quickstart", "--config", "recipe:l0=20", *extra]
        cli = subprocess.run([*cmd, "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
        assert re.search(r"--config is given 2 times \(.*quickstart.py, .*recipe.py:l0=20\); give one", cli.stderr)
    assert not (tmp_path / "w").exists()


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """Found by an audit: Ctrl-C while the modules imported was a traceback, and while XLA compiled
    the step the interpreter's teardown segfaulted (exit 139)."""
    for delay in (0.5, 1.5, 2.5, 3.0):
        cmd = [sys.executable, "-m", "jumprelu", "train", "--config", "recipe:l0=20,runlocal"]
        child = subprocess.Popen([*cmd, "--workdir", str(tmp_path / f"w{delay}")], stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
        assert "Fatal Python error" not in err and child.returncode != -11, (delay, err)  # the segfault
        finished = (tmp_path / f"w{delay}" / "report.json").exists()
        if delay > 1 and finished and child.returncode in (0, -signal.SIGINT):
            # the short run had finished (on a fast machine in ~2.5 s): the signal came after it, or
            # during the interpreter's exit, where Python has put SIGINT back to its default (-2)
            continue
        # (a SIGINT that lands in one of jax's gc callbacks, where Python drops the exception, as CI
        # once saw at 0.5 s, stops the run at the loop's entry: the test below)
        if delay > 1 and child.returncode == 75:  # on a fast machine the loop had started: it saved its step
            assert "run the same command again to resume" in err.strip().splitlines()[-1], (delay, err)
            continue
        assert child.returncode == 130 and "Traceback" not in err, (delay, err)
        assert err.strip().splitlines()[-1].startswith("jumprelu: interrupted; run the same command again")


def test_ctrl_c_that_python_drops_in_a_gc_callback_still_stops_the_run(tmp_path):
    """Python drops a KeyboardInterrupt raised inside a gc callback ("Exception ignored in"), as
    jax's `_xla_gc_callback` is during start-up: `train` then trained on to the end (exit 0).
    The Ctrl-C is remembered and the loop's entry stops on it: one line, exit 130."""
    script = f"""
import gc, os, signal, sys
from jumprelu import cli
def press_ctrl_c(phase, info):  # once jax has imported, as a real Ctrl-C then: Python drops what this raises
    if phase == "start" and "jax" in sys.modules:
        gc.callbacks.remove(press_ctrl_c)
        os.kill(os.getpid(), signal.SIGINT)
gc.callbacks.append(press_ctrl_c)
sys.exit(cli.main(["train", "--config", "quickstart", "--workdir", {str(tmp_path / "w")!r},
                   "--config.train.steps=200"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and "Traceback" not in done.stderr, (done.returncode, done.stderr)
    # train's own line, from the loop's entry (a Ctrl-C that was not dropped, during the imports,
    # would end with "nothing had started"); Python's report of the dropped exception is left out
    last = done.stderr.strip().splitlines()[-1]
    assert last == "jumprelu: interrupted; run the same command again: it resumes from its last checkpoint", last


def test_runlocal_keeps_each_runs_k():
    """Found by an audit: runlocal capped k at 16 after the sweep's overrides, so the runs named
    k=32 ... k=320 all trained k=16; the width grows instead."""
    for name, arg in (("smollm2_pareto", "topk,runlocal"), ("gemma2_9b_comparison", "runlocal,layer=20,site=attn")):
        runs = [r for r in experiment.expand(experiment.load(name), arg) if r.config.sae.kind == "topk"]
        assert [r.config.sae.k for r in runs] == [r.overrides["sae.k"] for r in runs] and len(runs) > 3
        assert all(r.config.sae.width >= max(256, 2 * r.config.sae.k) for r in runs)


def test_sigterm_to_the_sweep_driver_stops_its_run_with_a_checkpoint(tmp_path):
    """A scheduler that signals only the driver (a container's PID 1, `timeout`) must reach the run:
    it saves its step and exits 75, no further run starts, and no run is left running."""
    root = str(tmp_path / "sweep")
    cmd = [sys.executable, "-m", "jumprelu", "sweep", "quickstart", "--local", "--root", root]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(root, "sparsity_coefficient=0.003", "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and driver.poll() is None:
        assert time.time() < deadline, "the first run never logged"
        time.sleep(0.5)
    driver.send_signal(signal.SIGTERM)
    out, err = driver.communicate(timeout=240)
    assert driver.returncode == 75, (out, err)
    assert "stopped sparsity_coefficient=0.003 (exit 75)" in out
    assert out.count("start ") == 1, out
    last = err.strip().splitlines()[-1]
    assert last.startswith("jumprelu sweep: stopped by a signal (1 runs saved their step, 3 not started)"), err
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert root not in ps  # the run was not orphaned
    checkpoints = os.listdir(os.path.join(root, "sparsity_coefficient=0.003", "checkpoints"))
    assert any(name.isdigit() and int(name) > 0 for name in checkpoints), checkpoints


def test_a_damaged_report_or_summary_does_not_stop_the_sweep_summary(tmp_path):
    """Found by an audit: a report.json cut short, `[]`, `{}`, a non-number L0, a folder or non-UTF-8
    bytes, and a damaged sweep_summary.csv, each failed `sweep --summary` (and `--local` at its end)
    with a traceback; the damaged run was also skipped as finished."""
    root = tmp_path / "sweep"
    runs = experiment.expand(experiment.load("quickstart"), "runlocal")
    good = {"tokens": 5120, "eval": {"l0": 3.0, "fvu": 0.5, "dead_fraction": 0.0, "dense_fraction": 0.0}}
    damaged = ['{"tokens": 51', "[]", "{}"]
    for run, text in zip(runs, [json.dumps(good), *damaged], strict=True):
        (root / run.name).mkdir(parents=True)
        (root / run.name / "report.json").write_text(text)
    (root / "sweep_summary.csv").write_bytes(b"run,kind,status,l0\nold,jumprelu,finished,x\n\xff\xfe")
    cli = _sweep("quickstart:runlocal", "--summary", "--root", str(root))
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
    assert "sweep_summary.csv is not readable" in cli.stderr
    with open(root / "sweep_summary.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows[runs[0].name]["status"] == "finished" and float(rows[runs[0].name]["fvu"]) == 0.5
    assert [rows[r.name]["status"] for r in runs[1:]] == ["bad report"] * 3
    for text in ('{"tokens": 5120, "eval": {"l0": "x"}}', b"\xff\xfe"):  # a cell, then the bytes, damaged
        (root / runs[1].name / "report.json").unlink()
        if isinstance(text, bytes):
            (root / runs[1].name / "report.json").write_bytes(text)
        else:
            (root / runs[1].name / "report.json").write_text(text)
        cli = _sweep("quickstart:runlocal", "--summary", "--root", str(root))
        assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
    (root / runs[1].name / "report.json").unlink()
    (root / runs[1].name / "report.json").mkdir()
    cli = _sweep("quickstart:runlocal", "--dry_run", "--root", str(root))
    assert cli.returncode == 0 and cli.stdout.count("bad report") == 3, cli.stdout


def test_a_runs_workdir_as_the_sweep_root_is_refused(tmp_path):
    """An audit: `sweep --summary --root RUN` wrote sweep_summary.csv among a training run's files
    (and `--local` would have made the sweep's workdirs inside it)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sae": {}, "train": {}}))
    for mode in ("--summary", "--local"):
        cli = _sweep("quickstart:runlocal", mode, "--root", str(run))
        assert cli.returncode == 2 and cli.stderr == (
            f"jumprelu: error: --root {run} is a training run's workdir; a sweep's root holds one workdir per "
            "run (give the folder above it, or a new one)\n"
        ), cli.stderr
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json"]
    cli = _sweep("quickstart:runlocal", "--dry_run", "--root", str(tmp_path))  # the folder above it is a root
    assert cli.returncode == 0, cli.stderr


def test_sweeps_sharing_a_root_share_its_summary(tmp_path):
    """A second sweep (another argument) into the same ROOT keeps the first's rows (they were
    overwritten); a sweep's own rows replace its earlier ones; a plot of fewer than 2 points goes."""
    root = str(tmp_path)
    first = [
        {"run": "kind=topk_k=20", "kind": "topk", "status": "finished", "tokens": 100, "l0": 20.0, "fvu": 0.2},
        {"run": "kind=topk_k=50", "kind": "topk", "status": "finished", "tokens": 100, "l0": 50.0, "fvu": 0.15},
    ]
    sweep_summary.write_summary(first, root)
    second = [{"run": "kind=jumprelu_l0=20/sae-0", "kind": "jumprelu", "status": "finished", "l0": 19.5, "fvu": 0.18}]
    table = sweep_summary.write_summary(second, root)
    with open(tmp_path / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["kind=topk_k=20", "kind=topk_k=50", "kind=jumprelu_l0=20/sae-0"]
    assert float(rows[1]["fvu"]) == 0.15 and "kind=topk_k=50" in table
    again = [dict(second[0], fvu=0.17), {"run": "kind=jumprelu_l0=50", "kind": "jumprelu", "status": "running"}]
    sweep_summary.write_summary(again, root)
    with open(tmp_path / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["fvu"]) for r in rows][2:] == [
        ("kind=jumprelu_l0=20/sae-0", "0.17"),
        ("kind=jumprelu_l0=50", ""),
    ]
    assert len(rows) == 4 and (tmp_path / "sweep_summary.png").exists()
    (tmp_path / "sweep_summary.csv").unlink()
    sweep_summary.write_summary(second, root)  # one point: no plot, and not the old one
    assert not (tmp_path / "sweep_summary.png").exists()


def test_stacked_sweep_summarises_each_member(tmp_path):
    root = str(tmp_path / "stacked")
    out = _sweep("quickstart:runlocal,stacked", "--local", "--root", root)
    assert out.returncode == 0, out.stderr
    rows = sweep_summary.summary_rows(experiment.expand(experiment.load("quickstart"), "runlocal,stacked"), root)
    assert [r["sparsity_coefficient"] for r in rows] == [0.003, 0.01, 0.03, 0.1]
    assert all(r["run"].endswith(f"/sae-{i}") for i, r in enumerate(rows))


def _watch_with_fake_gcloud(tmp_path, monkeypatch, script: str, polls: int, spot: bool = False) -> list[str]:
    """Runs `tpu watch` for `polls` polls against a fake gcloud on PATH (bash `script` after it logs
    its arguments); returns the gcloud commands it was given."""
    calls = tmp_path / "calls"
    # what `jumprelu train` accepts passes (were refused: a bool's `false`, dashed names)
    from jumprelu.launch.preflight import check_job

    check_job("quickstart", None, ["--config.train.decay_thresholds=false", "--config.train.lr-warmup-steps=2"])
    from jumprelu.launch import overrides

    c = overrides.apply(experiment.load("quickstart").get_config(None), ["--config.train.decay_thresholds=false",
                                                                      "--config.train.lr-warmup-steps=2"])  # fmt: skip
    assert c.train.decay_thresholds is False and c.train.lr_warmup_steps == 2
    # not $JUMPRELU_EXPERIMENTS_DIR's file: the workers' environment does not have it
    monkeypatch.setenv("JUMPRELU_EXPERIMENTS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="no experiment"):
        check_job("mine", None)
    with pytest.raises(ConfigError, match="a path in the checkout as jumprelu/experiments/quickstart.py; the workers"):
        check_job(str(experiment.EXPERIMENTS_DIR) + "/quickstart.py", None)
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/bash\necho "$*" >> {calls}\n{script}')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        if len(slept) == polls:
            raise KeyboardInterrupt

    monkeypatch.setattr(tpu.time, "sleep", sleep)
    args = ["watch", "sae-pod", "--zone", "z", "--project", "p", "--accelerator", "v5p-16", *(["--spot"] * spot)]
    with pytest.raises(KeyboardInterrupt):
        tpu.main([*args, "--sweep", "quickstart", "--workdir", "gs://b/r", "--poll_s", "1"])
    return calls.read_text().splitlines()


@pytest.mark.parametrize(
    "describe_error, recreated",
    [("ERROR: (gcloud) There was a problem refreshing your current auth tokens", False), ("NOT_FOUND: sae-pod", True)],
)
def test_tpu_watch_recreates_only_a_slice_that_is_gone(tmp_path, monkeypatch, describe_error, recreated):
    """A describe that fails for another reason (an expired token, the network) must not delete a
    healthy slice; a failing gcloud command is retried at the next poll, not a traceback."""
    script = (
        f'if [[ "$*" == *describe* ]]; then echo "{describe_error}" >&2; exit 1; fi\n'
        'if [[ "$*" == *" create "* ]]; then exit 2; fi\n'  # creating fails too (a quota): retried
    )
    made = _watch_with_fake_gcloud(tmp_path, monkeypatch, script, polls=2, spot=True)
    assert sum("describe" in c for c in made) == 2
    assert any(" delete " in c for c in made) == recreated and any(" create " in c for c in made) == recreated


def test_tpu_run_never_starts_a_second_copy_of_a_live_job(tmp_path, monkeypatch):
    """The remote command `run` sends, executed by bash in a fake home: the first starts the job,
    the second finds its lock held and starts nothing; once the job is gone a third starts it again."""
    sent = []
    monkeypatch.setattr(tpu.Gcloud, "run", lambda self, cmd, check=True, capture=False: sent.append(cmd) or "")
    job = tmp_path / "jumprelu" / ".venv" / "bin" / "python"
    job.parent.mkdir(parents=True)
    job.write_text(f"#!/bin/bash\necho $$ >> {tmp_path}/pids\necho started >> {tmp_path}/starts\nexec sleep 60\n")
    job.chmod(0o755)
    g = tpu.Gcloud("sae-pod", "z", "p")
    g.start(None, "quickstart", "gs://b/r", [])
    remote = sent[-1][-1].removeprefix("--command=")
    env = {**os.environ, "HOME": str(tmp_path)}

    def starts():
        return (tmp_path / "starts").read_text().count("started") if (tmp_path / "starts").exists() else 0

    def send():  # each in its own process group, so the job it starts can be killed with it
        before = starts()
        out = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, start_new_session=True)
        for _ in range(200):  # the job has started when it wrote its line (or did not start)
            if "already running" in out.stdout or starts() > before:
                break
            time.sleep(0.05)
        return out

    def kill_jobs():  # with their flock, in the job's process group
        for pid in (tmp_path / "pids").read_text().split():
            try:
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except ProcessLookupError:
                pass

    first = send()
    try:
        second = send()
        assert "already running" in second.stdout and starts() == 1
        assert first.returncode == 0 and second.returncode == 0
    finally:
        kill_jobs()
    for _ in range(200):  # the lock goes with the job
        if subprocess.run(["flock", "-n", str(tmp_path / "jumprelu.lock"), "true"]).returncode == 0:
            break
        time.sleep(0.05)
    third = send()
    try:
        assert "already running" not in third.stdout and starts() == 2
    finally:
        kill_jobs()


@pytest.mark.parametrize("alive", [True, False])
def test_tpu_watch_leaves_a_slice_whose_job_is_running_alone(tmp_path, monkeypatch, alive):
    script = (
        'if [[ "$*" == *describe* ]]; then echo ACTIVE; fi\n'
        f'if [[ "$*" == *"flock -n"* && "$*" != *nohup* ]]; then exit {0 if alive else 1}; fi\n'
    )
    made = _watch_with_fake_gcloud(tmp_path, monkeypatch, script, polls=1)
    assert any("--worker=all" in c and "! flock -n" in c for c in made)  # asked whether the job is alive
    # a live job is neither set up again nor started; a slice without one gets both
    assert any(" scp " in c for c in made) != alive and any("nohup" in c for c in made) != alive


def test_tpu_run_checks_the_experiment_here_and_a_failing_gcloud_is_one_line(tmp_path, monkeypatch, capfd):
    common = ["--zone", "z", "--project", "p", "--workdir", "gs://b/r"]
    (tmp_path / "mine.py").write_text(
        "from jumprelu.config import base_config\nget_config = lambda arg: base_config()\n"
    )
    monkeypatch.chdir(tmp_path)  # experiment paths are the checkout's, whatever the shell's directory
    for job, says in (
        (["--sweep", "nosuch"], "no experiment 'nosuch'"),
        (["--config", "quickstart:bogus"], "quickstart argument 'bogus' is not one it reads"),
        (["--sweep", "quickstart:bogus"], "quickstart argument 'bogus' is not one it reads"),
        (["--config", "quickstart", "--config.train.stepz=3"], "the config has no field train.stepz"),
        (["--config", "quickstart", "--config.data.scale=abc"], "could not convert string to float: 'abc'"),
        (["--config", "quickstart", "--config.train.steps=0"], "config field train.steps must be a positive"),
        (["--sweep", "smollm2_pareto:tokens=100"], "smollm2_pareto argument tokens must be at least one batch of 1024"),
        (["--sweep", "gemma2_9b_comparison:site=resd"], "site must be one of resid, mlp, attn, found 'resd'"),
        (["--config", "gemma_scope_ladder:width=abc"], "gemma_scope_ladder argument width must be a number"),
        (["--config", str(tmp_path / "mine.py")], "a path outside this checkout"),
        (["--config", "mine.py"], "mine.py: a file in "),  # a file here, not in the checkout
        (["--config", "jumprelu/experiments/quickstart.py:bogus"], "argument 'bogus'"),  # the checkout's file
    ):
        with pytest.raises(SystemExit) as stop:
            tpu.main(["run", "sae-pod", *job, *common])  # no --dry_run: nothing may reach gcloud
        out, err = capfd.readouterr()
        assert stop.value.code == 2 and out == "" and err.strip().count("\n") == 0, err
        assert err.startswith("jumprelu: error: jumprelu tpu: ") and says in err, err
    # what `jumprelu train` accepts passes (were refused: a bool's `false`, dashed names)
    from jumprelu.launch.preflight import check_job

    check_job("quickstart", None, ["--config.train.decay_thresholds=false", "--config.train.lr-warmup-steps=2"])
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text("#!/bin/bash\necho 'ERROR: (gcloud) quota exceeded' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert tpu.main(["run", "sae-pod", "--sweep", "quickstart", *common]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[0] == "ERROR: (gcloud) quota exceeded" and len(err) == 2, err  # gcloud's own line, then ours
    assert err[1].startswith("jumprelu: error: jumprelu tpu: gcloud compute tpus tpu-vm ssh sae-pod"), err
    assert err[1].endswith("failed (rc 1); gcloud's output is above"), err


def test_a_v5e_slice_is_created_under_gcloud_s_name_for_it(capsys):
    tpu.main(["create", "sae-pod", "--accelerator", "v5e-8", "--zone", "z", "--project", "p", "--dry_run"])
    create = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ gcloud")]
    assert "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite" in create[0], create


def test_tpu_refuses_what_every_worker_would_fail_on(capsys):
    """Found by an audit: `--mount_bucket gs://b` made `/gcs/gs://b`, `v5p-7` was 3 chips, and a
    mesh of -1 by -1 passed the preflight to fail on each worker."""
    common = ["--zone", "z", "--project", "p", "--dry_run"]
    with pytest.raises(SystemExit) as e:
        tpu.main(["setup", "s", "--mount_bucket", "gs://my-bucket", *common])
    assert e.value.code == 2 and "--mount_bucket 'gs://my-bucket': expected a bucket name" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="v5p names count TensorCores, 2 per chip: expected a multiple of 2"):
        tpu.parse_accelerator("v5p-7")
    with pytest.raises(ConfigError, match="mesh.data and mesh.model cannot both be -1"):
        c = experiment.load("quickstart").get_config()
        c.mesh.update(data=-1, model=-1)
        validate(c)


def test_tpu_dry_run_for_a_two_host_slice(capsys):
    common = ["--zone", "us-east5-a", "--project", "proj", "--dry_run"]
    tpu.main(["create", "sae-pod", "--accelerator", "v5p-16", "--spot", *common])
    tpu.main(["setup", "sae-pod", "--mount_bucket", "bkt", *common])
    tpu.main(["run", "sae-pod", "--sweep", "quickstart", "--workdir", "gs://bkt/runs/q", *common])
    tpu.main(["delete", "sae-pod", *common])
    lines = [line for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == "# v5p-16: 2 hosts, runtime v2-alpha-tpuv5"
    cmds = [line[2:] for line in lines if line.startswith("$ ")]
    assert cmds[0] == (
        "gcloud compute tpus queued-resources create sae-pod --node-id=sae-pod --zone=us-east5-a "
        "--project=proj --accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --spot"
    )
    assert cmds[1].startswith("bash -c") and "git ls-files -z --cached --others --exclude-standard" in cmds[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(tpu.__file__)))
    assert f"cd {os.path.dirname(root)} &&" in cmds[1]  # this package's checkout, from any directory
    assert cmds[2].startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in cmds[2]
    ssh = [c for c in cmds if c.startswith("gcloud compute tpus tpu-vm ssh sae-pod")]
    assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)
    assert "pip install -q -c constraints.txt -e" in ssh[0] and "gcsfuse --implicit-dirs bkt /gcs/bkt" in ssh[1]
    assert (
        "JUMPRELU_DISTRIBUTED=1 nohup flock -n ~/jumprelu.lock .venv/bin/python -m jumprelu sweep quickstart "
        "--local --root gs://bkt/runs/q" in (ssh[2])
    )
    assert cmds[-1].startswith("gcloud compute tpus queued-resources delete sae-pod") and "--force" in cmds[-1]
    assert tpu.parse_accelerator("v5litepod-16") == ("v5litepod", 4)
    assert tpu.parse_accelerator("v4-8") == ("v4", 1)
    assert tpu.parse_accelerator("v5litepod-8") == ("v5litepod", 1)  # one host of 8 chips
    assert tpu.parse_accelerator("v6e-8") == ("v6e", 1)
    assert tpu.parse_accelerator("v6e-32") == ("v6e", 8)
    assert tpu.parse_accelerator("v5p-16") == ("v5p", 2)


def test_a_word_only_the_sweep_read_also_shapes_the_single_run():
    """`train --config quickstart:stacked` trains the stacked sweep's one run, not a plain SAE
    (the word used to be read only by get_sweep, so train accepted it and ignored it)."""
    quick = experiment.load("quickstart")
    (stacked_run,) = experiment.expand(quick, "stacked")
    assert quick.get_config("stacked").stack.sparsity_coefficients == stacked_run.config.stack.sparsity_coefficients
    assert len(quick.get_config("stacked").stack.sparsity_coefficients) == 4
    assert quick.get_config(None).stack.sparsity_coefficients == ()
    comparison = experiment.load("gemma2_9b_comparison")
    for kind in ("jumprelu", "gated"):
        arg = f"stack,kind={kind},site=resid,layer=20"
        (run,) = experiment.expand(comparison, arg)
        assert comparison.get_config(arg).stack.sparsity_coefficients == run.config.stack.sparsity_coefficients
        assert len(run.config.stack.sparsity_coefficients) == 6
    # the whole stacked sweep: its TopK runs (a sweep over k, not λ) stay unstacked and valid
    runs = experiment.expand(comparison, "stack,layer=20,site=resid")
    for run in runs:
        validate(run.config)
    assert [len(r.config.stack.sparsity_coefficients) for r in runs] == [6, 6] + [0] * 6
    assert all(not r.config.stack.sparsity_coefficients for r in experiment.expand(comparison, "stack,kind=topk"))

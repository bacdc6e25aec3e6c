"""K stacked SAEs in one step (config `stack`): same result as K separate runs, own checkpoint items."""

import json
import os

import numpy as np
import pytest

import jumprelu
from jumprelu import config as config_lib
from jumprelu.train.loop import train
from tests.test_train import train_straight_and_resumed

LAMS = (0.003, 0.03, 0.3)


@pytest.fixture
def stack_config(tiny_config):
    tiny_config.sae.threshold_param = "raw"  # so θ, and hence each member, visibly follows its λ
    tiny_config.mesh.update(data=2, model=2)
    return tiny_config


def test_stacked_saes_equal_separate_runs(tmp_path, stack_config):
    stack_config.stack.sparsity_coefficients = LAMS
    stacked = train(stack_config, str(tmp_path / "stacked"))
    assert [m["sparsity_coefficient"] for m in stacked["members"]] == list(LAMS)
    stack_config.stack.sparsity_coefficients = ()
    l0s = []
    for i, lam in enumerate(LAMS):
        stack_config.sae.sparsity_coefficient = lam
        alone = train(stack_config, str(tmp_path / f"alone{i}"))
        a = jumprelu.load(str(tmp_path / f"alone{i}"))
        s = jumprelu.load(str(tmp_path / "stacked" / f"sae-{i}"))  # the member's own load path
        for k, v in a.params().items():
            np.testing.assert_allclose(s.params()[k], v, rtol=2e-5, atol=2e-6, err_msg=f"member {i} {k}")
        assert stacked["members"][i]["eval"]["l0"] == pytest.approx(alone["eval"]["l0"], rel=1e-3)
        l0s.append(alone["eval"]["l0"])
    assert l0s[0] > l0s[1] > l0s[2]  # the members really trained with different λ


def test_stacked_run_writes_member_items_metrics_and_resumes(tmp_path, stack_config):
    stack_config.stack.sparsity_coefficients = LAMS[:2]
    assert stack_config.train.steps == 40
    straight, resumed = train_straight_and_resumed(stack_config, tmp_path)  # resumes at step 20
    for i in range(2):
        a = jumprelu.load(str(tmp_path / "a"), member=i)
        b = jumprelu.load(str(tmp_path / "b" / f"sae-{i}"))
        for k, v in a.params().items():
            np.testing.assert_array_equal(v, b.params()[k], err_msg=k)
        with open(tmp_path / "b" / f"sae-{i}" / "metrics.jsonl") as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == list(range(5, 41, 5))
        with open(tmp_path / "b" / f"sae-{i}" / "config.json") as f:
            assert json.load(f)["sae"]["sparsity_coefficient"] == LAMS[i]
        # an audit: the loaded member's config listed every λ of the stack, unlike its own config.json
        assert not a.config["stack"]["sparsity_coefficients"] and a.config["sae"]["sparsity_coefficient"] == LAMS[i]
        # an audit: a symlink to a member folder (runs/best -> RUN/sae-1) looked for the run beside the link
        (tmp_path / "links").mkdir(exist_ok=True)
        (tmp_path / "links" / f"best{i}").symlink_to(tmp_path / "b" / f"sae-{i}")
        np.testing.assert_array_equal(jumprelu.load(str(tmp_path / "links" / f"best{i}")).W_dec, b.W_dec)
    items = set(os.listdir(tmp_path / "a" / "checkpoints" / "40"))
    assert {"sae-0", "sae-1", "train", "config", "data"} <= items and "sae" not in items
    assert straight["members"][1]["eval"] == resumed["members"][1]["eval"]
    with pytest.raises(ValueError, match="holds 2 stacked SAEs"):
        jumprelu.load(str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"member=2 but the run holds 2 stacked SAEs \(0..1\)"):
        jumprelu.load(str(tmp_path / "a"), member=2)
    with pytest.raises(ValueError, match="sae-1 is member 1 of its stacked run; found member=0"):
        jumprelu.load(str(tmp_path / "b" / "sae-1"), member=0)
    # evaluate and refit of a member directory read the run's data (nothing new inside sae-1)
    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.refit import refit_workdir

    before = set(os.listdir(tmp_path / "b" / "sae-1"))
    _, by_dir, _ = evaluate_workdir(str(tmp_path / "b" / "sae-1"))
    _, by_member, _ = evaluate_workdir(str(tmp_path / "b"), member=1)
    assert by_dir == by_member
    assert refit_workdir(str(tmp_path / "b" / "sae-1"), None, 256, 0.01)["params"].endswith("sae-1/refit/params.npz")
    assert set(os.listdir(tmp_path / "b" / "sae-1")) == before | {"refit"}


def test_stack_config_errors(stack_config):
    stack_config.stack.sparsity_coefficients = (0.1, -1.0)
    with pytest.raises(config_lib.ConfigError, match="stack.sparsity_coefficients"):
        config_lib.validate(stack_config)
    stack_config.stack.sparsity_coefficients = ("(0.1,x)",)  # how the flag parser hands over a typo
    with pytest.raises(config_lib.ConfigError, match=r"numbers >= 0, found '\(0.1,x\)'$"):  # as typed
        config_lib.validate(stack_config)
    stack_config.stack.sparsity_coefficients = (0.1,)
    stack_config.sae.kind = "topk"
    with pytest.raises(config_lib.ConfigError, match="sae.kind"):
        config_lib.validate(stack_config)


def test_a_member_folder_loads_before_the_run_finishes(tmp_path, stack_config, monkeypatch):
    """An audit: WORKDIR/sae-i got its member.json only in the final report, so the members of a run
    that was stopped, preempted or diverged could not be loaded, evaluated or refitted by folder."""
    from jumprelu.train import report

    stack_config.stack.sparsity_coefficients = LAMS[:2]
    stack_config.ckpt.every_steps = 10

    def die(*a, **k):
        raise KeyboardInterrupt  # the run ends between its last checkpoint and its report

    monkeypatch.setattr(report, "final_report", die)
    with pytest.raises(KeyboardInterrupt):
        train(stack_config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "report.json").exists()
    for i in range(2):
        by_folder = jumprelu.load(str(tmp_path / "run" / f"sae-{i}"))
        by_member = jumprelu.load(str(tmp_path / "run"), member=i)
        np.testing.assert_array_equal(by_folder.W_dec, by_member.W_dec)
        assert by_folder.step == stack_config.train.steps


def test_overriding_the_single_lambda_of_a_stacked_run_is_refused(tmp_path):
    """An audit: `--config.sae.sparsity_coefficient=X` on a stacked experiment trained the stack's own
    λs and reported them, silently; a sweep over it made runs that all trained the same SAEs."""
    import subprocess
    import sys

    from jumprelu.launch import experiment

    want = "config field sae.sparsity_coefficient is not used by a stacked run: stack.sparsity_coefficients"
    for flag in ("--config.sae.sparsity_coefficient=0.5", "--config.sae.sparsity-coefficient=0.5"):
        cmd = [sys.executable, "-m", "jumprelu", "train", "--config", "quickstart:stacked", "--workdir"]
        cli = subprocess.run([*cmd, str(tmp_path / "run"), flag], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and cli.stderr.startswith(f"jumprelu: error: {want}"), cli.stderr
        assert cli.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
    exp = tmp_path / "exp.py"
    exp.write_text(
        "from jumprelu.experiments import quickstart\n"
        "def get_config(arg=None):\n    return quickstart.get_config('stacked')\n"
        "def get_sweep(arg=None):\n    return [{'sae.sparsity_coefficient': v} for v in (0.1, 0.2)]\n"
    )
    with pytest.raises(config_lib.ConfigError, match=f"sweep run sparsity_coefficient=0.1: {want}"):
        experiment.expand(experiment.load(str(exp)))
    from jumprelu.launch.preflight import check_job  # `jumprelu tpu run`: here, not on every worker

    with pytest.raises(config_lib.ConfigError, match=want):
        check_job("quickstart:stacked", None, ["--config.sae.sparsity-coefficient=0.5"])
    check_job("quickstart:stacked", None, ["--config.stack.sparsity_coefficients=(0.1,0.2)"])

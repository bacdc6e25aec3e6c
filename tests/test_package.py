"""The package surface: a light lazy `import jumprelu`, every public name working, the kind
registry's guarantees and the one `jumprelu` command."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jumprelu
from jumprelu.core import kinds
from jumprelu.train import sharding
from jumprelu.train import step as train_step  # noqa: F401 -- the trainer's step module must not shadow ops


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_jumprelu_alone_pulls_in_neither_orbax_nor_grain():
    out = _python(
        "import sys, jumprelu; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'grain', 'flax', 'jax'}))"
    )
    assert out.strip() == "[]"


def test_every_public_name_works_after_importing_the_trainer(tmp_path):
    from jumprelu.train import loop  # noqa: F401 -- the trainer's modules are imported first

    assert sorted(jumprelu.__all__) == ["JumpReLUSAE", "SAE", "base_config", "heaviside", "jumprelu", "load"]
    z, theta = jnp.array([[0.5, 2.0]]), jnp.array([1.0, 1.0])
    np.testing.assert_array_equal(jumprelu.jumprelu(z, theta, 0.1), [[0.0, 2.0]])
    np.testing.assert_array_equal(jumprelu.heaviside(z, theta, 0.1), [[0.0, 1.0]])
    assert jumprelu.base_config().sae.kind == "jumprelu"
    model = jumprelu.JumpReLUSAE(d_model=3, width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    assert params["W_enc"].shape == (3, 4)
    rng = np.random.default_rng(0)
    arrays = dict(
        W_enc=rng.normal(size=(3, 4)), b_enc=np.zeros(4), threshold=np.full(4, 0.1), W_dec=rng.normal(size=(4, 3)),
        b_dec=np.zeros(3),
    )  # fmt: skip
    path = str(tmp_path / "params.npz")
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    sae = jumprelu.load(path)
    assert isinstance(sae, jumprelu.SAE) and sae(np.ones((2, 3))).shape == (2, 3)
    with pytest.raises(AttributeError, match="no attribute 'step'"):
        jumprelu.step  # noqa: B018 -- the old name of the Heaviside op is gone, not a module


def test_registry_lists_every_kind_and_refuses_duplicates():
    assert set(kinds.names()) >= {"jumprelu", "relu", "gated", "topk", "batchtopk"}
    with pytest.raises(ValueError, match="registered twice"):
        kinds.register(kinds.KindSpec("relu", build=None))
    with pytest.raises(ValueError, match="redeclares the shared arrays"):
        kinds.register(kinds.KindSpec("another", build=None, param_specs={"W_enc": None}))


def test_an_array_no_kind_declares_is_an_error_not_silently_replicated():
    tree = {"params": {"W_enc": jnp.zeros((3, 4)), "mystery": jnp.zeros((4,))}, "count": jnp.zeros(())}
    with pytest.raises(ValueError, match=r"\['mystery'\] of shape \[4\] has no declared sharding"):
        sharding.tree_specs(tree)
    ok = {"params": {"W_enc": jnp.zeros((3, 4)), "r_mag": jnp.zeros((4,))}, "count": jnp.zeros(())}
    specs = sharding.tree_specs(ok)
    assert (
        specs["params"]["r_mag"] == jax.sharding.PartitionSpec("model")
        and specs["count"] == jax.sharding.PartitionSpec()
    )


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jumprelu", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_lists_commands_and_refuses_unknown_ones_in_one_line():
    out = _cli("--help")
    assert out.returncode == 0
    for name in ("train", "harvest", "evaluate", "store", "plan", "export", "sweep", "tpu"):
        assert f"  {name} " in out.stdout
    out = _cli("trian")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("jumprelu: error: unknown command 'trian'")


def test_a_reader_that_leaves_the_pipe_early_is_no_traceback():
    """`jumprelu sweep quickstart --dry_run | head -1`: BrokenPipeError was a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jumprelu", "sweep", "quickstart", "--dry_run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # before the command prints anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_every_command_answers_help_with_its_flags_and_runs_nothing(tmp_path):
    expected = {
        "train": ["--config", "--workdir", "--experiments_dir"],
        "evaluate": ["--workdir", "--member", "--lm", "--experiments_dir"],
        "harvest": ["--config", "--experiments_dir"],
        # an audit: the first docstring line only, without the formats or that convert resumes
        "store": ["convert", "summary", "resumes where an interrupted conversion stopped"],
        "export": ["--format", "--member", "--top", "TopK is refused", "neuronpedia    feature statistics"],
        "refit": ["--workdir", "--rows", "--ridge"],
        "plan": ["--config", "--topology", "--peak_tflops", "--experiments_dir"],
        "sweep": ["--dry_run", "--local"],
        "tpu": ["--zone", "--project"],
    }
    for command, flags in expected.items():
        out = _cli(command, "--help", cwd=tmp_path)
        assert out.returncode == 0, (command, out.stderr)
        assert out.stdout.lstrip().startswith(("usage: jumprelu " + command, "jumprelu " + command)), out.stdout
        for flag in flags:
            assert flag in out.stdout, (command, flag, out.stdout)
    out = _cli("store", "convert", "--help", cwd=tmp_path)
    assert (
        out.returncode == 0
        and "blocks.12.hook_resid_post" in out.stdout
        and "a .npy file of activations" in (out.stdout)
    )
    assert list(tmp_path.iterdir()) == []  # nothing ran
    # an audit: `jumprelu train` with neither flag printed two lines
    out = _cli("train", cwd=tmp_path)
    assert (
        out.returncode == 2 and out.stderr.count("\n") == 1 and "--config" in out.stderr and "--workdir" in (out.stderr)
    ), out.stderr
    # an audit: `python -m jumprelu.cli.train ...` imported the module, ran nothing and exited 0
    for command in ("train", "export"):
        out = subprocess.run(
            [sys.executable, "-m", f"jumprelu.cli.{command}", "--help"], capture_output=True, text=True, cwd=tmp_path
        )
        assert out.returncode == 0 and f"jumprelu {command}" in out.stdout, out
    out = subprocess.run(
        [sys.executable, "-m", "jumprelu.cli.store", "summary", "missing"], capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.startswith("jumprelu: error: store missing: no such directory"), out


def test_cli_errors_are_one_line_with_one_prefix(tmp_path):
    cases = [
        ("train", "--config", "no_such_experiment", "--workdir", str(tmp_path / "w")),
        ("train", "--config", "quickstart", "--workdir", str(tmp_path / "w"), "--config.sae.width=-3"),
        ("store", "summary", str(tmp_path / "missing")),
        ("export", str(tmp_path / "missing"), str(tmp_path / "o.npz")),
        ("sweep", "no_such_experiment", "--dry_run"),
        ("plan", "--config", "quickstart", "--topology", "v9z-8"),
        ("plan", "--config", "quickstart", "--topology", "0"),
        # beyond what XLA:CPU compiles for: a traceback at 2,049 devices, memory filling at a million
        ("plan", "--config", "quickstart", "--topology", "1000000"),
        ("plan", "--config", "quickstart", "--topology", "v5p-8192"),
        ("plan", "--config", "quickstart", "--topology", "v5p-7"),  # was 3 devices
        ("plan", "--config", "quickstart", "--topology", "4", "--matmul_efficiency=2"),  # doubled the MFU
        # found by an audit: collectives counted as 0 ms (MFU 119% for a 63% step)
        ("plan", "--config", "quickstart", "--topology", "4", "--peak_tflops", "459", "--config.mesh.data=4"),
        ("sweep", "quickstart", "--local", "--parallel", "0"),  # ran one at a time
        ("sweep", "quickstart", "--summary", "--root", str(tmp_path / "none")),  # made it, all runs "new"
        ("train", "--config", "quickstart:stacked=no", "--workdir", str(tmp_path / "w")),  # trained stacked
        # an experiment's own error while its config loads: its message, not the traceback
        ("train", "--config", "quickstart:bogus", "--workdir", str(tmp_path / "w")),
        ("plan", "--config", "recipe:target_l0=50", "--topology", "8"),
        # the argparse commands: the same one line, not a usage block under argparse's prefix
        ("export", str(tmp_path / "missing"), str(tmp_path / "o.npz"), "--format", "bogus"),
        ("store", "convert", str(tmp_path / "a.npy"), str(tmp_path / "s"), "--layer", "abc"),
        ("sweep", "quickstart"),
        ("sweep", "quickstart", "--summary", "--root", __file__),
        # found by an audit: a traceback from jax.distributed, a float() error not naming l0, a
        # misspelt source called a missing directory only, a config file that is not Python
        ("train", "--config", "quickstart", "--workdir", str(tmp_path / "w"), "--config.mesh.distributed=True"),
        ("train", "--config", "recipe:l0=abc", "--workdir", str(tmp_path / "w")),
        ("train", "--config", "quickstart", "--workdir", str(tmp_path / "w"), "--config.data.source=synthtic"),
        ("train", "--config", str(tmp_path / "plain.cfg"), "--workdir", str(tmp_path / "w")),
        # found by an audit: an override without its dashes was dropped (the default width trained)
        ("train", "--config", "quickstart", "--workdir", str(tmp_path / "w"), "config.sae.width=64"),
        ("refit", "--workdir", str(tmp_path / "w"), "stray"),
        ("train", "--config", "quickstart", "--workdir", str(tmp_path / "w"), "--config.sae.nosuch=None"),
        ("train", "--config", str(tmp_path / "noget.py"), "--workdir", str(tmp_path / "w")),  # named config_config
        ("train", "--workdir", str(tmp_path / "w"), "--config.train.steps=3"),  # was "Unknown command line flag"
    ]
    (tmp_path / "plain.cfg").write_text("width = 512\nsteps: 40\n")
    (tmp_path / "noget.py").write_text("x = 1\n")
    for args in cases:
        assert not (tmp_path / "none").exists()
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("jumprelu: error: "), (args, out.stderr)
        says = {"--config.mesh.distributed=True": "mesh.distributed", "recipe:l0=abc": "argument l0 must be a number"}
        says |= {"--config.data.source=synthtic": "'synthetic' or 'lm'", str(tmp_path / "plain.cfg"): "plain.cfg"}
        says |= {"1000000": "at most 2,048", "v5p-8192": "4,096 devices", "v5p-7": "expected an even number"}
        says |= {
            "--matmul_efficiency=2": "at most 1",
            "--parallel": "--parallel must be >= 1",
            str(tmp_path / "none"): "no such",
        }
        says |= {"quickstart:stacked=no": "stacked is a flag", "stray": "unexpected argument 'stray'"}
        says |= {"config.sae.width=64": "unexpected argument 'config.sae.width=64' (flags start with --)"}
        says |= {"--config.sae.nosuch=None": "flag --config.sae.nosuch=None: the config has no field sae.nosuch"}
        says |= {str(tmp_path / "noget.py"): "noget.py: the experiment file has no get_config(arg)"}
        says |= {"--config.train.steps=3": "sets a field of --config, which is not given (e.g. --config quickstart)"}
        assert all(text in lines[0] for arg, text in says.items() if arg in args), (args, lines[0])


def test_experiments_resolve_from_any_directory_and_from_an_experiments_dir(tmp_path):
    mine = tmp_path / "exps"
    mine.mkdir()
    (mine / "mine.py").write_text(
        "from jumprelu.launch import experiment\n"
        "def get_config(arg=None):\n"
        "    return experiment.runlocal(experiment.load('quickstart').get_config())\n"
    )
    out = _cli("sweep", "mine", "--experiments-dir", str(mine), "--dry-run", "--root", str(tmp_path / "r"), cwd="/")
    assert out.returncode == 0, out.stderr
    assert "1 runs of mine" in out.stdout
    out = _cli("sweep", "quickstart", "--dry_run", "--root", str(tmp_path / "q"), cwd="/")
    assert out.returncode == 0 and "4 runs of quickstart" in out.stdout, out.stderr
    # found by an audit: a misspelt folder quietly ran the packaged experiment of the same name
    out = _cli("sweep", "quickstart", "--experiments_dir", str(tmp_path / "exp"), "--dry_run", cwd="/")
    assert out.returncode == 2 and out.stderr.strip() == (
        f"jumprelu: error: --experiments_dir {tmp_path / 'exp'}: no such directory (expected the folder of your "
        "experiment files)"
    ), out.stderr


def test_plan_compiles_for_the_slice_devices_in_a_fresh_process():
    env = dict(os.environ, XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-m", "jumprelu", "plan", "--config", "quickstart", "--topology", "v5e-4"]
        + ["--config.sae.width=1024", "--config.train.batch_size=256", "--config.mesh.model=-1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    bad = subprocess.run(
        [sys.executable, "-m", "jumprelu", "plan", "--config=quickstart", "--topology=4", "--matmul_efficiency=0"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "jumprelu: error: --matmul_efficiency must be > 0, found 0"

"""Two real processes (4 CPU devices each) train one SAE on a mesh over all 8 devices.

Each process reads only its half of every global batch, only process 0 writes metrics,
and orbax writes the checkpoint collectively. The result must match one process driving
8 devices on the same mesh.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jumprelu
from tests.test_train import ROOT, TINY_FLAGS

RUN = ["--config.train.steps=12", "--config.ckpt.every_steps=6"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir):
    return [sys.executable, "-m", "jumprelu", "train", "--config", "quickstart", "--workdir", str(workdir)]


def _two_processes(cmd, port, **popen):
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JUMPRELU_DISTRIBUTED="1",
            JUMPRELU_COORDINATOR=f"127.0.0.1:{port}",
            JUMPRELU_NUM_PROCESSES="2",
            JUMPRELU_PROCESS_ID=str(pid),
        )
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen))
    return procs


def test_a_mesh_on_some_of_the_devices_is_one_line_on_every_process(tmp_path):
    """Found by an audit: the default 1×1 mesh on two processes took process 0's first device;
    process 1 crashed with a JAX traceback and process 0 aborted at the shutdown barrier 5 minutes
    later. Now both stop at start with one line."""
    cmd = _cmd(tmp_path / "w") + TINY_FLAGS + RUN + ["--config.mesh.data=2", "--config.mesh.model=1"]
    procs = _two_processes(cmd, _free_port(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            "jumprelu: error: config fields mesh.data × mesh.model = 2×1 = 2 use only some of the 8 devices of "
            "this 2-process run; a multi-host mesh must use them all: set mesh.data=-1 or mesh.model=-1 (or a "
            "product of the device count)"
        )


@pytest.mark.parametrize("mesh", [(2, 4), (1, 8)])  # (1, 8): every process must read the whole batch
def test_two_processes_match_one(tmp_path, mesh):
    flags = TINY_FLAGS + RUN + [f"--config.mesh.data={mesh[0]}", f"--config.mesh.model={mesh[1]}"]
    procs = _two_processes(
        _cmd(tmp_path / "multi") + flags, _free_port(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    single = subprocess.run(
        _cmd(tmp_path / "single") + flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]

    with open(tmp_path / "multi" / "metrics.jsonl") as fh:
        multi_losses = [json.loads(line)["loss"] for line in fh]
    with open(tmp_path / "single" / "metrics.jsonl") as fh:
        single_losses = [json.loads(line)["loss"] for line in fh]
    assert len(multi_losses) == len(single_losses) > 0  # written once, by process 0 only
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
    a, b = jumprelu.load(str(tmp_path / "multi")), jumprelu.load(str(tmp_path / "single"))
    assert a.step == b.step == 12
    for k, v in a.params().items():
        np.testing.assert_allclose(v, b.params()[k], rtol=1e-4, atol=1e-6, err_msg=k)

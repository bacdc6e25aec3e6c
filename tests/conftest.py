"""Test setup: 8 simulated CPU devices for multi-device tests (must precede importing jax)."""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it set
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are small and compiled once or a few times each, so most of the suite's
# time is XLA:CPU compiling them, and LLVM's optimisation passes are much of that. Level 0 skips
# them (the HLO program is the same; only the machine code is less optimised, so rounding may
# differ in the last bits, which no test depends on): the suite's CPU time fell from 25.7 to
# 20.7 minutes, tests/test_sparse.py's from 465 to 249 s. Benchmarks and users' runs keep the
# default.
_OPT = "--xla_backend_optimization_level"
if _OPT not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_OPT}=0"

# One persistent compilation cache for the whole session, shared by the xdist workers and every
# command the tests start: most of the suite's time is XLA compiling the same programs again
# (each resumed, killed or repeated run of a config, each test of the same step). A fresh
# directory per session (the workers and subprocesses inherit the variable), removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jumprelu-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import pytest  # noqa: E402

from jumprelu.config import base_config  # noqa: E402


@pytest.fixture
def tiny_config():
    return make_tiny_config()


def make_tiny_config():
    """The quickstart shrunk to seconds: 32-dim synthetic data, 64 latents."""
    c = base_config()
    c.data.synthetic.update(d_model=32, num_features=48, rows=4096, features_per_token=3.0)
    c.data.eval_rows = 512
    c.sae.update(width=64, sparsity_coefficient=0.01, threshold_init=0.05)
    c.train.update(steps=40, batch_size=128, lr=3e-3, lr_warmup_steps=10, sparsity_warmup_steps=20)
    c.ckpt.every_steps = 20
    c.log.update(every_steps=5, progress=False)
    return c

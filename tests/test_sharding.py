"""Sharded training on 8 simulated CPU devices: same numbers on every mesh, real sharding,
restore across mesh shapes, and the Megatron collective pattern in the compiled step."""

import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jumprelu
from jumprelu.config import ConfigError
from jumprelu.launch import hlo_stats
from jumprelu.launch.plan import parse_topology, plan
from jumprelu.store import StoreWriter
from jumprelu.train import program, sharding
from jumprelu.train import state as state_lib
from jumprelu.train.checkpoint import Checkpointer
from jumprelu.train.loop import train

MESHES = [(1, 1), (8, 1), (2, 4), (1, 8)]


def _set_mesh(cfg, shape):
    cfg.mesh.data, cfg.mesh.model = shape
    return cfg


def _losses(workdir):
    with open(f"{workdir}/metrics.jsonl") as fh:
        return np.array([json.loads(line)["loss"] for line in fh])


@pytest.fixture
def mesh_config(tiny_config):
    tiny_config.train.steps = 20
    tiny_config.log.every_steps = 1
    return tiny_config


def test_same_training_on_every_mesh(tmp_path, mesh_config):
    runs = {}
    for shape in MESHES:
        wd = str(tmp_path / f"m{shape[0]}x{shape[1]}")
        train(_set_mesh(mesh_config, shape), wd)
        runs[shape] = (_losses(wd), jumprelu.load(wd).params())
    ref_losses, ref_params = runs[(1, 1)]
    assert len(ref_losses) == 20
    for shape in MESHES[1:]:
        losses, params = runs[shape]
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(shape))
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-5, err_msg=f"{shape} {k}")


def test_state_is_sharded_as_declared(mesh_config):
    per_device_bytes = []
    for model_axis in (1, 2, 4, 8):
        mesh = sharding.make_mesh(_set_mesh(mesh_config, (8 // model_axis, model_axis)).mesh)
        prog = program.build(mesh_config, 32, mesh)
        state = state_lib.create_state(prog.model, prog.tx, mesh, jax.random.key(0), 1.0)
        assert state.params["W_enc"].sharding.spec == P(None, "model")
        assert state.params["W_dec"].sharding.spec == P("model", None)
        assert state.params["b_enc"].sharding.spec == P("model")
        assert state.params["log_threshold"].sharding.spec == P("model")
        assert state.params["b_dec"].sharding.spec == P()
        adam = next(s for s in state.opt_state if hasattr(s, "mu"))
        assert adam.mu["W_enc"].sharding.spec == P(None, "model")
        assert adam.nu["W_dec"].sharding.spec == P("model", None)
        assert adam.count.sharding.spec == P()
        assert state.params["W_enc"].sharding.mesh.shape == {"data": 8 // model_axis, "model": model_axis}
        per_device_bytes.append(state.params["W_enc"].addressable_shards[0].data.nbytes)
    assert per_device_bytes == [32 * 64 * 4 // m for m in (1, 2, 4, 8)]


def test_restore_onto_other_meshes_and_continue(tmp_path, mesh_config):
    mesh_config.train.steps = 10
    saved = str(tmp_path / "saved")
    train(_set_mesh(mesh_config, (2, 4)), saved)
    src_prog = program.build(mesh_config, 32, sharding.make_mesh(mesh_config.mesh))
    reference = jax.device_get(Checkpointer(saved, keep=1, read_only=True).restore_state(src_prog.abstract_state))
    for shape in [(4, 2), (1, 8)]:
        wd = str(tmp_path / f"to{shape[0]}x{shape[1]}")
        shutil.copytree(saved, wd)
        mesh = sharding.make_mesh(_set_mesh(mesh_config, shape).mesh)
        prog = program.build(mesh_config, 32, mesh)
        restored = Checkpointer(wd, keep=1, read_only=True).restore_state(prog.abstract_state)
        assert restored.params["W_enc"].sharding.mesh.shape == {"data": shape[0], "model": shape[1]}
        for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(reference), strict=True):
            np.testing.assert_array_equal(got, want)
        mesh_config.train.steps = 15
        report = train(mesh_config, wd)
        assert report["resumed_from_step"] == 10 and report["steps"] == 15
        mesh_config.train.steps = 10


def test_model_parallel_step_has_one_activation_all_reduce_and_no_weight_gathers(mesh_config):
    cfg = _set_mesh(mesh_config, (1, 8))
    B, d, M = cfg.train.batch_size, 32, cfg.sae.width
    colls = hlo_stats.collectives(program.build(cfg, d, sharding.make_mesh(cfg.mesh)).step.as_text())
    activation = [c for c in colls if c.kind == "all-reduce" and ("f32", (B, d)) in c.shapes]
    assert 1 <= len(activation) <= 2  # the forward's partial reconstruction (+ at most its backward twin)
    assert all(c.group_size == 8 for c in activation)
    weights = {(d, M), (M, d), (d, M // 8), (M // 8, d)}
    assert not [c for c in colls if c.kind == "all-gather" and any(s in weights for _, s in c.shapes)]
    assert not [c for c in colls if c.kind == "all-gather"]


def test_layout_errors_are_one_line(tmp_path, mesh_config):
    with pytest.raises(ConfigError, match=r"^config field sae.width=60 is not divisible by mesh.model=8$"):
        mesh_config.sae.width = 60
        train(_set_mesh(mesh_config, (1, 8)), str(tmp_path / "a"))
    mesh_config.sae.width = 64
    with pytest.raises(ConfigError, match=r"mesh.data × mesh.model = 4×4 = 16 exceeds the 8 available devices"):
        train(_set_mesh(mesh_config, (4, 4)), str(tmp_path / "b"))
    _set_mesh(mesh_config, (-1, 2))
    assert sharding.mesh_shape(mesh_config.mesh, 8) == (4, 2)


def test_planner_reports_memory_flops_and_collectives(mesh_config):
    topo = parse_topology("v5p-16")
    assert (topo["devices"], topo["hbm_gib"]) == (8, 95)
    assert parse_topology("v5e-16")["devices"] == 16 and parse_topology("12")["devices"] == 12
    with pytest.raises(ValueError, match="v9x-4"):
        parse_topology("v9x-4")
    r = plan(_set_mesh(mesh_config, (1, 8)), topo)
    B, d, M = mesh_config.train.batch_size, 32, mesh_config.sae.width
    assert r["fits_hbm"] and r["per_device_gib"]["total"] > 0
    assert 10 * B * d * M <= r["flops_per_step"] < 20 * B * d * M  # five [B,d,M] products + elementwise
    assert any(c["kind"] == "all-reduce" and c["shapes"] == [f"f32[{B}, {d}]"] for c in r["collectives"])
    assert r["step_ms_estimate"] > 0 and 0 < r["hfu_estimate"] <= 1
    # float32 products at sae.matmul_precision=highest take six bf16 passes on a TPU
    mesh_config.sae.matmul_precision = "highest"
    r6 = plan(mesh_config, topo)
    assert (r["matmul_passes"], r6["matmul_passes"]) == (1, 6)
    # ...the products' FLOPs, read from the program's dots, only: the elementwise rest takes one
    dots, flops = r["matmul_flops_per_step"], r["flops_per_step"]
    assert 10 * B * d * M <= dots < 10.1 * B * d * M < flops  # the five [B, d, M] products and mat-vecs
    assert r6["compute_ms"] == pytest.approx(r["compute_ms"] * (6 * dots + flops - dots) / flops, rel=1e-6)


def test_dot_flops_are_two_per_multiply_add_of_every_product():
    def f(x, w, v):  # [8,4]·[4,16] and a batch of 2 [8,4]·[4,16]: 2·8·16·4 + 2·2·8·16·4 FLOPs
        return (x @ w).sum() + jax.numpy.einsum("kbd,kdm->kbm", v, jax.numpy.stack([w, w])).sum()

    compiled = jax.jit(f).lower(np.ones((8, 4)), np.ones((4, 16)), np.ones((2, 8, 4))).compile()
    assert hlo_stats.dot_flops(compiled.as_text()) == 2 * 8 * 16 * 4 * 3

    def g(p, x, w, v):  # one branch runs: its products count, the other's not
        return jax.lax.cond(p, lambda: (x @ w).sum(), lambda: (x @ w @ v).sum())

    compiled = jax.jit(g).lower(True, np.ones((8, 4)), np.ones((4, 16)), np.ones((16, 64))).compile()
    assert hlo_stats.dot_flops(compiled.as_text()) == 2 * 8 * 16 * 4 + 2 * 8 * 64 * 16


def test_planner_counts_the_mesh_devices_and_the_stacked_saes(mesh_config):
    """A 1×1 mesh on an 8-device slice does one device's FLOPs (not 8×) and says the rest idle;
    K stacked SAEs are K SAEs' model FLOPs."""
    from jumprelu.launch.plan import summary

    B, d, M = mesh_config.train.batch_size, 32, mesh_config.sae.width
    r = plan(_set_mesh(mesh_config, (1, 1)), parse_topology("v5p-16"))
    assert r["mesh_devices"] == 1 and 10 * B * d * M <= r["flops_per_step"] < 20 * B * d * M
    assert "the mesh spans 1; 7 devices idle" in summary(r)
    mesh_config.stack.sparsity_coefficients = (1e-3, 2e-3, 4e-3)
    r = plan(_set_mesh(mesh_config, (1, 8)), parse_topology("v5p-16"))
    assert r["model_flops_12BdM"] == 12 * B * d * M * 3 and 30 * B * d * M <= r["flops_per_step"] < 60 * B * d * M
    assert "idle" not in summary(r)


def test_planner_compiles_a_tpu_slice_step_as_a_tpu_runs_it(mesh_config):
    """At 4,096 latents and L0 8, `sae.sparse=auto` takes the sparse step on this CPU and the dense one
    on a TPU (not measured there): a TPU slice's plan must show the dense step's work, a bare device
    count this machine's, and planning must leave the running process's choices alone."""
    from jumprelu.core import backend
    from jumprelu.launch.plan import summary

    mesh_config.sae.update(width=4096, target_l0=8.0, sparse="auto")
    B, d, M = mesh_config.train.batch_size, 32, 4096
    tpu = plan(_set_mesh(mesh_config, (1, 1)), parse_topology("v5p-2"))
    host = plan(mesh_config, parse_topology("1"))
    assert tpu["step_path"] == "auto: dense (the sparse step is not yet measured on tpu)"
    assert "step compiled for tpu: auto: dense" in summary(tpu)
    assert 10 * B * d * M <= tpu["flops_per_step"] < 20 * B * d * M
    assert host["step_path"].startswith("auto: sparse") and host["flops_per_step"] != tpu["flops_per_step"]
    assert backend.target() == jax.default_backend() == "cpu"


def test_planner_reads_d_model_from_a_store_source(tmp_path, mesh_config):
    w = StoreWriter(str(tmp_path / "s"), d_model=24)
    w.append(np.ones((16, 24), np.float32))
    w.close()
    mesh_config.data.source = str(tmp_path / "s")
    assert plan(_set_mesh(mesh_config, (8, 1)), parse_topology("8"))["d_model"] == 24


def test_planner_input_rate_counts_the_stores_bytes(tmp_path, mesh_config):
    """A bfloat16 store moves 2 bytes a value: the input GB/s is half a float32 store's at the same step."""
    from jumprelu.launch.plan import summary

    rates = {}
    for dtype in ("float32", "bfloat16"):
        w = StoreWriter(str(tmp_path / dtype), d_model=32, dtype=dtype)
        w.append(np.ones((16, 32), np.float32))
        w.close()
        mesh_config.data.source = str(tmp_path / dtype)
        r = plan(_set_mesh(mesh_config, (1, 8)), parse_topology("v5p-16"))
        rates[dtype] = r["input_gb_per_s"]
        B = mesh_config.train.batch_size
        assert rates[dtype] == pytest.approx(B * 32 * (4 if dtype == "float32" else 2) / r["step_ms_estimate"] / 1e6)
        assert f"input {rates[dtype]:.2f} GB/s" in summary(r)
    assert rates["bfloat16"] == pytest.approx(rates["float32"] / 2)

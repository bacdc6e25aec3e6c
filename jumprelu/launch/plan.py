"""Scale planner: compile the real train step for a TPU slice on fake CPU devices.

  jumprelu plan --config quickstart --topology v5p-16 \
      --config.data.d_model=3584 --config.sae.width=131072 --config.mesh.model=-1

Nothing executes: the step is lowered and compiled ahead of time for the slice's device
count, then the compiled program's memory analysis (per device), FLOP count and
collectives are read back. The step time is a roofline estimate: the FLOPs of one
device at the chip's peak (divided by --matmul-efficiency; the matrix products' FLOPs, read from
the program's dots, times the bf16 passes of each float32 product at sae.matmul_precision: 3 for
high, 6 for highest) plus the ring-algorithm time
of every collective at the chip's ICI bandwidth, without overlap. MFU is the
Gemma Scope convention, 12·B·d·M FLOPs per step (per stacked SAE) over (chips × peak × step time);
HFU counts the FLOPs the compiled program performs (about 10·B·d·M).
The program is compiled by XLA:CPU, whose fusion and temporaries differ from XLA:TPU's:
treat memory as an estimate with a margin, not a guarantee. The step's form is the TPU's for a
slice name (`jumprelu.core.backend`: `sae.sparse=auto` stays dense there, and z is not cut into
XLA:CPU's row blocks) and this machine's for a bare device count.
"""

from __future__ import annotations

import re

from jumprelu.errors import UserError

# name -> (JAX devices per unit of the slice name, HBM GiB per device, peak bf16 TFLOP/s
#          per device, ICI Gbit/s per device). From public Cloud TPU spec sheets. v2-v4 and
#          v5p names count TensorCores (v4/v5p: 2 per chip, one JAX device per chip);
#          v3 names count cores and each core is a device; v5e/v6e names count chips.
CHIPS = {
    "v3": (1.0, 16, 61.5, 656),
    "v4": (0.5, 32, 275, 2400),
    "v5p": (0.5, 95, 459, 4800),
    "v5e": (1.0, 16, 197, 1600),
    "v5litepod": (1.0, 16, 197, 1600),
    "v6e": (1.0, 32, 918, 3584),
}


# bf16 passes a TPU makes per float32 product at each sae.matmul_precision (JAX's Precision: DEFAULT
# one pass, HIGH three, HIGHEST six); bfloat16 products take one pass at any precision.
TPU_F32_PASSES = {"default": 1, "high": 3, "highest": 6}


# XLA:CPU compiles for at most 2,048 devices of one process ("Multiprocess computations aren't
# implemented on the CPU backend" at 2,049), and a count far beyond that only fills the memory
# while JAX makes the fake devices (a million: 10 GiB in 2.5 minutes, before any compile).
MAX_PLANNED_DEVICES = 2048


def _check_count(name: str, devices: int) -> None:
    if devices > MAX_PLANNED_DEVICES:
        raise ValueError(
            f"--topology {name!r}: {devices:,} devices, but the planner compiles on fake CPU devices and XLA:CPU "
            f"compiles for at most {MAX_PLANNED_DEVICES:,}; plan {MAX_PLANNED_DEVICES:,} or fewer with the same "
            "mesh.model (per-device memory follows the model axis; more data replicas add only their all-reduce)"
        )


def parse_topology(name: str) -> dict:
    """'v5p-16' -> 8 devices of 95 GiB at 459 TFLOP/s; '8' -> 8 devices, chip figures unknown."""
    if name.isdigit():
        if int(name) < 1:
            raise ValueError(f"--topology {name!r}: a device count must be at least 1")
        _check_count(name, int(name))
        return _topology(name, int(name), None, None, None, backend=None)
    m = re.fullmatch(r"(v\d[a-z]*|v5litepod)-(\d+)", name)
    if not m or m[1] not in CHIPS:
        raise ValueError(f"--topology {name!r}: expected one of {sorted(CHIPS)} followed by -N, or a device count")
    per_unit, hbm, peak, ici = CHIPS[m[1]]
    units = int(m[2]) * per_unit
    if units != int(units):  # v5p-7 was read as 3 devices
        raise ValueError(f"--topology {name!r}: {m[1]} names count TensorCores, two per chip: expected an even number")
    devices = int(units)
    if devices < 1:
        raise ValueError(f"--topology {name!r}: too small a slice")
    _check_count(name, devices)
    return _topology(name, devices, hbm, peak, ici, backend="tpu")


def _topology(name: str, devices: int, hbm, peak, ici, backend: str | None) -> dict:
    """backend: the one whose step form the plan compiles (None: this machine's)."""
    return {"topology": name, "devices": devices, "hbm_gib": hbm, "peak_tflops": peak, "ici_gbps": ici,
            "backend": backend}  # fmt: skip


def plan(cfg, topo: dict, matmul_efficiency: float = 1.0) -> dict:
    """Compiles the step for topo['devices'] devices (they must exist: fake CPU ones here)."""
    import jax

    from jumprelu.core import backend
    from jumprelu.data import source_d_model, source_row_itemsize
    from jumprelu.launch import hlo_stats
    from jumprelu.train import program, sharding

    devices = jax.devices()[: topo["devices"]]
    if len(devices) < topo["devices"]:
        raise ValueError(f"need {topo['devices']} devices, have {len(devices)}")
    d_model = source_d_model(cfg.data)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    # a TPU slice's step as a TPU runs it: its own sparse/dense choices, not the CPU's compiling it
    with backend.planning_for(topo.get("backend")):
        prog = program.build(cfg, d_model, mesh)
    mem = prog.step.memory_analysis()
    per_device = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    )
    cost = prog.step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_device = float(cost.get("flops", 0.0))
    text = prog.step.as_text()
    # the products alone take a TPU's extra bf16 passes at high/highest; the elementwise rest does not
    dot_device = min(hlo_stats.dot_flops(text), flops_device)
    colls = hlo_stats.collectives(text)
    # the devices the mesh spans: a mesh smaller than the slice leaves the rest idle
    B, M, n = cfg.train.batch_size, cfg.sae.width, mesh.devices.size
    members = max(1, len(cfg.stack.sparsity_coefficients))  # K stacked SAEs: K steps' work in one
    out = {
        **topo,
        "d_model": d_model,
        "width": M,
        "batch": B,
        "mesh": dict(mesh.shape),
        "per_device_gib": {
            "total": per_device / 2**30,
            "arguments": mem.argument_size_in_bytes / 2**30,
            "temporaries": mem.temp_size_in_bytes / 2**30,
        },
        "mesh_devices": n,
        "step_path": prog.step_path,
        "flops_per_step": flops_device * n,
        "matmul_flops_per_step": dot_device * n,
        "model_flops_12BdM": 12.0 * B * d_model * M * members,
        "collectives": [
            {
                "kind": c.kind,
                "shapes": [f"{dt}{list(d)}" for dt, d in c.shapes],
                "bytes": c.bytes,
                "group": c.group_size,
            }
            for c in colls
        ],
    }
    comm_s = 0.0
    if topo.get("peak_tflops") and not topo.get("ici_gbps") and any(c.bytes for c in colls):
        # a bare device count with --peak_tflops knows no interconnect: its collectives would count as
        # 0 ms (an audit saw MFU 119% for a step that is 63% with them)
        raise UserError(
            f"--ici_gbps is needed with --peak_tflops for {topo['devices']} devices: the step's collectives "
            f"({len(colls)}) take time on the interconnect; give its Gbit/s per device, or a chip's topology"
        )
    if topo.get("ici_gbps"):
        comm_s = sum(hlo_stats.ring_bytes_per_device(c) for c in colls) / (topo["ici_gbps"] * 1e9 / 8)
    if topo.get("hbm_gib"):
        out["fits_hbm"] = per_device <= topo["hbm_gib"] * 2**30
    passes = 1
    if cfg.sae.get("compute_dtype", "float32") == "float32":
        passes = TPU_F32_PASSES[cfg.sae.get("matmul_precision", "default")]
    out["matmul_passes"] = passes
    if topo.get("peak_tflops"):
        compute_s = (passes * dot_device + flops_device - dot_device) / (topo["peak_tflops"] * 1e12 * matmul_efficiency)
        step_s = compute_s + comm_s
        out.update(
            compute_ms=1e3 * compute_s,
            collective_ms=1e3 * comm_s,
            step_ms_estimate=1e3 * step_s,
            # MFU in Gemma Scope's convention (12·B·d·M per step). This step needs only
            # 10·B·d·M (no gradient for the input), so this can pass 100%; hfu counts
            # the FLOPs the compiled program really performs.
            # over every chip of the slice, idle ones too
            mfu_estimate=out["model_flops_12BdM"] / (topo["devices"] * topo["peak_tflops"] * 1e12 * step_s),
            hfu_estimate=out["flops_per_step"] / (topo["devices"] * topo["peak_tflops"] * 1e12 * step_s),
        )
        itemsize = source_row_itemsize(cfg.data)  # a bfloat16 store moves half a float32 one's bytes
        if itemsize:
            out["input_gb_per_s"] = B * d_model * itemsize / step_s / 1e9
    return out


def summary(r: dict) -> str:
    gib = r["per_device_gib"]
    idle = r["devices"] - r["mesh_devices"]
    lines = [
        f"{r['topology']}: {r['devices']} devices, mesh {r['mesh']}, d_model {r['d_model']}, width {r['width']:,}, "
        f"batch {r['batch']:,}"
        + (f"  (WARNING: the mesh spans {r['mesh_devices']}; {idle} devices idle: set mesh.*)" if idle else ""),
        f"  memory per device: {gib['total']:.2f} GiB "
        f"(state {gib['arguments']:.2f}, temporaries {gib['temporaries']:.2f})"
        + (f" of {r['hbm_gib']} GiB HBM -> {'fits' if r['fits_hbm'] else 'DOES NOT FIT'}" if "fits_hbm" in r else ""),
        f"  FLOPs per step: {r['flops_per_step'] / 1e12:.2f} T (12·B·d·M = {r['model_flops_12BdM'] / 1e12:.2f} T)",
        f"  step compiled{' for ' + r['backend'] if r.get('backend') else ''}: {r['step_path']}",
    ]
    for c in r["collectives"]:
        lines.append(
            f"  {c['kind']} over {c['group']} devices: {', '.join(c['shapes'])} ({c['bytes'] / 2**20:.2f} MiB)"
        )
    if not r["collectives"]:
        lines.append("  no collectives")
    if "step_ms_estimate" in r:
        lines.append(
            f"  step ≈ {r['step_ms_estimate']:.1f} ms (compute {r['compute_ms']:.1f}"
            + (f" at {r['matmul_passes']} bf16 passes per float32 product" if r.get("matmul_passes", 1) > 1 else "")
            + f" + collectives "
            f"{r['collective_ms']:.1f}), MFU(12BdM) ≈ {100 * r['mfu_estimate']:.0f}%, "
            f"HFU ≈ {100 * r['hfu_estimate']:.0f}%"
            + (f", input {r['input_gb_per_s']:.2f} GB/s" if "input_gb_per_s" in r else "")
        )
    return "\n".join(lines)

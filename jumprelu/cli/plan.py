"""jumprelu plan --config EXPERIMENT --topology v5p-16 [--config.field=value ...]

Compiles the real train step for a TPU slice on fake CPU devices and prints per-device
memory, FLOPs, collectives and a roofline step time (see jumprelu/launch/plan.py).
"""

from __future__ import annotations

import json
import os
import sys

from jumprelu.cli import common


def _use_fake_devices(count: int) -> None:
    """Fake CPU devices for the slice: set before any JAX backend starts (nothing runs on them).

    JAX reads JAX_PLATFORMS when it is imported, so if it already was (the experiment file may
    import it), the platform is also set through jax.config; both only act before a backend
    starts, which is checked afterwards.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_platforms", "cpu")


def run(argv: list[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    from jumprelu.launch import plan

    argv = common.underscore_flags(argv)
    _, topology = common.pop_flag(argv, "topology")
    if common.wants_help(argv):  # the flags below are only defined, for their help
        topology = topology or "1"
    if topology is None:
        return common.fail("jumprelu plan: flag --topology is required (a TPU slice such as v5p-16, or a count)")
    try:
        topo = plan.parse_topology(topology)
    except ValueError as e:
        return common.fail(e)
    _use_fake_devices(topo["devices"])  # before the config file (which may import jax) loads
    try:
        argv = common.resolve_config_flags(argv)
    except ValueError as e:
        return common.fail(e)
    common.define_experiments_dir_flag(__name__)
    config = config_flags.DEFINE_config_file("config", None, "Experiment (path, or name).", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice (e.g. v5p-16, v5e-16) or a device count.")
    peak = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device (default: the chip's).")
    hbm = flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB (default: the chip's).")
    ici = flags.DEFINE_float("ici_gbps", None, "Interconnect Gbit/s per device (default: the chip's).")
    eff = flags.DEFINE_float("matmul_efficiency", 1.0, "Share of peak the matmuls reach (1.0 = roofline).")
    flags.mark_flags_as_required(["config"])

    def main() -> int:
        import jax

        from jumprelu.config import validate
        from jumprelu.errors import UserError

        common.quiet_libraries(flags.FLAGS)
        devices = jax.devices()
        if devices[0].platform != "cpu" or len(devices) != topo["devices"]:
            return common.fail(
                f"jumprelu plan: needs {topo['devices']} fake CPU devices but JAX started with "
                f"{len(devices)} {devices[0].platform} devices; run it in a fresh process"
            )
        for flag in (peak, hbm, ici, eff):
            if flag.value is not None and not flag.value > 0:
                return common.fail(f"--{flag.name} must be > 0, found {flag.value:g}")
        if eff.value > 1:  # the roofline is 1: more would report an MFU the chip cannot reach
            return common.fail(f"--matmul_efficiency is a share of the peak, at most 1, found {eff.value:g}")
        for key, flag in (("peak_tflops", peak), ("hbm_gib", hbm), ("ici_gbps", ici)):
            if flag.value is not None:
                topo[key] = flag.value
        try:
            validate(config.value)
            r = plan.plan(config.value, topo, eff.value)
        except UserError as e:
            return common.fail(e)
        print(plan.summary(r))
        print(json.dumps(r))
        return 0

    return common.absl_run(main, argv, "jumprelu plan")


if __name__ == "__main__":  # python -m jumprelu.cli.plan is `jumprelu plan` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("plan")

"""The base experiment config (paper defaults) and its validation.

Every knob is a field here, nested by concern. Experiment files (`jumprelu/experiments/`)
start from `base_config()` and change what they need. `validate` runs before any
training work and turns a bad value into a one-line `ConfigError` naming the field. The named
recipes (`jumprelu/recipes.py`) are overrides of this config.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import ml_collections
from ml_collections import config_dict

from jumprelu import config_shape
from jumprelu.core import kinds
from jumprelu.core.kinds import ownership
from jumprelu.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.sae = dict(
        kind="jumprelu",  # any registered kind: jumprelu (paper), relu, gated, topk, batchtopk
        width=16384,
        sparsity_coefficient=1e-3,  # λ; paper sweeps it per site
        pre_encoder_bias=True,
        compute_dtype="float32",  # matmul dtype; params and θ always float32
        # The SAE's products at the backend's own precision ("default": float32 on CPU, TF32 on
        # NVIDIA GPUs, bf16 passes on TPU) or at "high"/"highest" (jax.default_matmul_precision).
        matmul_precision="default",
        # Each kind's own fields (jumprelu/core/kinds/<kind>.py), e.g. JumpReLU's bandwidth,
        # threshold_init, threshold_param, target_l0; TopK's k, aux_k.
        **kinds.config_fields(),
    )

    c.data = ml_collections.ConfigDict()
    # "synthetic", an activation store directory (jumprelu store), or "lm": rows computed by the language
    # model during training, no store (experiments/onthefly.py; jumprelu/harvest/onthefly.py)
    c.data.source = "synthetic"
    c.data.d_model = config_dict.placeholder(int)  # read from the source; set only to assert
    c.data.normalize = True  # divide by C with E‖x/C‖² = 1 (paper)
    c.data.scale = config_dict.placeholder(float)  # fixed C instead of the store's (computed at write time)
    c.data.eval_rows = 8192  # held out from training, used for the final report
    c.data.seed = 0  # shuffling and the held-out split
    c.data.nonfinite = "fail"  # rows with NaN/Inf: "fail" at open, or "drop" them
    c.data.verify = False  # re-read every row at open: checksums and NaN/Inf count (else a few random blocks)
    c.data.block_bytes = 1 << 19  # rows are read in contiguous pieces of about this size
    c.data.read_threads = 2  # background threads reading batches
    c.data.prefetch_batches = 4  # batches read ahead of the step
    # data.source "lm" only: the rows one shuffle window mixes (memory: rows × d_model × 4 bytes, twice:
    # one window trains while the next is computed), the rows C is estimated from, and the language
    # model (the harvest config's fields, see experiments/onthefly.py).
    c.data.shuffle_buffer_rows = 1 << 16
    c.data.scale_rows = 1 << 16
    c.data.lm = ml_collections.ConfigDict()
    c.data.synthetic = dict(
        d_model=128,
        num_features=256,  # true feature directions
        rows=262144,
        features_per_token=6.0,  # mean number of true features active per row
        power_law_exponent=1.0,  # firing probability of feature i ∝ (i+1)^-exponent
        noise_std=0.02,  # isotropic Gaussian noise, relative to a unit feature
        mean_norm=1.0,  # norm of a constant offset shared by all rows
        seed=0,
    )

    c.train = dict(
        steps=100_000,
        batch_size=4096,
        seed=0,
        lr=7e-5,
        lr_warmup_steps=1000,
        lr_warmup_start_factor=0.1,
        sparsity_warmup_steps=10_000,
        adam_b1=0.0,
        adam_b2=0.999,
        # set: θ's own β2 (its second moment), the other parameters keeping adam_b2; unset: adam_b2 for all
        adam_b2_thresholds=config_dict.placeholder(float),
        adam_eps=1e-8,
        clip_grad_norm=0.0,  # 0 = off (the papers clip nothing)
        adam_update_clip=0.0,  # > 0: each entry of Adam's direction g/√v̂ clipped to ± this, before lr (paper: 0)
        encoder_weight_decay=0.0,  # > 0: AdamW-style decoupled decay of W_enc, × lr per step (paper: 0)
        lr_decay_fraction=0.0,  # > 0: lr falls linearly to 0 over this final share of the run (paper: 0)
        decay_thresholds=True,  # False: θ keeps its lr through that decay (the L0 controller acts on θ)
        sparsity_warmup_fraction=config_dict.placeholder(float),  # set: λ warm-up over this share of steps
        # A batch whose loss or update is not finite is dropped (counted in metrics as skipped_batches)
        # instead of stopping the run at the next log step (see README, "What survives what").
        skip_nonfinite_batches=False,
        # A finite blow-up stops the run like a NaN does: a batch FVU above this (2: twice the error of
        # predicting the batch mean) after the run's logged FVU had been below a quarter of it. 0 = off.
        divergence_fvu=2.0,
    )

    # K SAEs in one jitted step on the same batches, one per λ here (same kind, width and init):
    # the data are read once for a whole λ sweep. Empty = one SAE with sae.sparsity_coefficient.
    c.stack = dict(sparsity_coefficients=())

    # distributed: call jax.distributed.initialize() (multi-host pods); also $JUMPRELU_DISTRIBUTED=1.
    c.mesh = dict(data=1, model=1, distributed=False)
    c.ckpt = dict(every_steps=1000, keep=3)
    # Metrics: metrics.jsonl always; TensorBoard event files in the workdir; wandb when a project is
    # named; firing_histogram: encode the held-out rows at each checkpoint (jumprelu/train/held_out.py).
    c.log = dict(every_steps=50, progress=True, tensorboard=True, wandb_project="", firing_histogram=True)
    return c


def set_fields(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """Sets {"section.field": value, ...} on c (in place; returns c). A field the config does not
    have is a ConfigError: a misspelt one (`sae.bandwith`) would otherwise be added and change nothing."""
    for dotted, value in values.items():
        section, _, field = dotted.partition(".")
        if section not in c or not isinstance(c[section], ml_collections.ConfigDict) or field not in c[section]:
            raise ConfigError(f"the config has no field {dotted!r} (a misspelt name would change nothing)")
        c[section][field] = value
    return c


def controller_rows(c: ml_collections.ConfigDict) -> int:
    """How many of the held-out rows the target-L0 controller reads (sae.target_l0_held_out_rows of
    a JumpReLU run with a target): reports leave them out."""
    s = c.sae
    if s.kind != "jumprelu" or s.get("target_l0") is None:
        return 0
    return int(s.get("target_l0_held_out_rows", 0) or 0)


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already (or blocked: None)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _check(ok: bool, field: str, expected: str, found) -> None:
    if not ok:
        raise ConfigError(f"config field {field} must be {expected}, found {found!r}")


# The JumpReLU fields that belong to the target-L0 controller: set without sae.target_l0 (the short
# recipe asked for without a target) they do nothing, so the same config takes a target later.
CONTROLLER_PARTS = ("batchtopk_fraction", "target_l0_held_out_rows")


def check_overrides(c: ml_collections.ConfigDict, fields) -> None:
    """Overrides (`--config.F=...`, a sweep's keys) of fields the run then ignores: refused, where
    the run would otherwise train without them and report as if it had."""
    if c.stack.sparsity_coefficients and "sae.sparsity_coefficient" in fields:
        raise ConfigError(
            "config field sae.sparsity_coefficient is not used by a stacked run: stack.sparsity_coefficients "
            f"{tuple(c.stack.sparsity_coefficients)} gives each SAE's λ; override that instead"
        )


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError on the first field that cannot work."""
    config_shape.check_fields(c.to_dict(), base_config().to_dict())
    config_shape.check_not_none(c.to_dict(), base_config().to_dict())
    config_shape.check_finite(c.to_dict())
    s, t, d = c.sae, c.train, c.data
    names = kinds.names()
    _check(s.kind in names, "sae.kind", f"one of {names}", s.kind)
    ownership.check_own_fields(s)
    # every kind reads sae.sparse (those without a sparse path as off): a typo is not silently dense
    _check(s.get("sparse", "auto") in kinds.SPARSE_MODES, "sae.sparse", f"one of {kinds.SPARSE_MODES}", s.get("sparse"))
    if s.get("sparse") == "on" and s.kind not in ("jumprelu", *ownership.TOPK_KINDS):  # the kinds with a sparse path
        _check(False, "sae.sparse", f"'auto' or 'off' (sae.kind {s.kind!r} has no sparse path)", "on")
    kinds.spec(s.kind).validate(s, _check)
    _check(isinstance(s.width, int) and s.width > 0, "sae.width", "a positive integer", s.width)
    _check(s.sparsity_coefficient >= 0, "sae.sparsity_coefficient", ">= 0", s.sparsity_coefficient)
    _check(s.compute_dtype in ("float32", "bfloat16"), "sae.compute_dtype", "'float32' or 'bfloat16'", s.compute_dtype)
    precision = s.get("matmul_precision", "default")
    _check(precision in kinds.MATMUL_PRECISIONS, "sae.matmul_precision", f"one of {kinds.MATMUL_PRECISIONS}", precision)
    _check(isinstance(t.steps, int) and t.steps > 0, "train.steps", "a positive integer", t.steps)
    for field, seed in (("train.seed", t.seed), ("data.seed", d.seed), ("data.synthetic.seed", d.synthetic.seed)):
        _check(isinstance(seed, int) and seed >= 0, field, "an integer >= 0 (numpy's seeds)", seed)
    _check(isinstance(t.batch_size, int) and t.batch_size > 0, "train.batch_size", "a positive integer", t.batch_size)
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", "finite and > 0", t.lr)
    _check(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", ">= 0", t.lr_warmup_steps)
    _check(0 < t.lr_warmup_start_factor <= 1, "train.lr_warmup_start_factor", "in (0, 1]", t.lr_warmup_start_factor)
    _check(t.sparsity_warmup_steps >= 0, "train.sparsity_warmup_steps", ">= 0", t.sparsity_warmup_steps)
    _check(0 <= t.lr_decay_fraction <= 1, "train.lr_decay_fraction", "in [0, 1]", t.lr_decay_fraction)
    dt = t.get("decay_thresholds", True)
    _check(isinstance(dt, bool), "train.decay_thresholds", "True or False", dt)
    frac = t.sparsity_warmup_fraction
    _check(frac is None or 0 <= frac <= 1, "train.sparsity_warmup_fraction", "in [0, 1] or unset", frac)
    _check(0 <= t.adam_b1 < 1, "train.adam_b1", "in [0, 1)", t.adam_b1)
    _check(0 <= t.adam_b2 < 1, "train.adam_b2", "in [0, 1)", t.adam_b2)
    b2t = t.get("adam_b2_thresholds")
    _check(b2t is None or 0 <= b2t < 1, "train.adam_b2_thresholds", "in [0, 1) or unset", b2t)
    _check(t.adam_eps > 0, "train.adam_eps", "> 0", t.adam_eps)
    _check(t.clip_grad_norm >= 0, "train.clip_grad_norm", ">= 0 (0 = off)", t.clip_grad_norm)
    uc = t.get("adam_update_clip", 0.0)
    _check(uc >= 0, "train.adam_update_clip", ">= 0 (0 = off)", uc)
    wd = t.get("encoder_weight_decay", 0.0)
    _check(math.isfinite(wd) and wd >= 0, "train.encoder_weight_decay", "finite and >= 0 (0 = off)", wd)
    limit = t.get("divergence_fvu", 0.0)
    _check(limit >= 0, "train.divergence_fvu", ">= 0 (0 = off)", limit)
    skip = t.skip_nonfinite_batches
    _check(isinstance(skip, bool), "train.skip_nonfinite_batches", "True or False", skip)
    _check(d.scale is None or d.scale > 0, "data.scale", "> 0 or unset", d.scale)
    if d.scale is not None:
        _check(d.normalize, "data.scale", "unset when data.normalize is False (the scale C is then 1)", d.scale)
    window = s.get("dead_window_tokens", 1)
    _check(isinstance(window, int) and window > 0, "sae.dead_window_tokens", "a positive integer", window)
    _check(d.nonfinite in ("fail", "drop"), "data.nonfinite", "'fail' or 'drop'", d.nonfinite)
    _check(d.block_bytes > 0, "data.block_bytes", "> 0", d.block_bytes)
    _check(d.read_threads >= 0, "data.read_threads", ">= 0", d.read_threads)
    _check(d.prefetch_batches >= 0, "data.prefetch_batches", ">= 0", d.prefetch_batches)
    # FVU divides by the rows' spread around their mean: one row has none (its FVU was ~1e30)
    _check(d.eval_rows == 0 or d.eval_rows >= 2, "data.eval_rows", "0 (no held-out report) or >= 2", d.eval_rows)
    held = s.get("target_l0_held_out_rows", 0)
    if s.kind == "jumprelu" and held and isinstance(held, int) and s.get("target_l0") is not None:
        _check(d.eval_rows >= held, "data.eval_rows", f">= sae.target_l0_held_out_rows ({held})", d.eval_rows)
    lams = c.stack.sparsity_coefficients
    _check(
        isinstance(lams, (tuple, list)) and all(isinstance(v, (int, float)) and v >= 0 for v in lams),
        "stack.sparsity_coefficients",
        "a tuple of numbers >= 0",
        lams[0] if isinstance(lams, tuple) and len(lams) == 1 and isinstance(lams[0], str) else lams,  # as typed
    )
    if lams:
        stackable = tuple(n for n in names if kinds.spec(n).stackable)
        _check(s.kind in stackable, "sae.kind", f"one of {stackable} to stack λ values", s.kind)
        _check(
            s.get("target_l0") is None, "sae.target_l0", "unset when stack.sparsity_coefficients is set", s.target_l0
        )
    for axis in ("data", "model"):
        n = c.mesh[axis]
        _check(isinstance(n, int) and (n > 0 or n == -1), f"mesh.{axis}", "a positive integer or -1", n)
    if c.mesh.data == -1 and c.mesh.model == -1:  # here too, so `jumprelu tpu run` refuses it before the workers
        raise ConfigError("config fields mesh.data and mesh.model cannot both be -1")
    _check(c.ckpt.every_steps > 0, "ckpt.every_steps", "> 0", c.ckpt.every_steps)
    _check(c.ckpt.keep > 0, "ckpt.keep", "> 0", c.ckpt.keep)
    _check(c.log.every_steps > 0, "log.every_steps", "> 0", c.log.every_steps)
    project = c.log.get("wandb_project", "")
    if project and not _installed("wandb"):  # before the step compiles, not after
        raise ConfigError(
            f"config field log.wandb_project is {project!r} but wandb is not installed: "
            "pip install 'jumprelu[wandb]' (or unset it)"
        )
    if c.log.get("tensorboard", True) and not _installed("tensorboardX"):  # a dependency, but environments vary
        raise ConfigError(
            "config field log.tensorboard is true but tensorboardX is not installed: pip install tensorboardX, "
            "or --config.log.tensorboard=False"
        )
    if d.source == "lm":
        _validate_lm(d)
    if d.source == "synthetic":
        g = d.synthetic
        _check(g.d_model > 0, "data.synthetic.d_model", "> 0", g.d_model)
        _check(g.num_features > 0, "data.synthetic.num_features", "> 0", g.num_features)
        _check(g.rows > d.eval_rows, "data.synthetic.rows", f"> data.eval_rows ({d.eval_rows})", g.rows)
        _check(
            0 < g.features_per_token <= g.num_features,
            "data.synthetic.features_per_token",
            "in (0, num_features]",
            g.features_per_token,
        )
        _check(g.noise_std >= 0, "data.synthetic.noise_std", ">= 0", g.noise_std)


# The harvest config's fields that data.lm must hold (experiments/onthefly.py copies them).
LM_FIELDS = ("model", "checkpoint", "tokenizer", "texts", "site", "layer", "seq_len", "batch_sequences")


def _validate_lm(d) -> None:
    n = d.shuffle_buffer_rows
    _check(isinstance(n, int) and n > 0, "data.shuffle_buffer_rows", "a positive integer", n)
    _check(isinstance(d.scale_rows, int) and d.scale_rows > 0, "data.scale_rows", "a positive integer", d.scale_rows)
    missing = [f for f in LM_FIELDS if f not in d.lm]
    if missing:
        raise ConfigError(
            f"config field data.lm lacks {', '.join(missing)}: data.source 'lm' needs the language model's "
            "harvest fields; use --config onthefly[:model=...,layer=...,site=...] (or onthefly:tiny=DIR)"
        )
    # (Empty checkpoint, tokenizer or texts are reported when the LM is opened, as by the harvest:
    # the packaged experiment leaves them for the command line.)
    texts = d.lm.texts
    _check(isinstance(texts, (tuple, list)), "data.lm.texts", "a tuple of files", texts)
    _check(isinstance(d.lm.seq_len, int) and d.lm.seq_len >= 2, "data.lm.seq_len", "an integer >= 2", d.lm.seq_len)
    b = d.lm.batch_sequences
    _check(isinstance(b, int) and b > 0, "data.lm.batch_sequences", "a positive integer", b)

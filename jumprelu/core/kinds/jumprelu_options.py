"""The JumpReLU kind's config: its `sae.*` fields with their defaults, their validation, and
the loss options they resolve to (`Recipe`, with the state they need). The module is in
`jumprelu.py`, its loss in `jumprelu_loss.py`, the choice of the sparse or the dense step in
`jumprelu_step_plan.py`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from ml_collections import config_dict

from jumprelu.core import init as init_lib
from jumprelu.core import sparsity
from jumprelu.core.kinds.jumprelu_step_plan import batchtopk_phase, sparse_plan

THRESHOLD_PARAMS = ("log", "raw")
BANDWIDTH_MODES = ("absolute", "relative")


def spared_latents(allowance: float, width: int) -> int:
    """How many latents the frequency penalty spares: ⌊allowance · width⌋ (0.29 · 100 is 29, not 28),
    at least 1 when the allowance is set, so a recipe's allowance works at any width."""
    return max(1, math.floor(allowance * width + 1e-9)) if allowance else 0


def validate(s, check) -> None:
    check(s.bandwidth > 0, "sae.bandwidth", "> 0", s.bandwidth)
    check(s.bandwidth_mode in BANDWIDTH_MODES, "sae.bandwidth_mode", f"one of {BANDWIDTH_MODES}", s.bandwidth_mode)
    check(s.threshold_init > 0, "sae.threshold_init", "> 0", s.threshold_init)
    check(s.threshold_param in THRESHOLD_PARAMS, "sae.threshold_param", "'log' or 'raw'", s.threshold_param)
    check(
        s.target_l0 is None or 0 < s.target_l0 < s.width,
        "sae.target_l0",
        f"in (0, sae.width={s.width}) or unset",
        s.target_l0,
    )
    check(
        math.isfinite(s.target_l0_rate) and s.target_l0_rate > 0,
        "sae.target_l0_rate",
        "finite and > 0",
        s.target_l0_rate,
    )
    check(s.target_l0_gain >= 0, "sae.target_l0_gain", ">= 0", s.target_l0_gain)
    floor = s.get("target_l0_lambda_floor", 0.0)
    check(math.isfinite(floor) and floor >= 0, "sae.target_l0_lambda_floor", "finite and >= 0 (0 = off)", floor)
    held = s.target_l0_held_out_rows
    ok = isinstance(held, int) and not isinstance(held, bool) and held >= 0
    check(ok, "sae.target_l0_held_out_rows", "an integer >= 0 (0 = off)", held)
    check(s.sparsity_loss in sparsity.LOSSES, "sae.sparsity_loss", f"one of {sparsity.LOSSES}", s.sparsity_loss)
    if s.sparsity_loss in ("quadratic", "quadratic_rows"):
        needs = f"set when sae.sparsity_loss is {s.sparsity_loss!r}"
        check(s.target_l0 is not None, "sae.target_l0", needs, s.target_l0)
    check(s.tanh_scale > 0, "sae.tanh_scale", "> 0", s.tanh_scale)
    check(s.frequency_penalty >= 0, "sae.frequency_penalty", ">= 0", s.frequency_penalty)
    check(0 < s.frequency_limit <= 1, "sae.frequency_limit", "in (0, 1]", s.frequency_limit)
    allowance = s.get("frequency_allowance", 0.0)
    check(0 <= allowance < 1, "sae.frequency_allowance", "in [0, 1)", allowance)
    if allowance:
        needs = "0 unless sae.frequency_penalty > 0 (it spares latents from that penalty)"
        check(s.frequency_penalty > 0, "sae.frequency_allowance", needs, allowance)
    check(s.pre_act_coefficient >= 0, "sae.pre_act_coefficient", ">= 0", s.pre_act_coefficient)
    check(s.b_dec_init in init_lib.B_DEC_INITS, "sae.b_dec_init", f"one of {init_lib.B_DEC_INITS}", s.b_dec_init)
    modes = init_lib.THRESHOLD_INITS
    check(s.threshold_init_mode in modes, "sae.threshold_init_mode", f"one of {modes}", s.threshold_init_mode)
    if s.threshold_init_mode != "constant":
        check(s.target_l0 is not None, "sae.target_l0", "set when sae.threshold_init_mode is from data", s.target_l0)
    check(s.encoder_init_scale > 0, "sae.encoder_init_scale", "> 0", s.encoder_init_scale)
    bf = s.batchtopk_fraction
    check(0 <= bf <= 1, "sae.batchtopk_fraction", "in [0, 1]", bf)
    if bf and s.target_l0 is not None:
        check(
            s.target_l0 < s.width, "sae.target_l0", "below sae.width when sae.batchtopk_fraction > 0 (k)", s.target_l0
        )
    check(isinstance(s.ste_pre_activations, bool), "sae.ste_pre_activations", "True or False", s.ste_pre_activations)
    if batchtopk_phase(s):  # the phase fires at the batch's threshold: θ trains only in its shadow
        why = "with a BatchTopK phase (its forward fires at the batch's threshold, not at θ; "
        why += "set sae.batchtopk_fraction=0)"
        check(s.sparsity_loss != "tanh", "sae.sparsity_loss", f"'step' or a quadratic {why}", "tanh")
        check(not s.ste_pre_activations, "sae.ste_pre_activations", f"False {why}", True)
    capacity_rule = ">= 0 (0: 8 × sae.target_l0, at least width/64)"
    check(s.sparse_capacity >= 0, "sae.sparse_capacity", capacity_rule, s.sparse_capacity)
    if s.sparse == "on":
        check(s.sparsity_loss != "tanh", "sae.sparsity_loss", "'step' or a quadratic with sae.sparse=on", "tanh")
        check(not s.matryoshka_widths, "sae.matryoshka_widths", "empty with sae.sparse=on", s.matryoshka_widths)
        ste = s.ste_pre_activations
        check(not ste, "sae.ste_pre_activations", "False with sae.sparse=on (it trains z outside the active set)", ste)
        check(
            bool(s.sparse_capacity or s.target_l0),
            "sae.sparse_capacity",
            "> 0 (or sae.target_l0 set) with sae.sparse=on",
            s.sparse_capacity,
        )
    widths = tuple(s.matryoshka_widths or ())
    integers = all(isinstance(w, int) and not isinstance(w, bool) for w in widths)
    check(
        not widths or (integers and list(widths) == sorted(set(widths)) and widths[0] > 0 and widths[-1] == s.width),
        "sae.matryoshka_widths",
        f"increasing integer prefix sizes ending at sae.width={s.width}",
        widths,
    )
    weights = tuple(s.get("matryoshka_weights", ()) or ())
    check(
        not weights
        or (
            len(weights) == len(widths)
            and all(isinstance(w, (int, float)) and w >= 0 for w in weights)
            and sum(weights) > 0
        ),
        "sae.matryoshka_weights",
        f"empty or {len(widths)} weights >= 0 (one per sae.matryoshka_widths entry) with a positive sum",
        weights,
    )


def config_fields() -> dict:
    return dict(
        bandwidth=0.001,  # ε of the rectangle kernel, on the normalised scale
        bandwidth_mode="absolute",  # "relative": ε = bandwidth × (moving median over latents of std z)
        threshold_init=0.001,
        threshold_param="log",  # "log" (paper) or "raw"
        # True: the straight-through terms at θ also reach z, so W_enc and b_enc learn from rows near
        # the threshold (Anthropic 2025); paper: False, the jump trains θ only
        ste_pre_activations=False,
        # > 0: this first share of the steps trains as BatchTopK (k = target_l0: every θ is the batch's
        # k·B-th largest z), then hands over to per-latent θ (Gemma Scope 2 converted BatchTopK SAEs);
        # part of the target-L0 controller: no phase without a target_l0
        batchtopk_fraction=0.0,
        # A requested mean L0; λ then adapts to reach it (make_loss): log λ = I + gain·clip(log(L0/target),
        # ±1), I starting at log sparsity_coefficient and moving by rate·log(L0/target) per step.
        target_l0=config_dict.placeholder(float),
        target_l0_rate=0.01,
        target_l0_gain=0.5,
        # > 0: anti-wind-up: the controller's I never goes below log(floor · mean ‖x − x̂‖² / target),
        # the λ at which the L0 term at the target is this share of the batch's squared error. Without
        # it, I can fall for as long as L0 stays below the target whatever λ does (the BatchTopK phase:
        # to 1e-9, from an equilibrium near 1e-3) and then takes hundreds of steps to come back.
        target_l0_lambda_floor=0.0,
        # > 0 (and a target_l0): the controller aims the L0 of rows the SAE never trains on at the target: this many of
        # the store's held-out rows (data.eval_rows), 128 of them a step, give a
        # moving ratio of held-out to batch L0 that scales the batch L0 it reads. A run that revisits
        # its rows fits θ to them, and its L0 on new text then lands above the target (README
        # "Controlling L0"; measured in benchmarks/results/fidelity_history.md).
        target_l0_held_out_rows=0,
        # "step" (paper), "quadratic" (Gemma Scope 2) or "quadratic_rows" (per row; both need target_l0), "tanh"
        sparsity_loss="step",
        tanh_scale=4.0,  # c of the tanh loss
        frequency_penalty=0.0,  # μ: penalise latents firing on more than frequency_limit of tokens
        frequency_limit=0.1,
        # share of the width the frequency penalty spares: the batch's most frequent latents, which may
        # stay dense (0: none, as in Gemma Scope 2)
        frequency_allowance=0.0,
        pre_act_coefficient=0.0,  # ν: pre-activation loss on latents dead for dead_window_tokens
        b_dec_init="zeros",  # "zeros" (paper), "mean", "median" (geometric) of a data sample
        threshold_init_mode="constant",  # or "latent_quantile" / "global_quantile": initial L0 = target_l0
        encoder_init_scale=1.0,  # W_enc = scale · W_decᵀ at init
        matryoshka_widths=(),  # nested prefixes, e.g. (1024, 4096, 16384); last = width
        # each prefix's share of the reconstruction loss (normalised to sum 1); empty: equal shares
        matryoshka_weights=(),
        # The sparse step (core/sparse.py): same numbers, cost ≈ one dense product + O(B·L0·d).
        sparse="auto",  # "auto" (where measured faster), "on" or "off"
        sparse_capacity=0,  # top-k slots per row (active + lower kernel window); 0: 8 × target_l0, ≥ width/64
    )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The loss options of the `sae` config section (defaults: the paper's)."""

    sparsity_loss: str = "step"
    target_l0: float | None = None
    target_rate: float = 0.01
    target_gain: float = 0.5
    lambda_floor: float = 0.0  # > 0: I kept >= log(lambda_floor · mean squared error / target)
    held_out_rows: int = 0  # > 0: the controller reads the batch L0 times the held-out/batch L0 ratio
    tanh_scale: float = 4.0
    frequency_penalty: float = 0.0
    frequency_limit: float = 0.1
    frequency_spared: int = 0  # the batch's most frequent latents left out of the frequency penalty
    pre_act_coefficient: float = 0.0
    dead_window_tokens: int = 10_000_000
    bandwidth: float = 0.001
    bandwidth_mode: str = "absolute"
    matryoshka_widths: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()  # one per width; normalised here, equal shares if empty
    batchtopk_steps: int = 0  # > 0: the first steps train as BatchTopK with k = target_l0
    sparse_capacity: int = 0  # > 0: the sparse step keeping this many entries per row (0: dense)

    def __post_init__(self):
        if self.held_out_rows and self.target_l0 is None:
            raise ValueError("Recipe.held_out_rows > 0 needs a target_l0 (the controller that reads them)")
        # the one place the prefixes' shares are settled, however the Recipe was made
        weights = self.matryoshka_weights or (1.0,) * len(self.matryoshka_widths)
        object.__setattr__(self, "matryoshka_weights", _normalised(weights) if weights else ())

    @classmethod
    def from_config(cls, s, train_steps: int = 0) -> Recipe:
        return cls(
            sparsity_loss=s.get("sparsity_loss", "step"),
            target_l0=s.get("target_l0"),
            target_rate=s.get("target_l0_rate", 0.01),
            target_gain=s.get("target_l0_gain", 0.5),
            lambda_floor=s.get("target_l0_lambda_floor", 0.0),
            held_out_rows=s.get("target_l0_held_out_rows", 0) if s.get("target_l0") is not None else 0,
            tanh_scale=s.get("tanh_scale", 4.0),
            frequency_penalty=s.get("frequency_penalty", 0.0),
            frequency_limit=s.get("frequency_limit", 0.1),
            frequency_spared=spared_latents(s.get("frequency_allowance", 0.0), s.width),
            pre_act_coefficient=s.get("pre_act_coefficient", 0.0),
            dead_window_tokens=s.get("dead_window_tokens", 10_000_000),
            bandwidth=s.get("bandwidth", 0.001),
            bandwidth_mode=s.get("bandwidth_mode", "absolute"),
            matryoshka_widths=tuple(s.get("matryoshka_widths", ()) or ()),
            matryoshka_weights=tuple(s.get("matryoshka_weights", ()) or ()),
            batchtopk_steps=batchtopk_steps(s, train_steps),
            sparse_capacity=sparse_plan(s)[0],
        )


def batchtopk_steps(s, train_steps: int) -> int:
    """How many steps train as BatchTopK (0: no phase); at least 1 when on, so the state has its
    step counter even where train_steps is not given."""
    share = batchtopk_phase(s)
    return max(1, round(share * train_steps)) if share else 0


def _normalised(weights) -> tuple[float, ...]:
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def init_stats(recipe: Recipe, width: int, initial_lambda: float, d_model: int = 0) -> dict:
    """The non-gradient state the options need (none for the paper's recipe)."""
    stats = {}
    if recipe.target_l0 is not None:
        stats["log_lambda"] = jnp.asarray(math.log(max(initial_lambda, 1e-9)), jnp.float32)
    if recipe.held_out_rows:
        if d_model <= 0:
            raise ValueError("init_stats: d_model is needed for the controller's held-out rows")
        # the rows (normalised; set from the store's held-out split at the start), where the next
        # slice starts, and moving averages of the held-out and batch L0 (their ratio corrects λ)
        stats["held_out_rows"] = jnp.zeros((recipe.held_out_rows, d_model), jnp.float32)
        stats["held_out_next"] = jnp.zeros((), jnp.int32)
        stats["held_out_l0"] = jnp.zeros((), jnp.float32)
        stats["batch_l0"] = jnp.zeros((), jnp.float32)
    if recipe.bandwidth_mode == "relative":
        stats["z_scale"] = jnp.ones((), jnp.float32)  # set from data at the start (init_from_data)
    if recipe.pre_act_coefficient > 0:
        stats["tokens_since_fired"] = jnp.zeros((width,), jnp.int32)
    if recipe.batchtopk_steps:
        stats["steps_seen"] = jnp.zeros((), jnp.int32)
    return stats

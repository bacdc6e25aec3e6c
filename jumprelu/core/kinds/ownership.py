"""Which `sae` fields only some kinds read, so that one set on another kind is refused by name
(`check_own_fields`, run by `config.validate`) instead of ignored, and a sweep that switches kind
from its base gives each run its own kind's defaults (`reset_other_kinds_options`)."""

from __future__ import annotations

from jumprelu.core import kinds
from jumprelu.errors import ConfigError

# The `sae` fields only JumpReLU reads (its loss options and the recipe's): set for another kind
# they would be ignored, and the run would not be the one asked for.
JUMPRELU_ONLY = (
    "target_l0",
    "target_l0_rate",
    "target_l0_gain",
    "target_l0_lambda_floor",
    "target_l0_held_out_rows",
    "sparsity_loss",
    "tanh_scale",
    "batchtopk_fraction",
    "frequency_penalty",
    "frequency_limit",
    "frequency_allowance",
    "pre_act_coefficient",
    "matryoshka_widths",
    "matryoshka_weights",
    "threshold_init_mode",
    "b_dec_init",
    "ste_pre_activations",
    "bandwidth_mode",
    "sparse_capacity",  # TopK's sparse decoder has no capacity: it gathers exactly k (or the batch's) per row
)

# The `sae` fields only TopK and BatchTopK read: `sae.k` set on a JumpReLU run would otherwise
# be ignored while the run trains to another L0. (JumpReLU's threshold_init, bandwidth and
# threshold_param are left out of JUMPRELU_ONLY on purpose: base configs such as the quickstart set
# them, no other kind trains differently for them, and refusing them would make every kind switch
# from such a base on the command line name three fields to put back.)
TOPK_ONLY = ("k", "aux_k", "aux_coefficient", "batchtopk_threshold_decay")
TOPK_KINDS = ("topk", "batchtopk")
BUILT_IN_KINDS = ("jumprelu", "relu", "gated", "topk", "batchtopk")  # (each has its smollm2_pareto config)


def other_kinds_fields(kind: str) -> tuple[tuple[str, str, dict], ...]:
    """(field, owner, defaults) for every `sae` field that only another kind than `kind` reads (a
    registered kind that declares the field itself, e.g. its own `k`, reads it)."""
    own = set(kinds.spec(kind).config_fields()) if kind in kinds.names() else set()
    groups = []
    if kind != "jumprelu":
        groups.append(("jumprelu", JUMPRELU_ONLY))
    if kind not in TOPK_KINDS:
        groups.append(("topk", TOPK_ONLY))
    out = []
    for owner, fields in groups:
        defaults = kinds.spec(owner).config_fields()
        out.extend((field, owner, defaults) for field in fields if field not in own)
    return tuple(out)


def reset_other_kinds_options(c, keep=frozenset()) -> None:
    """Puts the fields only other kinds read (but those in `keep`) back to their defaults: a sweep
    over kinds on a base config made for one kind (e.g. the JumpReLU recipe) runs each other kind as
    that kind, not with options it would refuse."""
    for field, _owner, defaults in other_kinds_fields(c.sae.kind):
        if field not in keep:
            c.sae[field] = defaults[field]


def check_own_fields(s) -> None:
    """Raises ConfigError when the `sae` section `s` sets a field only another kind reads."""
    for field, owner, defaults in other_kinds_fields(s.kind):
        value = s.get(field, defaults[field])
        if value != defaults[field] and not (isinstance(value, (tuple, list)) and not value):
            if owner == "jumprelu":
                readers = "only sae.kind 'jumprelu' reads it"
                hint = " (TopK's L0 is sae.k)" if field == "target_l0" and s.kind in TOPK_KINDS else ""
            else:
                readers = "only sae.kind 'topk' and 'batchtopk' read it"
                hint = " (JumpReLU's L0 is sae.target_l0)" if field == "k" and s.kind == "jumprelu" else ""
            # the usual cause: a kind switched on the command line from a base config made for another
            example = f" (an experiment's config for that kind, e.g. smollm2_pareto:{s.kind}, leaves it unset)"
            # the action must be one a flag can take: `=None` unsets a placeholder, others go back to their default
            default = defaults[field]
            default = default.get() if hasattr(default, "get") else default  # a placeholder's value: None
            undo = f"unset it (--config.sae.{field}=None)" if default is None else f"set it back to {default!r}"
            raise ConfigError(
                f"config field sae.{field} is {value!r} but {readers} and sae.kind is {s.kind!r}{hint}; "
                f"{undo}{example if s.kind in BUILT_IN_KINDS else ''}, or set sae.kind={owner!r}"
            )

"""The shape of a config, before any field's value is checked (`config.validate`): every field of
the base config there and no other, None only where the base config allows it, and every number
finite."""

from __future__ import annotations

import math

from jumprelu.errors import ConfigError

# sections a config may carry beyond the base config's fields: the on-the-fly LM's (data.lm)
_OPEN_SECTIONS = ("data.lm",)


def flat_fields(config: dict, prefix: str = "") -> dict:
    """{"sae.width": 64, ...}: a (to_dict'ed or saved) config's leaves by their dotted names."""
    out = {}
    for key, value in config.items():
        out.update(flat_fields(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_fields(have: dict, base: dict, prefix: str = "") -> None:
    """Every field of the base config is there, and no other: an experiment file's misspelt field
    (`c.sae.widht = 64`) was added and ignored, and `--config.sae={...}` (which replaces the whole
    section) was a traceback at the first field it dropped."""
    for key, value in base.items():
        if key not in have:
            raise ConfigError(
                f"config field {prefix}{key} is missing (an override of a whole section, "
                f"--config.{prefix.split('.')[0] or key}=..., replaces every field in it)"
                if prefix
                else f"config section {key} is missing"
            )
        if isinstance(value, dict) and isinstance(have[key], dict) and f"{prefix}{key}" not in _OPEN_SECTIONS:
            check_fields(have[key], value, f"{prefix}{key}.")
    for key in have:
        if key not in base and prefix and f"{prefix}{key}" not in _OPEN_SECTIONS:
            raise ConfigError(
                f"config field {prefix}{key} is not one the config has (a misspelt name would change nothing)"
            )


def check_not_none(have: dict, base: dict, prefix: str = "") -> None:
    """None (`--config.FIELD=None`) only in a field whose base value is None (a placeholder, 'unset'):
    elsewhere it was a TypeError deep in a check, or, in a True/False field, read as False."""
    for key, value in base.items():
        if isinstance(value, dict) and isinstance(have.get(key), dict):
            check_not_none(have[key], value, f"{prefix}{key}.")
        elif value is not None and have.get(key, value) is None:
            default = "a section of fields" if isinstance(value, dict) else repr(value)
            raise ConfigError(f"config field {prefix}{key} cannot be unset (None); its default is {default}")


def check_finite(tree: dict, prefix: str = "") -> None:
    """Every number in the config is finite: inf and NaN pass `> 0`-style checks or slip past them."""
    for key, value in tree.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict):
            check_finite(value, f"{field}.")
            continue
        numbers = value if isinstance(value, (tuple, list)) else [value]
        for v in numbers:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config field {field} must be finite, found {value!r}")

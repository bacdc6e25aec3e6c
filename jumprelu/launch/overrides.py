"""`--config.FIELD=V` overrides, read exactly as `jumprelu train` reads them (ml_collections' flag
parser, which reads each value as its field's type), and their errors as one line."""

from __future__ import annotations

from jumprelu.errors import ConfigError


def config_error_message(error: Exception, argv: list[str]) -> str:
    """One line for an error raised while the flags load config files and apply overrides.

    ml_collections answers `--config.train.foo=1` with a KeyError inside an AttributeError:
    that becomes "flag --config.train.foo=1: the config has no field train.foo".
    """
    original = error
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
        error = error.args[0]
    key, _, hint = str(error.args[0] if error.args else error).partition("\n")
    key = key.strip("'\"")
    for a in argv:
        name = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        flag, _, path = name.partition(".")
        if path and key in path.split("."):
            hint = f" ({hint[0].lower()}{hint[1:]})" if hint else ""
            return f"flag {a}: the {flag} has no field {path}{hint}"
    # The config files given (experiments are resolved to paths before parsing; a path need not end in .py).
    files = " ".join(a for a in argv if a.startswith(("--config=", "--lm=")))
    first = str(original).strip().splitlines()[0] if str(original).strip() else ""
    if isinstance(original, AttributeError) and "attribute 'get_config'" in first:  # named its module config_config
        return f"{files}: the experiment file has no get_config(arg) (see jumprelu/experiments/quickstart.py)"
    return f"{files}: {type(original).__name__}: {first}".lstrip(": ")


def take_unsets(argv: list[str], flags=("config", "lm")) -> tuple[list[str], list[tuple[str, str]]]:
    """argv without its `--FLAG.FIELD=None` arguments, and those (flag, field) pairs: ml_collections
    reads a value as its field's type, so a float field's `None` was refused and a placeholder (such
    as sae.target_l0) could not be unset from the command line. They are applied after parsing (`unset`)."""
    kept, unsets = [], []
    for a in argv:
        name, sep, value = a.partition("=")
        flag, _, path = name.removeprefix("--").partition(".")
        if a.startswith("--") and sep and value == "None" and flag in flags and path:
            unsets.append((flag, path))
        else:
            kept.append(a)
    return kept, unsets


def unset(cfg, flag: str, path: str) -> None:
    """Sets cfg's field at `path` (dotted) to None; a field it does not have is a one-line ConfigError."""
    *sections, field = path.split(".")
    node = cfg
    for name in sections:
        node = node.get(name) if hasattr(node, "get") else None
    if node is None or not hasattr(node, "get") or field not in node:
        raise ConfigError(f"flag --{flag}.{path}=None: the {flag} has no field {path}")
    node[field] = None


def fields(argv) -> set[str]:
    """The config fields `--config.FIELD=V` (or `--config.FIELD V`) arguments set, dashed names read
    as underscored, as `apply` and `jumprelu train` read them."""
    flags = (a.partition("=")[0] for a in argv if a.startswith("--config."))
    return {f.removeprefix("--config.").replace("-", "_") for f in flags}


def apply(cfg, extra: list[str]):
    """cfg with the `--config.FIELD=V` arguments in `extra` applied as `jumprelu train` applies
    them (`=false` for a bool, a float field's `=abc` refused, dashed names read as underscored);
    a one-line ConfigError for what it would refuse."""
    if not extra:
        return cfg
    from absl import flags
    from ml_collections import config_flags

    extra, unsets = take_unsets(list(extra), flags=("config",))
    argv = ["jumprelu"]
    for a in extra:
        name, sep, value = a.partition("=")
        argv.append("--" + name.removeprefix("--").replace("-", "_") + sep + value)
    flag_values = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_dict("config", cfg, flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
    except flags.Error as e:
        raise ConfigError(" ".join(str(e).split())) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # an unknown field, a value of another type
        raise ConfigError(config_error_message(e, argv[1:])) from None
    for flag, path in unsets:
        unset(holder.value, flag, path)
    return holder.value

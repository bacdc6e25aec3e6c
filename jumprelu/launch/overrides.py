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
    return f"{files}: {type(original).__name__}: {first}".lstrip(": ")


def apply(cfg, extra: list[str]):
    """cfg with the `--config.FIELD=V` arguments in `extra` applied as `jumprelu train` applies
    them (`=false` for a bool, a float field's `=abc` refused, dashed names read as underscored);
    a one-line ConfigError for what it would refuse."""
    if not extra:
        return cfg
    from absl import flags
    from ml_collections import config_flags

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
    return holder.value

"""What every command shares: one flag style, experiment resolution, one error line."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from typing import NoReturn

from jumprelu.errors import EXIT_USER_ERROR, PREFIX, ConfigError

EXIT_INTERRUPTED = 128 + 2  # the shell's status for a process ended by SIGINT
# Write failures the user's machine causes (not the program): reported in one line, not a traceback.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def fail(message) -> int:
    """Prints the one error line and returns the exit status for it (the error's own, if it has one)."""
    print(f"{PREFIX} {message}", file=sys.stderr)
    return getattr(message, "exit_status", EXIT_USER_ERROR)


def environment_failure(error: OSError, resume: str) -> int | None:
    """A full disk, a read-only or forbidden path, as one line naming the file (None for any other
    OSError, which is a bug to show whole); `resume` says what running the command again does."""
    if error.errno not in _ENVIRONMENT_ERRNOS:
        return None
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = f"; free some space and run the same command again: {resume}" if full else ""
    where = f"{error.filename}: " if error.filename else ""  # a buffered write's error names no file
    return fail(f"{where}{error.strerror}{hint}")


def resumable_failure(error: BaseException, resume: str) -> int | None:
    """Ctrl-C or a full disk in a command that resumes: its exit status after one line; None for
    an error that is a bug (the caller re-raises it)."""
    if isinstance(error, KeyboardInterrupt):
        return interrupted(resume)
    return environment_failure(error, resume) if isinstance(error, OSError) else None


def interrupted(resume: str) -> NoReturn:
    """Ctrl-C: one line saying how to carry on, and the shell's SIGINT status.

    The process ends here rather than through the interpreter's teardown: a Ctrl-C during
    start-up lands while XLA compiles on threads of its own, and the teardown racing them
    segfaulted (exit 139, 2 of 3 tries at 2.5-3 s into `jumprelu train`). Nothing is lost by
    skipping it: every file is written atomically and the run resumes from its last checkpoint.
    """
    print(f"jumprelu: interrupted; run the same command again: {resume}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def underscore_flags(argv: list[str]) -> list[str]:
    """`--dry-run` -> `--dry_run`, and absl's single-dash spelling `-config=X` -> `--config=X` (which
    the config flags are looked for as); flag names only: values, positionals and `-1` are left alone."""
    out = []
    for a in argv:
        if len(a) > 2 and a[0] == "-" and a[1].isalpha():
            a = "-" + a
        if a.startswith("--") and len(a) > 2:
            name, sep, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + sep + value
        out.append(a)
    return out


def pop_flag(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """Removes `--name=V` / `--name V` from argv; returns (rest, V or None)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == f"--{name}" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return rest, value


def resolve_config_flags(argv: list[str], flags: tuple[str, ...] = ("config",)) -> list[str]:
    """Rewrites `--config=NAME[:arg]` to the experiment file's path (see launch.experiment.resolve),
    after taking `--experiments_dir` out of argv."""
    from jumprelu.launch import experiment

    argv, experiments_dir = pop_flag(argv, "experiments_dir")
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        for flag in flags:
            if a == f"--{flag}" and i + 1 < len(argv):
                a, i = f"--{flag}={argv[i + 1]}", i + 1
            if a.startswith(f"--{flag}="):
                name, arg = experiment.split(a.split("=", 1)[1])
                path = experiment.resolve(name, experiments_dir)
                a = f"--{flag}={path}" + (f":{arg}" if arg is not None else "")
        out.append(a)
        i += 1
    for flag in flags:  # absl keeps the last silently, or fails on an override as "defined twice"
        given = [a.split("=", 1)[1] for a in out if a.startswith(f"--{flag}=")]
        if len(given) > 1:
            raise ValueError(f"--{flag} is given {len(given)} times ({', '.join(given)}); give one experiment")
    return out


def define_experiments_dir_flag(module_name: str) -> None:
    """`--experiments_dir` in the `--help` of `module_name`'s command (`flags_help`); only there:
    `resolve_config_flags` has already taken it out of argv."""
    from absl import flags

    help_text = "Folder where experiment names (--config, --lm) are looked up first (or $JUMPRELU_EXPERIMENTS_DIR)."
    flags.DEFINE_string("experiments_dir", None, help_text, module_name=module_name)


def quiet_libraries(flag_values) -> None:
    """Library INFO logs (orbax's, absl's) off unless --verbosity was given; ours stay on."""
    import logging as std_logging

    from absl import logging

    if not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        # A failed checkpoint write or read makes orbax log a traceback per thread (16 for one full
        # disk); jumprelu reports the same failure as one line (train/checkpoint.py), so these go.
        std_logging.getLogger("absl").addFilter(_no_orbax_tracebacks)
        # ...and its abandoned saves' asyncio reports ("Future exception was never retrieved" with
        # the RESOURCE_EXHAUSTED dump, "coroutine ... was never awaited"): jumprelu runs no asyncio
        # of its own, and the failure is the one line
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    std_logging.getLogger("jumprelu").setLevel(std_logging.INFO)


def quiet_orbax_teardown() -> None:
    """A damaged checkpoint makes orbax abandon its other reads, and each abandoned coroutine is
    reported at garbage collection as "Exception ignored in" with a tensorstore spec (up to ~300
    lines, after our one error line), and tensorstore's threads, finishing the abandoned reads,
    report "Event loop is closed" from the loop orbax has shut (a traceback each, before the
    warning that names the damaged checkpoint). Commands drop exactly those reports."""
    import inspect

    previous = sys.unraisablehook

    def unraisable(report):
        code = getattr(report.object, "cr_code", None) if inspect.iscoroutine(report.object) else None
        if code is not None and "/orbax/" in code.co_filename.replace("\\", "/"):
            return
        if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
            return
        previous(report)

    sys.unraisablehook = unraisable


def _no_orbax_tracebacks(record) -> bool:
    return not (record.levelno >= 40 and "/orbax/" in record.pathname.replace("\\", "/"))


def flag_error_line(error: Exception) -> str:
    """absl's flag error as one line.

    ml_collections re-raises a ValueError from an experiment's get_config (a bad `:arg`, say)
    with the whole traceback in its message; the line that matters is the exception's own, and
    for this project's errors the message alone (the type is in the module path).
    """
    text = str(error)
    marker = "Error whilst parsing config file:"
    if marker not in text or "Traceback (most recent call last)" not in text:
        # absl gives one line per failed flag (`jumprelu train` alone: --config and --workdir)
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    head = text.split(marker, 1)[0].rstrip()
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    kind, sep, message = last.partition(": ")
    if sep and kind.startswith("jumprelu.errors."):
        last = message
    return f"{head} {last}"


def _missing_config_line(error: Exception, argv: list[str]) -> str | None:
    """For `--config.train.steps=3` without `--config EXPERIMENT`: absl calls the field an unknown
    flag, since a config's fields become flags only once its file is given."""
    from absl import flags

    name = getattr(error, "flagname", "") or ""
    head = name.split(".", 1)[0]
    if "." not in name or head not in flags.FLAGS or any(a.startswith(f"--{head}=") for a in argv):
        return None
    return f"flag --{name} sets a field of --{head}, which is not given (e.g. --{head} quickstart)"


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def flags_help(module_name: str) -> str:
    """The command's module docstring (its usage) and the flags that module defines, one a line.

    absl's own --help is defined by app.run, after our parse, and would print the usage of
    whatever `__main__` is, so the absl commands answer --help here instead.
    """
    from absl import flags

    doc = (sys.modules[module_name].__doc__ or "").strip()
    lines = [doc, "", "flags:"]
    for flag in sorted(flags.FLAGS.get_flags_for_module(module_name), key=lambda f: f.name):
        default = "" if flag.default is None else f" (default: {flag.default})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    lines.append("  --verbosity: library logging level (default: warnings only; ours stay on)")
    return "\n".join(lines)


def absl_run(main, argv: list[str], program: str) -> int:
    """Runs an absl main with our argv (program name first); flag errors become one line.
    `--help` prints the usage of the module that defines `main` and its flags, and runs nothing."""
    from absl import app, flags

    from jumprelu.launch import overrides

    if wants_help(argv):
        print(flags_help(main.__module__))
        return 0
    argv, unsets = overrides.take_unsets(underscore_flags([program, *argv]))
    # ml_collections reads a config's overrides from sys.argv, not from the argv parsed: it must
    # see the underscored spellings too (--config.train.lr-warmup-steps=2)
    was, sys.argv = sys.argv, argv
    try:
        rest = flags.FLAGS(argv)[1:]  # what is not a flag: absl hands it back, and it was dropped
    except flags.Error as e:
        return fail(f"{program}: {_missing_config_line(e, argv) or flag_error_line(e)}")
    except Exception as e:  # loading a config file runs the user's code: its error is theirs, in one line
        return fail(f"{program}: {overrides.config_error_message(e, argv)}")
    finally:
        sys.argv = was
    if rest:  # `config.sae.width=64` without its dashes trained the default width
        return fail(f"{program}: unexpected argument {rest[0]!r} (flags start with --)")
    try:  # `--config.sae.target_l0=None`: unset after the config loaded
        for flag, path in unsets:
            if flag not in flags.FLAGS or flags.FLAGS[flag].value is None:
                return fail(f"{program}: flag --{flag}.{path}=None: no --{flag} config to unset it in")
            overrides.unset(flags.FLAGS[flag].value, flag, path)
    except ConfigError as e:
        return fail(f"{program}: {e}")
    quiet_orbax_teardown()
    app.run(lambda _: main(), argv=[program], flags_parser=lambda a: a)
    return 0

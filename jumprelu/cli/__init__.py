"""The `jumprelu` command: one console script, one subcommand per job.

  jumprelu train     --config quickstart --workdir DIR [--config.sae.width=4096 ...]
  jumprelu evaluate  --workdir DIR [--member i] [--lm HARVEST_CONFIG]
  jumprelu harvest   --config harvest/gemma2:tiny=/tmp/tiny,site=resid,layer=1
  jumprelu store     convert ACTS.npy STORE | summary STORE [--verify]
  jumprelu export    WORKDIR OUT [--format gemma-scope] [--member i] [--step N]
  jumprelu refit     --workdir DIR [--rows N] [--ridge R] [--member i]
  jumprelu plan      --config quickstart --topology v5p-16 [--config.sae.width=131072]
  jumprelu sweep     quickstart --dry_run | --local [--parallel N] [--root DIR]
  jumprelu tpu       create|setup|run|status|logs|watch|delete NAME --zone Z --project P ...

`python -m jumprelu CMD ...` is the same. Flags are spelled with underscores (`--dry_run`);
the dashed spelling is accepted too. Experiments (`--config`, `sweep`) are a path, a name in
`--experiments_dir` (or $JUMPRELU_EXPERIMENTS_DIR), or one of the packaged examples
(`jumprelu/experiments/`); `tpu --sweep` takes a packaged name or a path inside the checkout
(its workers get the checkout's files). Bad input ends with one line `jumprelu: error: ...`
and exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from jumprelu import errors

COMMANDS = {
    "train": "train an SAE (or resume it) from an experiment config",
    "evaluate": "held-out metrics of a trained SAE, optionally delta LM loss",
    "harvest": "Gemma activations at one or more sites into activation stores",
    "store": "convert a .npy into an activation store, or validate and summarise one",
    "export": "write a trained SAE in another format (Gemma Scope params.npz)",
    "refit": "least-squares decoder for a trained SAE's own codes (encoder, L0 unchanged)",
    "plan": "compile the train step for a TPU slice on fake devices: memory, FLOPs, time",
    "sweep": "expand an experiment's sweep; list, run or summarise its runs",
    "tpu": "Cloud TPU slices: create, set up, run, watch, delete (wraps gcloud)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "usage: jumprelu COMMAND [flags]   (jumprelu COMMAND --help for its flags)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    errors.catch_ctrl_c()  # Ctrl-C then still stops a command whose KeyboardInterrupt Python dropped
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at the interpreter's exit
        return code
    except KeyboardInterrupt:  # Ctrl-C while the command's modules import: nothing has started yet
        from jumprelu.cli.common import interrupted

        interrupted("nothing had started")
    except BrokenPipeError:  # `jumprelu store summary S | head -1`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe stopped


def main_of(command: str) -> None:
    """Runs `jumprelu COMMAND` with this process's arguments, then exits (a command module run as
    `python -m jumprelu.cli.COMMAND`)."""
    sys.exit(main([command, *sys.argv[1:]]))


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"jumprelu: error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jumprelu.cli.{command}")
    return module.run(rest) or 0

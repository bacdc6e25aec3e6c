"""Experiment files and their sweeps: loading, argument parsing, expansion into named runs.

An experiment file (a path, a name in an experiments directory, or one of the packaged examples
in `jumprelu/experiments/`) defines
  get_config(arg)  -> the ml_collections config of one run
  get_sweep(arg)   -> a list of override dicts {"sae.sparsity_coefficient": 1e-3, ...} (optional;
                      without it the experiment is a single run)
  kind_config(arg, kind) -> the config a run of another `sae.kind` than get_config's starts from,
                      in a sweep over kinds (optional; without it the base config is used with its
                      JumpReLU-only fields reset, so a recipe's train.* fields would carry over)
`arg` is the text after the colon in `EXPERIMENT:arg`: comma-separated words and key=value pairs,
for example "jumprelu,runlocal" or "site=mlp,layer=20". `parse_arg` turns it into a dict.

`expand` gives one `Run` per override dict, each with a workdir name built from its overrides, so
rerunning a sweep finds its earlier runs (finished ones have `report.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import math
import os
import re
from typing import Any

import ml_collections

from jumprelu.config import check_overrides, validate
from jumprelu.core import kinds
from jumprelu.core.kinds.ownership import reset_other_kinds_options
from jumprelu.errors import ConfigError

# The examples shipped inside the package, so a `pip install .` can run them from any directory.
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
EXPERIMENTS_DIR_ENV = "JUMPRELU_EXPERIMENTS_DIR"


def parse_arg(arg: str | None, known: tuple[str, ...] | None = None, name: str = "experiment") -> dict[str, Any]:
    """'a,b=3,c=x' -> {'a': True, 'b': 3, 'c': 'x'} (numbers parsed, words become flags).

    known: the words the experiment `name` reads (`runlocal`, which `expand` handles for every
    experiment, always counts); any other is a ConfigError, so a typo cannot silently fall back to
    a default (`recipe:target_l0=50` for `recipe:l0=50`). None accepts anything.
    """
    out: dict[str, Any] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        out[key.strip()] = parse_value(value.strip()) if sep else True
    unknown = [k for k in out if known is not None and k not in (*known, "runlocal")]
    if unknown:
        expected = ", ".join(sorted({*known, "runlocal"}))
        raise ConfigError(f"{name} argument {unknown[0]!r} is not one it reads; expected one of {expected}")
    return out


def flag(args: dict[str, Any], key: str, name: str = "experiment") -> bool:
    """Whether flag word `key` is on: given bare, or as key=true/false. Any other value is a
    ConfigError, so `stacked=no` cannot switch it on by being a non-empty word."""
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} argument {key} is a flag: give {key} or {key}=true|false, found {key}={value}")
    return value


def number(args: dict[str, Any], key: str, default, name: str = "experiment", cast=float):
    """args[key] as a number (cast), or default when absent; a word there is a ConfigError naming it."""
    if key not in args:
        return default
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} argument {key} must be a number ({key}=N), found {value!r}")
    if not math.isfinite(value):  # int(inf) is an OverflowError, int(nan) a ValueError
        raise ConfigError(f"{name} argument {key} must be a finite number, found {value!r}")
    if cast is int and value != int(value):
        raise ConfigError(f"{name} argument {key} must be an integer, found {value!r}")
    return cast(value)


def choice(args: dict[str, Any], key: str, options, default, name: str = "experiment"):
    """args[key] when it is one of `options`, default when absent; anything else is a ConfigError."""
    value = args.get(key, default)
    if value not in options:
        raise ConfigError(f"{name} argument {key} must be one of {', '.join(map(str, options))}, found {value!r}")
    return value


def parse_value(text: str):
    """An int, a float, true/false, or the text itself (an `:arg` value, a summary cell)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def resolve(experiment: str, experiments_dir: str | None = None) -> str:
    """The path of an experiment file, looked up in order as
    1. a path to a file (`experiments/quickstart.py`, `/abs/my_exp.py`),
    2. a name in `experiments_dir` (else $JUMPRELU_EXPERIMENTS_DIR) with or without `.py`,
    3. a name among the packaged examples (`quickstart`, `harvest/gemma2`).
    """
    if os.path.isfile(experiment):
        return experiment
    name = experiment.removesuffix(".py") + ".py"
    own = experiments_dir or os.environ.get(EXPERIMENTS_DIR_ENV)
    if own and not os.path.isdir(own):  # a misspelt folder quietly ran the packaged experiment of that name
        where = "--experiments_dir" if experiments_dir else f"${EXPERIMENTS_DIR_ENV}"
        raise ConfigError(f"{where} {own}: no such directory (expected the folder of your experiment files)")
    dirs = list(dict.fromkeys(d for d in (own, EXPERIMENTS_DIR) if d))
    for d in dirs:
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate):
            return candidate
    known = sorted(
        os.path.relpath(os.path.join(root, f), EXPERIMENTS_DIR)[:-3]
        for root, _, files in os.walk(EXPERIMENTS_DIR)
        for f in files
        if f.endswith(".py") and not f.startswith("_")
    )
    raise ConfigError(
        f"no experiment {experiment!r}: not a file, not in {' or '.join(dirs)}; packaged ones: {', '.join(known)}"
    )


def load(experiment: str, experiments_dir: str | None = None):
    """Imports an experiment file (path or name, see `resolve`) as a module."""
    path = resolve(experiment, experiments_dir)
    name = "jumprelu_experiment_" + re.sub(r"\W", "_", os.path.basename(path).removesuffix(".py"))
    # any file name, as `--config` reads it: a path not ending in .py got no loader (an AttributeError)
    loader = importlib.machinery.SourceFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    with user_code(f"experiment {path}"):
        loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment {path} has no get_config(arg)")
    return module


@contextlib.contextmanager
def user_code(what: str):
    """An error raised by an experiment file's own code (a syntax error, a name it misspelt) as one
    ConfigError line naming the file; the ConfigErrors of the helpers it calls pass unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{what}: {type(e).__name__}: {first}".rstrip(": ")) from None


def split(spec: str) -> tuple[str, str | None]:
    """'name:arg' -> ('name', 'arg'); 'name' -> ('name', None)."""
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of cfg with dotted fields set; an unknown field is a ConfigError naming it."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    for dotted, value in overrides.items():
        node = out
        *path, last = dotted.split(".")
        for part in path:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"override {dotted!r}: the config has no section {part!r}")
            node = node[part]
        if last not in node:
            raise ConfigError(f"override {dotted!r}: the config has no field {last!r}")
        try:
            node[last] = value
        except TypeError as e:  # ml_collections refuses a value of another type than the field's
            raise ConfigError(f"override {dotted!r}: {e}") from None
    return out


def run_name(overrides: dict[str, Any]) -> str:
    """A readable, filesystem-safe, unique name: 'sae.kind=topk,sae.k=32' -> 'kind=topk_k=32'."""
    if not overrides:
        return "run"
    parts = []
    for dotted, value in overrides.items():
        parts.append(f"{dotted.split('.')[-1]}={_short(value)}")
    return re.sub(r"[^\w=.+-]", "-", "_".join(parts))


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "+".join(_short(v) for v in value)
    if isinstance(value, str) and "/" in value:
        return value.rstrip("/").rsplit("/", 1)[-1]  # a store path: its last component names it
    return str(value)


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.name) if not root.startswith("gs://") else f"{root.rstrip('/')}/{self.name}"


def expand(module, arg: str | None = None) -> list[Run]:
    """The experiment's runs: one per override dict of get_sweep(arg), or the single base config.

    With `runlocal` in arg, each run is shrunk after its overrides (same runs, same names, CPU
    sizes): by the experiment's own `runlocal(cfg)` if it has one, else by `sweeps.runlocal`.
    """
    name = getattr(module, "__file__", None) or getattr(module, "__name__", "the experiment")
    with user_code(f"{name}: get_config"):
        base = module.get_config(arg)
    require_training(base, name)
    sweep = sweep_overrides(module, arg, name)
    shrink = None
    if flag(parse_arg(arg), "runlocal"):
        shrink = getattr(module, "runlocal", runlocal)
    runs = []
    for o in sweep:
        cfg = apply_overrides(base, o)
        if cfg.sae.kind != base.sae.kind and hasattr(module, "kind_config"):  # that kind's own config
            cfg = apply_overrides(module.kind_config(arg, cfg.sae.kind), o)
        elif cfg.sae.kind != base.sae.kind:  # the base kind's own options are not this run's: their defaults
            reset_other_kinds_options(cfg, keep={k.removeprefix("sae.") for k in o})
        cfg = shrink(cfg) if shrink else cfg
        try:  # a run that cannot start is named here, not after the sweep's earlier runs trained
            check_overrides(cfg, o)
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep run {run_name(o)}: {e}") from None
        runs.append(Run(run_name(o), dict(o), cfg))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"sweep has runs with the same overrides (workdir names {duplicates})")
    return runs


def sweep_overrides(module, arg: str | None, name: str) -> list[dict[str, Any]]:
    """get_sweep(arg)'s override dicts, checked: a dict of lists (a grid) or an empty list gave a
    traceback or "0 runs"; without get_sweep, the one base run, unless a near-miss name
    (get_sweeps) says the sweep was meant and would silently have been one run."""
    if not hasattr(module, "get_sweep"):
        # functions of the file's own whose name says sweep (get_sweeps, getsweep), not its other helpers
        own = [n for n, f in vars(module).items() if callable(f) and getattr(f, "__module__", None) == module.__name__]
        near = [n for n in own if "sweep" in n.lower() and n.lower().lstrip("_").startswith(("get", "sweep"))]
        if near:
            raise ConfigError(f"{name} has {near[0]}() but no get_sweep(arg): rename it to sweep its runs")
        return [{}]
    with user_code(f"{name}: get_sweep"):
        sweep = module.get_sweep(arg)
        if not isinstance(sweep, (dict, str, bytes)) and hasattr(sweep, "__iter__"):
            sweep = list(sweep)  # a tuple or a generator of dicts is a list of runs too
    if not isinstance(sweep, list) or not all(isinstance(o, dict) for o in sweep):
        found = type(sweep).__name__ if not isinstance(sweep, list) else "a list holding other than dicts"
        raise ConfigError(
            f"{name}: get_sweep must return a list of override dicts ([{{'sae.width': 4096}}, ...]), found {found}"
        )
    if not sweep:
        raise ConfigError(f"{name}: get_sweep returned no runs (an empty list)")
    return sweep


def require_training(cfg, name: str) -> None:
    """A one-line ConfigError when an experiment's config is not a training run's (a harvest's)."""
    if not all(field in cfg for field in ("data", "sae", "train")):
        what = "jumprelu harvest --config" if "model" in cfg or "sites" in cfg else "jumprelu train"
        raise ConfigError(
            f"{name}: not a training experiment (its config has no data, sae and train fields); is it for `{what}`?"
        )


def runlocal(c: ml_collections.ConfigDict, keep_data: bool = False) -> ml_collections.ConfigDict:
    """Shrinks any experiment to a CPU smoke test of seconds: same kind and recipe, tiny sizes.

    keep_data: keep `data.source` (a small local store); otherwise train on the built-in
    synthetic data, since the experiment's store (often gs://) is not reachable from a laptop.
    """
    if not keep_data:
        c.data.source = "synthetic"
        c.data.d_model = None  # taken from the synthetic data
        c.data.synthetic.update(d_model=32, num_features=64, rows=8192)
    elif c.data.source == "synthetic":  # its shape kept, its rows cut: 20 steps read 5,120 of them
        c.data.synthetic.rows = min(c.data.synthetic.rows, 8192)
    c.data.eval_rows = 1024
    if c.sae.get("target_l0_held_out_rows"):  # leaves the report most of the 1,024 held-out rows
        c.sae.target_l0_held_out_rows = 256
    c.sae.width = 256
    if c.sae.kind in kinds.names() and "k" in kinds.spec(c.sae.kind).config_fields():  # others refuse a k
        # k is kept: a sweep's runs named k=32 and k=128 must train those k (capping k made them one
        # run); the width grows instead where k needs it
        c.sae.width = max(c.sae.width, 2 * c.sae.k)
        c.sae.aux_k = min(c.sae.aux_k, 64)
    c.train.update(steps=20, batch_size=256, lr_warmup_steps=5, sparsity_warmup_steps=10)
    c.ckpt.keep = 2
    c.mesh.update(data=1, model=1, distributed=False)
    c.ckpt.every_steps = 10
    c.log.every_steps = 5
    return c

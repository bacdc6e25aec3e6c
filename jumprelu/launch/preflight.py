"""What `jumprelu tpu` checks here before anything reaches gcloud: the job each worker will run
(its experiment, argument, overrides and every run's config), and the checkout `setup` copies."""

from __future__ import annotations

import os

from jumprelu.errors import ConfigError


def checkout() -> str:
    """The jumprelu checkout this package runs from (what `setup` copies to the workers, whatever
    the current directory); a ConfigError when it was installed from a wheel, not a clone."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above jumprelu/
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        raise ConfigError(f"tpu setup copies the jumprelu checkout, but jumprelu runs from {root}: use a git clone")
    return root


def _as_the_workers_see_it(name: str) -> str:
    """The experiment file the workers will load for `name`: they run in their copy of the checkout,
    so a path is read relative to the checkout, whatever this shell's directory."""
    try:
        root = checkout()
    except ConfigError:  # installed from a wheel: nothing is copied, the name is read as here
        return name
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
        if os.path.isfile(name):
            inside = os.path.relpath(os.path.realpath(name), os.path.realpath(root))
            where = "outside this checkout" if inside.split(os.sep)[0] == ".." else f"in the checkout as {inside}"
            raise ConfigError(
                f"experiment {name}: a path {where}; the workers run in their copy of the checkout "
                "`tpu setup` made: put the file in it and give its path relative to it"
            )
    elif os.path.isfile(os.path.join(root, name)):
        return os.path.join(root, name)
    elif os.path.isfile(name):  # a file here, not in the checkout the workers get
        raise ConfigError(
            f"experiment {name}: a file in {os.getcwd()} but not in the checkout {root} the workers get; "
            "put it in the checkout and give its path relative to it"
        )
    return name  # a packaged experiment's name, looked up by check_job


def check_job(config: str | None, sweep: str | None, extra: list[str] = (), harvest: bool = False) -> None:
    """Loads the experiment (or harvest config) a run names, reads its argument, applies the
    `--config.FIELD=V` overrides and validates each run's config, as the workers will: a
    ValueError (ConfigError) names what is wrong. An experiment given as a path must lie in this
    checkout, relative to it: the workers run `tpu setup`'s copy of it, nothing else of this machine."""
    from jumprelu.config import check_overrides, validate
    from jumprelu.launch import experiment, overrides

    name, arg = experiment.split(config or sweep)
    # a name among the packaged experiments only: the workers' environment has no $JUMPRELU_EXPERIMENTS_DIR
    module = experiment.load(_as_the_workers_see_it(name), experiments_dir=experiment.EXPERIMENTS_DIR)
    if sweep:
        experiment.expand(module, arg)  # validates each run
        return
    cfg = overrides.apply(module.get_config(arg), list(extra))
    if not harvest:  # a harvest config is checked by the harvest itself, before its model loads
        check_overrides(cfg, overrides.fields(extra))  # as `jumprelu train` checks them
        validate(cfg)

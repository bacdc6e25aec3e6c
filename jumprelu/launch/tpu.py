"""Cloud TPU: create a slice through queued resources, set it up, run a run or a sweep, watch, delete.

  jumprelu tpu create  NAME --accelerator v5p-16 --zone us-east5-a --project P [--spot]
  jumprelu tpu setup   NAME --zone ... --project ... [--mount_bucket BUCKET]
  jumprelu tpu run     NAME --zone ... --project ... --sweep quickstart --workdir gs://B/runs/q
  jumprelu tpu run     NAME ... --config quickstart --workdir gs://B/runs/one
  jumprelu tpu run     NAME ... --harvest harvest/gemma2:model=gemma2_9b,... --config.store=/gcs/B/stores/...
  jumprelu tpu status  NAME --zone ... --project ...
  jumprelu tpu logs    NAME --zone ... --project ... [--worker 0]
  jumprelu tpu watch   NAME --accelerator ... --zone ... --project ... --sweep ... --workdir gs://...
  jumprelu tpu delete  NAME --zone ... --project ...

Every subcommand wraps `gcloud`; `--dry_run` prints the exact commands instead of running them.
`setup` copies the working tree of the checkout it runs in (every file git tracks or would
track, committed or not; what .gitignore excludes stays behind) to every worker and installs it
with the tested versions (`pip install -c constraints.txt -e '.[tpu]'`). `run` starts the same command on every worker
(multi-host: JUMPRELU_DISTRIBUTED=1 makes each process call jax.distributed.initialize()),
in the background, logging to ~/jumprelu.log (the job holds ~/jumprelu.lock while it lives: a
worker whose job is alive does not start a second copy). Workdirs on gs:// hold the checkpoints, so a
preempted run resumes where it stopped when it is started again; `watch` does that by itself:
it polls the queued resource and, when a spot slice was preempted, deletes it, creates it
again, sets it up and restarts the same run (finished sweep runs are skipped, others resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time

from jumprelu import errors
from jumprelu.errors import ConfigError
from jumprelu.launch.preflight import check_job, checkout

# Runtime (TPU VM image) per generation, from the Cloud TPU docs.
RUNTIMES = {
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Chips per host and how the slice name counts (TensorCores for v3/v4/v5p, chips for v5e/v6e).
_CHIPS_PER_HOST = {"v3": 4, "v4": 4, "v5p": 4, "v5litepod": 4, "v6e": 4}
_NAME_UNITS_PER_CHIP = {"v3": 2, "v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}
# v5e and v6e slices of up to 8 chips (-1, -4, -8) are one host holding all of them; larger ones
# are made of 4-chip hosts.
_SINGLE_HOST_CHIPS = {"v5litepod": 8, "v6e": 8}
REMOTE_DIR = "~/jumprelu"
LOG = "~/jumprelu.log"
# Each worker's job holds this lock while it lives (flock; released when it exits, whatever the
# cause), so `run` and `watch` never start a second copy, and a reused pid or a zombie cannot pass
# for the job.
LOCK = "~/jumprelu.lock"
_ALIVE = f"! flock -n {LOCK} true"  # true on a worker whose job holds the lock


def accelerator_type(name: str) -> str:
    """The slice type as gcloud names it: v5e slices are v5litepod-N there ('v5e-8' -> 'v5litepod-8')."""
    generation, _, size = name.rpartition("-")
    return f"v5litepod-{size}" if generation == "v5e" else name


def parse_accelerator(name: str) -> tuple[str, int]:
    """'v5p-16' -> ('v5p', 2): the generation and the number of hosts (VMs) of the slice."""
    generation, _, size = accelerator_type(name).rpartition("-")
    if generation not in RUNTIMES or not size.isdigit():
        raise ConfigError(f"--accelerator {name!r}: expected GENERATION-SIZE with generation in {sorted(RUNTIMES)}")
    units = _NAME_UNITS_PER_CHIP[generation]
    if int(size) % units:  # v5p-7 was taken for 3 chips, as `jumprelu plan` refuses it
        per_chip = f"{generation} names count TensorCores, {units} per chip"
        raise ConfigError(f"--accelerator {name!r}: {per_chip}: expected a multiple of {units}")
    chips = int(size) // units
    if chips <= _SINGLE_HOST_CHIPS.get(generation, 0):
        return generation, 1
    return generation, max(1, chips // _CHIPS_PER_HOST[generation])


@dataclasses.dataclass
class Gcloud:
    name: str
    zone: str
    project: str
    dry_run: bool = False

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]

    def run(self, cmd: list[str], check: bool = True, capture: bool = False) -> str:
        print("$ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return ""
        out = subprocess.run(cmd, check=check, text=True, capture_output=capture)
        return out.stdout if capture else ""

    def create(self, accelerator: str, spot: bool, reserved: bool, runtime: str | None) -> None:
        generation, _ = parse_accelerator(accelerator)
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", self.name, f"--node-id={self.name}"]
        cmd += self._where() + [
            f"--accelerator-type={accelerator_type(accelerator)}",
            f"--runtime-version={runtime or RUNTIMES[generation]}",
        ]
        cmd += ["--spot"] if spot else ["--reserved"] if reserved else []
        self.run(cmd)

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(), f"--worker={worker}"]
        return base + [f"--command={command}"]

    def setup(self, mount_bucket: str | None, extras: str = "tpu") -> None:
        archive = "/tmp/jumprelu-src.tar.gz"
        # The working tree as it is (uncommitted edits included), not HEAD: what you run here is
        # what runs there.
        pack = "git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf " + archive
        self.run(["bash", "-c", f"set -o pipefail && cd {shlex.quote(checkout())} && {pack}"])
        scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{self.name}:~/jumprelu-src.tar.gz"]
        self.run(scp + self._where() + ["--worker=all"])
        install = (
            f"mkdir -p {REMOTE_DIR} && tar -xzf ~/jumprelu-src.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
            "python3 -m venv .venv && .venv/bin/pip install -q -U pip && "
            f".venv/bin/pip install -q -c constraints.txt -e '.[{extras}]'"
        )
        self.run(self.ssh(install))
        if mount_bucket:  # stores are memory-mapped: read them through a gcsfuse mount at /gcs/BUCKET
            mount = (
                "(command -v gcsfuse || (echo 'deb https://packages.cloud.google.com/apt "
                "gcsfuse-$(lsb_release -cs) main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list && "
                "curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
                "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) && "
                f"sudo mkdir -p /gcs/{mount_bucket} && sudo chown $USER /gcs/{mount_bucket} && "
                f"gcsfuse --implicit-dirs {mount_bucket} /gcs/{mount_bucket}"
            )
            self.run(self.ssh(mount))

    def start(
        self, config: str | None, sweep: str | None, workdir: str, extra: list[str], harvest: str | None = None
    ) -> None:
        if harvest:  # every host harvests its share into its own part of the stores (jumprelu.harvest.run)
            job = ["-m", "jumprelu", "harvest", f"--config={harvest}"]
        elif sweep:
            job = ["-m", "jumprelu", "sweep", sweep, "--local", "--root", workdir]
        else:
            job = ["-m", "jumprelu", "train", f"--config={config}", f"--workdir={workdir}"]
        job = shlex.join([".venv/bin/python", *job, *extra])
        # the check only spares the log: of two starts racing past it, the second's flock exits at once
        launch = f"JUMPRELU_DISTRIBUTED=1 nohup flock -n {LOCK} {job} > {LOG} 2>&1 &"
        skip = f'echo "# the job is already running on $(hostname) (it holds {LOCK}); not starting another"'
        self.run(self.ssh(f"cd {REMOTE_DIR} && if {_ALIVE}; then {skip}; else {launch} fi"))  # `&` ends launch

    def running(self) -> bool:
        """Whether the job is alive on every worker (ssh --worker=all fails when any command does):
        a watcher started on a slice that `run` already started leaves it alone."""
        print(f"$ {shlex.join(self.ssh(_ALIVE))}", flush=True)
        if self.dry_run:
            return False
        return subprocess.run(self.ssh(_ALIVE), capture_output=True).returncode == 0

    def state(self) -> str:
        """The queued resource's state; NOT_FOUND only when gcloud says so, UNKNOWN when describe
        failed otherwise (an expired token, the network): the watcher must not delete a healthy slice."""
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self._where()]
        cmd += ["--format=value(state.state)"]
        print("$ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return "ACTIVE"
        out = subprocess.run(cmd, text=True, capture_output=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
        if "NOT_FOUND" in out.stderr or "not found" in out.stderr.lower():
            return "NOT_FOUND"
        print(f"# describe failed (rc {out.returncode}): {(out.stderr.strip().splitlines() or [''])[-1]}", flush=True)
        return "UNKNOWN"

    def status(self) -> None:
        self.run(["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self._where()], check=False)

    def logs(self, worker: str) -> None:
        self.run(self.ssh(f"tail -n 200 -f {LOG}", worker=worker), check=False)

    def delete(self) -> None:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self._where()]
        self.run(cmd + ["--force", "--quiet"], check=False)


def main(argv: list[str]) -> int:
    p = errors.ArgumentParser(
        prog="jumprelu tpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=("create", "setup", "run", "status", "logs", "watch", "delete"))
    p.add_argument("name", help="queued resource and TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--accelerator", help="slice type, e.g. v5p-16 (2 hosts), v5litepod-8, v6e-16")
    p.add_argument("--runtime", help="TPU VM image (default: the generation's)")
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible; use watch)")
    capacity.add_argument("--reserved", action="store_true", help="capacity from a reservation")
    p.add_argument("--mount_bucket", help="setup: mount this bucket at /gcs/BUCKET with gcsfuse on every worker")
    job = p.add_mutually_exclusive_group()
    job.add_argument("--config", help="run: an experiment (name or path, with :arg), run by jumprelu train")
    job.add_argument("--sweep", help="run: an experiment sweep (EXPERIMENT[:arg]), run by jumprelu sweep")
    job.add_argument("--harvest", help="run: a harvest config (harvest/gemma2:...), run by jumprelu harvest")
    p.add_argument("--workdir", help="run: gs:// workdir (or sweep root)")
    p.add_argument("--extras", default="tpu", help="setup: the pip extras to install (the harvest: tpu,gemma)")
    p.add_argument("--worker", default="0", help="logs: which worker's log")
    p.add_argument("--poll_s", type=int, default=120, help="watch: seconds between state checks")
    p.add_argument("--dry_run", action="store_true", help="print the gcloud commands instead of running them")
    args, extra = p.parse_known_args(argv)
    # Only config overrides go on to the remote job: a misspelt flag must fail here, not there.
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (only --config.FIELD=VALUE overrides are passed on)")
    if extra and args.sweep:
        p.error("--config.FIELD overrides go with --config, not --sweep (a sweep's runs set their own)")
    g = Gcloud(args.name, args.zone, args.project, args.dry_run)

    def need(*fields):
        missing = [f"--{f}" for f in fields if not getattr(args, f)]
        if missing:
            p.error(f"{args.command} needs {' '.join(missing)}")

    if args.mount_bucket and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]", args.mount_bucket):
        # a gs:// URL or a path made `/gcs/gs://b` and an unquoted shell word on every worker
        p.error(f"--mount_bucket {args.mount_bucket!r}: expected a bucket name (my-bucket), not a URL or path")
    if args.command in ("create", "watch"):
        need("accelerator")
        generation, hosts = parse_accelerator(args.accelerator)
        print(f"# {args.accelerator}: {hosts} host{'s' if hosts > 1 else ''}, runtime {RUNTIMES[generation]}")
    if args.command in ("run", "watch"):
        if not args.harvest:  # a harvest writes stores named by its config, no workdir
            need("workdir")
        if not (args.config or args.sweep or args.harvest):
            p.error(f"{args.command} needs --config, --sweep or --harvest")
        try:  # a misspelt experiment or argument fails here, not on every worker
            check_job(args.config or args.harvest, args.sweep, extra, harvest=bool(args.harvest))
        except ValueError as e:
            p.error(str(e))
    try:
        return _dispatch(args, g, extra)
    except subprocess.CalledProcessError as e:
        print(
            f"{errors.PREFIX} jumprelu tpu: {_command(e)} failed (rc {e.returncode}); gcloud's output is above",
            file=sys.stderr,
        )
        return 1
    except FileNotFoundError as e:
        print(f"{errors.PREFIX} jumprelu tpu: {e.filename} not found: install the Google Cloud SDK", file=sys.stderr)
        return 1


def _command(error: subprocess.CalledProcessError) -> str:
    """The failed command as a shell line."""
    return shlex.join(error.cmd) if isinstance(error.cmd, list) else str(error.cmd)


def _dispatch(args, g: Gcloud, extra: list[str]) -> int:
    if args.command == "create":
        g.create(args.accelerator, args.spot, args.reserved, args.runtime)
    elif args.command == "setup":
        g.setup(args.mount_bucket, args.extras)
    elif args.command == "run":
        g.start(args.config, args.sweep, args.workdir, extra, args.harvest)
    elif args.command == "status":
        g.status()
    elif args.command == "logs":
        g.logs(args.worker)
    elif args.command == "delete":
        g.delete()
    elif args.command == "watch":
        while True:
            try:
                state = g.state()
                if state in ("NOT_FOUND", "SUSPENDED", "FAILED", "SUSPENDING"):
                    print(f"# {args.name} is {state}: recreating it; the run resumes from its gs:// checkpoints")
                    g.delete()
                    g.create(args.accelerator, args.spot, args.reserved, args.runtime)
                    state = "WAITING"
                if state == "ACTIVE" and not getattr(g, "_started", False):
                    if g.running():  # set up and started before this watcher: leave its code and job alone
                        print(f"# {args.name} is ACTIVE with the job running on every worker: watching", flush=True)
                    else:  # workers whose job is alive keep it (start skips them); the others start
                        g.setup(args.mount_bucket, args.extras)
                        g.start(args.config, args.sweep, args.workdir, extra, args.harvest)
                    g._started = True
                if state not in ("ACTIVE", "UNKNOWN"):  # a failed describe says nothing about the job
                    g._started = False
            except subprocess.CalledProcessError as e:  # workers still booting, a quota: try again next poll
                print(f"# {_command(e)} failed (rc {e.returncode}); retrying in {args.poll_s} s", flush=True)
            if args.dry_run:
                break
            time.sleep(args.poll_s)
    return 0

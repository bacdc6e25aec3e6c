"""`jumprelu.load(path)`: a trained SAE in raw activation units, in plain JAX on CPU."""

from __future__ import annotations

import json
import logging
import operator
import os
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jumprelu import fs
from jumprelu.core import kinds
from jumprelu.core.folded import SAE, fold
from jumprelu.errors import CheckpointError, ConfigError, WorkdirError
from jumprelu.export import gemma_scope, gemma_scope_2, saelens
from jumprelu.train import guard
from jumprelu.train.checkpoint import MEMBER_FILE, Checkpointer, checkpoint_dir, member_dir
from jumprelu.train.failures import reason

_RELISTS = 20  # listings tried while a running training keeps deleting the step being read
# a step found damaged is listed again for up to 5 × 0.2 s: a rotation deletes a step's items before its folder
_DELETION_POLLS, _DELETION_POLL_S = 5, 0.2
log = logging.getLogger("jumprelu")


def load(path: str | os.PathLike, step: int | None = None, member: int | None = None) -> SAE:
    """Restores the SAE of a training workdir (latest checkpoint unless `step` is given).

    A run with K stacked SAEs (config `stack`) holds one SAE per λ: pass `member=i`, or load
    its member directory WORKDIR/sae-i directly. Released layouts load too, by what `path` holds:
    a Gemma Scope `params.npz`, a SAELens directory (cfg.json + sae_weights.safetensors), a
    Gemma Scope 2 folder (params.safetensors + config.json, or the params.safetensors itself).
    Without `step`, a damaged newest checkpoint (unreadable, or holding NaN/Inf) is skipped
    with a warning saying why, and the next older one loads; a damaged `step` is a
    `CheckpointError`.
    """
    path = os.fspath(path)
    if "://" not in path:  # as a shell would: load("~/runs/x") is the researcher's home
        path = os.path.expanduser(path)
    step, member = _index(step, "step"), _index(member, "member")
    released = _released_format(path)
    if released is not None:
        if step is not None or member is not None:
            raise ValueError(f"{path}: step and member apply to training workdirs, not to a released SAE file")
        with jax.default_device(_host_device()):  # as a workdir's: the CPU, not an accelerator's memory
            return released.load(path)
    path, member = resolve(path, member)
    if os.path.isfile(path):
        raise ValueError(
            f"{path}: a file, but not a released SAE (.npz, .safetensors) this can read; "
            "a training workdir is a directory"
        )
    if "://" not in path and not os.path.exists(path):  # was "no checkpoints/ directory" of a path that is not there
        raise FileNotFoundError(f"{path}: no such directory; expected a jumprelu training workdir")
    if "://" not in path and not os.path.isdir(checkpoint_dir(path)):
        raise FileNotFoundError(f"{path}: no checkpoints/ directory; expected a jumprelu training workdir")
    ckpt = _open_checkpoints(path)
    try:
        if step is not None:
            return _load_step(ckpt, path, step, member)
        if not ckpt.steps():
            raise FileNotFoundError(f"{checkpoint_dir(path)}: holds no complete checkpoint")
        damaged, tried = [], set()
        for _ in range(_RELISTS):
            for candidate in [s for s in ckpt.steps() if s not in tried]:
                try:
                    return _load_step(ckpt, path, candidate, member)
                except (CheckpointError, FileNotFoundError) as e:
                    if _rotated_away(ckpt, candidate):  # a run training on deleted it (ckpt.keep) as we read
                        break
                    tried.add(candidate)
                    damaged.append(str(e))
                    log.warning("%s; trying the previous checkpoint", e)
            else:
                break
        if not damaged:
            gone = f"each checkpoint read was deleted by the run training into it, {_RELISTS} times; try again"
            raise CheckpointError(f"{checkpoint_dir(path)}: {gone}")
        raise CheckpointError(f"{checkpoint_dir(path)}: no intact checkpoint ({'; '.join(damaged)})")
    finally:
        ckpt.close()


def _open_checkpoints(path: str) -> Checkpointer:
    """The read-only Checkpointer of a workdir; orbax lists the steps as it opens, and a step the
    running training deletes in that moment was a raw FileNotFoundError: listed again."""
    for attempt in range(_RELISTS):
        try:
            return Checkpointer(path, keep=1, read_only=True)
        except FileNotFoundError:
            if attempt == _RELISTS - 1:
                raise
            time.sleep(_DELETION_POLL_S)
    raise AssertionError("unreachable")


def _rotated_away(ckpt: Checkpointer, step: int) -> bool:
    """Whether `step` is gone from a fresh listing: deleted by the training run's rotation while it
    was read (a refit or evaluate beside a running training), so the newer steps are listed again
    rather than the step called damaged. A deletion under way (its items gone, its folder not yet)
    is waited for briefly: only a step still there after that is damaged."""
    for _ in range(_DELETION_POLLS):
        ckpt.reload()
        if step not in ckpt.steps():
            return True
        time.sleep(_DELETION_POLL_S)
    return False


def _index(value, name: str) -> int | None:
    """An integer argument (numpy's too) or None; a bool, float or string is a one-line ValueError
    (they read as damaged checkpoints, or tracebacks, further in)."""
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, found {value!r}")
    return operator.index(value)


def _host_device():
    """Where a loaded SAE's arrays go: the CPU (no accelerator memory taken by a loaded SAE), or JAX's
    default device when the process has no CPU backend (JAX_PLATFORMS=cuda or tpu, as the GPU tests run)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # "Unknown backend: 'cpu' requested, but no platforms ... are present"
        return jax.devices()[0]


def _load_step(ckpt: Checkpointer, path: str, step: int, member: int | None) -> SAE:
    """The SAE at `step`; `ckpt` is a read-only Checkpointer of an unstacked layout (enough for the config)."""
    where = f"{checkpoint_dir(path)}/{step}"
    if step not in ckpt.steps():
        raise FileNotFoundError(f"{where}: no such checkpoint (complete ones: {sorted(ckpt.steps())})")
    try:
        config = ckpt.restore_config(step)
    except Exception as e:
        raise CheckpointError(f"checkpoint {where} is damaged: its config cannot be read ({reason(e)})") from None
    cfg = ml_collections.ConfigDict(config)
    lams = tuple(config.get("stack", {}).get("sparsity_coefficients", ()))
    if lams and member is None:
        raise ValueError(
            f"{path} holds {len(lams)} stacked SAEs (λ = {list(lams)}): pass member=0..{len(lams) - 1} "
            f"(--member in the commands) or load {os.path.join(path, 'sae-0')}"
        )
    if member is not None and not lams:
        raise ValueError(f"{path}: member={member} given, but this run trained one SAE, not a stack")
    if member is not None and not 0 <= member < len(lams):
        raise ValueError(f"{path}: member={member} but the run holds {len(lams)} stacked SAEs (0..{len(lams) - 1})")
    if lams:  # the stacked layout names its items sae-0 ... sae-{K-1}
        from jumprelu.train.report import member_config  # here: it imports the plots, which a load need not

        config = member_config(cfg, member).to_dict()  # as its WORKDIR/sae-i/config.json says
        ckpt = Checkpointer(path, keep=1, read_only=True, members=len(lams))
    try:
        kind = kinds.from_config(cfg.sae, cfg.data.d_model)
    except ConfigError as e:  # e.g. a kind of another version of jumprelu: say whose config it is
        raise ConfigError(f"checkpoint {where}: {e}") from None
    cpu = jax.sharding.SingleDeviceSharding(_host_device())
    on_cpu = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), tree)  # noqa: E731
    abstract = on_cpu(jax.eval_shape(kind.model.init, jax.random.key(0), jnp.zeros((1, cfg.data.d_model)))["params"])
    stats = on_cpu(jax.eval_shape(kind.init_stats))
    scale_abstract = jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu)
    try:
        params, scale, stats = ckpt.restore_sae(abstract, scale_abstract, stats, step, member=member)
    except Exception as e:
        raise CheckpointError(f"checkpoint {where} is damaged: it cannot be read ({reason(e)})") from None
    finally:
        if lams:
            ckpt.close()
    if not bool(guard.all_finite((params, scale, stats))):
        raise CheckpointError(f"checkpoint {where} is damaged: it holds NaN or Inf")
    folded = fold(kind.export(params, stats), scale, cfg.sae.pre_encoder_bias)
    # uncommitted, as the file loaders' arrays: on the CPU until used with inputs on another device,
    # which they then follow (committed to the CPU, sae(x) of an x on a GPU was a device-mismatch error)
    with jax.default_device(_host_device()):
        # (a TopK SAE's k a Python int, as the file loaders give it: hashable, JSON, a static argument)
        folded = {
            k: None if v is None else int(v) if k == "k" else jnp.asarray(np.asarray(v)) for k, v in folded.items()
        }
    return SAE(**folded, scale=float(scale), step=int(step), config=config)


def resolve(path: str, member: int | None = None) -> tuple[str, int | None]:
    """(training workdir, member): a stacked run's member directory WORKDIR/sae-i names both."""
    file = fs.join(path, MEMBER_FILE)
    if fs.exists(file):
        info = _member_info(file)
        if member is not None and member != info["member"]:
            raise ValueError(f"{path} is member {info['member']} of its stacked run; found member={member}")
        if fs.is_remote(path):  # a bucket has no "..": the member directory's parent (member.json says "..")
            return path.rstrip("/").rsplit("/", 1)[0], info["member"]
        # realpath: a symlink to a member folder (runs/best -> RUN/sae-1) names the link's folder's parent
        return os.path.normpath(os.path.join(os.path.realpath(path), info["workdir"])), info["member"]
    return path, member


def _member_info(file: str) -> dict:
    """member.json's {"member": i, "workdir": ".."}, or a one-line error naming the file."""
    expected = 'expected {"member": i, "workdir": ".."} as the stacked run writes it'
    try:
        info = json.loads(fs.read_text(file))
    except ValueError as e:
        raise WorkdirError(f"{file}: not readable JSON ({e}); {expected}") from None
    ok = isinstance(info, dict) and isinstance(info.get("member"), int) and isinstance(info.get("workdir"), str)
    if not ok or isinstance(info["member"], bool):
        raise WorkdirError(f"{file}: {expected}, found {json.dumps(info)[:120]}")
    return info


def from_workdir(sae) -> bool:
    """Whether `sae` was loaded from a training workdir (it carries the run's config), not a released file."""
    return "data" in (sae.config or {}) and "source" not in sae.config


def require_workdir(sae, path: str, command: str) -> None:
    """A one-line error when `sae` came from a released file rather than a training workdir:
    `command` needs the run's own rows."""
    from jumprelu.errors import UserError

    if not from_workdir(sae):
        raise UserError(f"{path}: {command} needs a training workdir (it reads the run's rows), not a released file")


def report_of(path: str, member: int | None = None) -> dict:
    """The end-of-run report.json of a workdir's SAE (a stacked member's own), or {} if none was written."""
    workdir, member = resolve(path, member)
    directory = workdir if member is None else member_dir(workdir, member)
    return _recorded(fs.join(directory, "report.json"))


def _recorded(file: str) -> dict:
    """A report file's JSON object; {} (with a warning naming it) when it is missing or damaged:
    what it recorded is then measured again, not failed on with a JSON error naming no file."""
    if not fs.exists(file):
        return {}
    try:
        recorded = json.loads(fs.read_text(file))
    except (OSError, ValueError) as e:
        recorded = e
    if not isinstance(recorded, dict):
        why = f"{recorded}" if isinstance(recorded, Exception) else f"a JSON {type(recorded).__name__}, not an object"
        log.warning("%s is not readable (%s): its metrics are not used", file, why)
        return {}
    return recorded


def recorded_eval(path: str, sae: SAE, member: int | None = None) -> dict:
    """The held-out metrics (l0, fvu, ...) recorded for exactly this SAE, or {} when none were:
    a workdir's report.json when its step is the SAE's, or `jumprelu refit`'s refit.json beside
    a refit params.npz (its "after" metrics)."""
    if path.endswith(".npz"):
        file = fs.join(os.path.dirname(path) or ".", "refit.json")
        refit = _recorded(file)
        same = os.path.basename(str(refit.get("params", ""))) == os.path.basename(path)
        after = refit.get("after")
        return after if same and refit.get("step") == sae.step and isinstance(after, dict) else {}
    if _released_format(path) is not None:
        return {}
    report = report_of(path, member)
    recorded = report.get("eval")
    return recorded if report.get("steps") == sae.step and isinstance(recorded, dict) else {}


def _released_format(path: str):
    """The module that reads `path` when it holds a released layout, else None (a training workdir)."""
    if path.endswith(".npz"):
        return gemma_scope
    if path.endswith(saelens.WEIGHTS):
        return saelens
    if path.endswith(".safetensors"):
        return gemma_scope_2
    if saelens.is_saelens_dir(path):
        return saelens
    if gemma_scope_2.is_gemma_scope_2_dir(path):
        return gemma_scope_2
    if not fs.is_remote(path) and os.path.isfile(path) and zipfile.is_zipfile(path):
        return gemma_scope  # an npz saved under a name without .npz (`jumprelu export RUN out`)
    return None

"""The divergence guard: a run whose loss or state stops being finite, or whose reconstruction
blows up while staying finite, stops, and saves nothing of it.

Checked at every log step and before every checkpoint (one fused reduction over the state,
compiled once, a small fraction of a step): a non-finite loss (any member of a stack) or
a NaN/Inf anywhere in the parameters, optimizer state or kind statistics raises
`Diverged`, naming the step and the last good checkpoint. Because the check runs before
every save, no checkpoint ever holds a non-finite value, and so `ckpt.keep` rotation, which
only ever deletes checkpoints older than the newest, can never delete the last finite one.

With `train.skip_nonfinite_batches` the step itself drops an update whose loss or result
is not finite (`skip_if_nonfinite`), counts it, and the guard checks only the state.

A blow-up can stay finite: a Matryoshka run at lr 3e-3 went from batch FVU 0.19 to 226 within 50
steps (L0 48 -> 920) and trained on to the end at FVU 4. `BlowUp` catches that from the batch
FVU: above `train.divergence_fvu` (2: twice the error of predicting the batch mean; an SAE
whose latents all died sits near 1) after the run's logged FVU had been below a quarter of it.
Early steps, where an untrained SAE's FVU is above 1, do not count.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jumprelu.errors import Diverged


def leaf_finite(tree) -> jax.Array:
    """[leaves] bool: whether each floating leaf of `tree` is all finite (integer leaves always are)."""
    flags = [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        for x in jax.tree.leaves(tree)
    ]
    return jnp.stack(flags) if flags else jnp.ones((0,), bool)


def all_finite(tree) -> jax.Array:
    return jnp.all(leaf_finite(tree))


def skip_if_nonfinite(new_state, old_state, loss: jax.Array):
    """Inside the step: keeps `old_state` when the update is not finite, but advances its clocks
    with the step: the optimizer's counts (the lr schedule reads its own; kept, each skipped batch
    delayed warm-up and decay by a step and the logged lr was not the applied one) and the
    BatchTopK phase's steps_seen."""
    ok = jnp.all(jnp.isfinite(loss)) & all_finite((new_state.params, new_state.opt_state, new_state.stats))
    keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
    clock_or_keep = lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer) else keep(n, o)  # noqa: E731
    stats = jax.tree.map(keep, new_state.stats, old_state.stats)
    if isinstance(stats, dict) and "steps_seen" in stats:
        stats = dict(stats, steps_seen=new_state.stats["steps_seen"])
    return new_state.replace(
        params=jax.tree.map(keep, new_state.params, old_state.params),
        opt_state=jax.tree.map(clock_or_keep, new_state.opt_state, old_state.opt_state),
        stats=stats,
        skipped=old_state.skipped + jnp.where(ok, 0, 1).astype(old_state.skipped.dtype),
    )


_leaf_finite = jax.jit(leaf_finite)


def _state_tree(state):
    return {"params": state.params, "opt_state": state.opt_state, "stats": state.stats}


def _saved_clause(good: str | None) -> str:
    """Where a stopped run can go on from: the newest complete checkpoint, or none."""
    return f"the last good checkpoint is {good}" if good else "no checkpoint was saved before it"


ALL_SKIPPED_STEPS = 100  # consecutive steps whose batches were all dropped before a run is stopped


class SkipWatch:
    """With train.skip_nonfinite_batches: stops a run that has dropped every batch for
    ALL_SKIPPED_STEPS steps in a row (it would train on nothing to the end and report success).

    Reads the `skipped_batches` counts the step logs (per SAE) at the guard's checks; a resumed
    run starts counting at its first check (its count at the checkpoint is not on the host).
    """

    def __init__(self, enabled: bool, start: int, members: int):
        self.enabled = enabled
        self.before = [0.0] * max(members, 1) if start == 0 else None
        self.streak = 0

    def check(self, per_sae: list[dict], steps: int, done: int, last_good) -> None:
        if not self.enabled:
            return
        counts = [m.get("skipped_batches", 0.0) for m in per_sae]
        if self.before is not None and steps > 0:
            all_skipped = [i for i, (c, b) in enumerate(zip(counts, self.before, strict=True)) if c - b >= steps]
            self.streak = self.streak + steps if all_skipped else 0
            if self.streak >= ALL_SKIPPED_STEPS:
                member = f" (stacked SAE {all_skipped[0]})" if len(per_sae) > 1 else ""
                saved = _saved_clause(last_good())
                raise Diverged(
                    f"training stopped at step {done}: every batch of the last {self.streak} steps was skipped as "
                    f"non-finite{member} (train.skip_nonfinite_batches=True), so nothing is being trained; {saved}; "
                    "look for a tiny data.scale, a huge λ or train.lr, or rows that are not finite"
                )
        self.before = counts


class BlowUp:
    """Each SAE's lowest logged batch FVU over the whole run, and the blow-up test against it.

    history: per SAE, the records its metrics.jsonl holds (read by process 0 only; `share` gives
    every process its values), so a resumed run keeps the lowest FVU of the interrupted one.
    Records past `start` (written after the checkpoint resumed from) are ignored. Only logged
    steps are recorded, so an interrupted run and an unbroken one decide alike.
    """

    def __init__(self, limit: float, history: list[list[dict]], start: int):
        self.limit = float(limit)
        self.start = start
        kept = [[r for r in records if r.get("step", 0) <= start and _is_number(r.get("fvu"))] for records in history]
        self.best = [min((r["fvu"] for r in records), default=math.inf) for records in kept]
        # The FVU logged at the resumed step: above the limit when that checkpoint was saved blown up
        # (by a run with the check off, or by a jumprelu without it).
        self.at_start = [next((r["fvu"] for r in records if r.get("step") == start), math.nan) for records in kept]

    def share(self) -> None:
        """Multi-host: every process takes process 0's values (a collective: call it on all)."""
        if jax.process_count() == 1:
            return
        import numpy as np
        from jax.experimental import multihost_utils

        values = multihost_utils.broadcast_one_to_all(np.asarray(self.best + self.at_start, np.float64))
        n = len(self.best)
        self.best, self.at_start = [float(v) for v in values[:n]], [float(v) for v in values[n:]]

    def problem(self, per_sae: list[dict]) -> tuple[str, bool] | None:
        """(what blew up, whether the resumed checkpoint was already past the limit), or None."""
        if not self.limit:
            return None
        for i, m in enumerate(per_sae):
            fvu = m.get("fvu")
            # A non-finite loss is the finite check's to name; a run that never came below a quarter
            # of the limit is still learning (an untrained SAE's FVU is above 1).
            if not _is_number(fvu) or fvu <= self.limit or self.best[i] > self.limit / 4:
                continue
            member = f" (stacked SAE {i})" if len(per_sae) > 1 else ""
            l0 = f"; L0 {m['l0']:.4g}" if _is_number(m.get("l0")) else ""
            limit = f"train.divergence_fvu={self.limit:g}{l0}"
            problem = f"batch FVU {fvu:.4g} after reaching {self.best[i]:.4g}{member} ({limit})"
            resumed_blown = self.at_start[i] > self.limit  # NaN compares False
            if resumed_blown:
                problem += f"; FVU {self.at_start[i]:.4g} was logged at step {self.start}, which this run resumed from"
            return problem, resumed_blown
        return None

    def record(self, per_sae: list[dict]) -> None:
        """Takes a logged step's FVUs into the lowest ones."""
        for i, m in enumerate(per_sae):
            if _is_number(m.get("fvu")):
                self.best[i] = min(self.best[i], m["fvu"])


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def check(
    state, per_sae: list[dict] | None, step: int, last_checked: int, skip_batches: bool, last_good, blow_up=None
) -> None:
    """Raises `Diverged` if the state (or, without batch skipping, a loss in `per_sae`) is not finite,
    or `blow_up` (a `BlowUp`) finds the reconstruction blown up.

    last_good: () -> the path of the newest complete checkpoint, or None.
    """
    problem = None
    if per_sae is not None and not skip_batches:
        bad = [(i, m["loss"]) for i, m in enumerate(per_sae) if not math.isfinite(m["loss"])]
        if bad:
            i, loss = bad[0]
            problem = f"loss is {loss}" + (f" (stacked SAE {i})" if len(per_sae) > 1 else "")
    if problem is None:
        tree = _state_tree(state)
        flags = jax.device_get(_leaf_finite(tree))
        if not flags.all():
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
            problem = f"{paths[int(flags.argmin())]} holds NaN or Inf"
    finite, resumed_blown = problem is None, False
    if finite and blow_up is not None and per_sae is not None:
        found = blow_up.problem(per_sae)
        if found is not None:
            problem, resumed_blown = found
    if problem is None:
        return
    good = last_good()
    saved = _saved_clause(good)
    if resumed_blown:  # rerunning would resume into the same state: the checkpoint must go
        raise Diverged(
            f"training diverged by step {step}: {problem}; that checkpoint ({good}) was saved past the limit "
            "(with train.divergence_fvu=0 or by a jumprelu without this check): move it aside to resume from an "
            "older one, or set train.divergence_fvu=0"
        )
    if finite:  # a blow-up: every value is a number, the reconstruction is not an SAE's any more
        # A batch FVU is read before its step's update, so a checkpoint can hold one update no FVU has
        # seen: at the first check after resuming from it, that update may be the one that blew up.
        again = (
            f"; if it diverges again at its first log step, {good} may hold the update that blew up: move it aside"
            if good and blow_up is not None and last_checked == blow_up.start > 0
            else ""
        )
        raise Diverged(
            f"training diverged by step {step} (checked at step {last_checked}): {problem}; nothing since was "
            f"saved and {saved}; rerun with a lower train.lr (it resumes there) or, if such an FVU is expected, "
            f"a higher train.divergence_fvu (0 = off){again}"
        )
    raise Diverged(
        f"training diverged by step {step} (finite at step {last_checked}): {problem}; nothing non-finite was "
        f"saved and {saved}; rerun with a lower train.lr (it resumes there), check the data (data.verify=True), "
        "or set train.skip_nonfinite_batches=True"
    )

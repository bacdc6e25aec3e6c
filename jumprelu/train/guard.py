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
steps (L0 48 -> 920) and trained on to the end at FVU 4. `BlowUp` catches that from the logged
batch FVU: above `train.divergence_fvu` (1.0, worse than predicting the batch mean) after the run
had been below half of it. Early steps, where an untrained SAE's FVU is above 1, do not count.
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
    """Inside the step: keeps `old_state` (but advances the step) when the update is not finite."""
    ok = jnp.all(jnp.isfinite(loss)) & all_finite((new_state.params, new_state.opt_state, new_state.stats))
    keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
    return new_state.replace(
        params=jax.tree.map(keep, new_state.params, old_state.params),
        opt_state=jax.tree.map(keep, new_state.opt_state, old_state.opt_state),
        stats=jax.tree.map(keep, new_state.stats, old_state.stats),
        skipped=old_state.skipped + jnp.where(ok, 0, 1).astype(old_state.skipped.dtype),
    )


_leaf_finite = jax.jit(leaf_finite)


def _state_tree(state):
    return {"params": state.params, "opt_state": state.opt_state, "stats": state.stats}


class BlowUp:
    """Tracks each SAE's lowest logged batch FVU over the whole run.

    history: per SAE, the records its metrics.jsonl already holds (a resumed run), so a run
    resumed into a blow-up is still caught; records past `start` are ignored.
    """

    def __init__(self, limit: float, history: list[list[dict]], start: int):
        self.limit = float(limit)
        self.best = [
            min([r["fvu"] for r in records if r.get("step", 0) <= start and _is_number(r.get("fvu"))], default=math.inf)
            for records in history
        ]

    def problem(self, per_sae: list[dict]) -> str | None:
        """The blow-up in these metrics, if any (and records them)."""
        if not self.limit:
            return None
        for i, m in enumerate(per_sae):
            fvu = m.get("fvu")
            if not _is_number(fvu):
                continue  # a non-finite loss is the finite check's to name
            if fvu > self.limit and self.best[i] <= self.limit / 2:
                member = f" (stacked SAE {i})" if len(per_sae) > 1 else ""
                l0 = f"; L0 {m['l0']:.4g}" if _is_number(m.get("l0")) else ""
                return (
                    f"batch FVU {fvu:.4g} after reaching {self.best[i]:.4g}{member} "
                    f"(train.divergence_fvu={self.limit:g}{l0})"
                )
            self.best[i] = min(self.best[i], fvu)
        return None


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
    finite = problem is None
    if finite and blow_up is not None and per_sae is not None:
        problem = blow_up.problem(per_sae)
    if problem is None:
        return
    good = last_good()
    saved = f"the last good checkpoint is {good}" if good else "no checkpoint was saved before it"
    if finite:  # a blow-up: every value is a number, the reconstruction is not an SAE's any more
        raise Diverged(
            f"training diverged by step {step} (checked at step {last_checked}): {problem}; nothing since was "
            f"saved and {saved}; rerun with a lower train.lr (it resumes there) or, if such an FVU is expected, "
            "a higher train.divergence_fvu (0 = off)"
        )
    raise Diverged(
        f"training diverged by step {step} (finite at step {last_checked}): {problem}; nothing non-finite was "
        f"saved and {saved}; rerun with a lower train.lr (it resumes there), check the data (data.verify=True), "
        "or set train.skip_nonfinite_batches=True"
    )

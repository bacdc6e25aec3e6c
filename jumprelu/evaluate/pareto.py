"""Comparing SAE kinds at equal sparsity: FVU interpolated at a given L0 along each kind's curve."""

from __future__ import annotations

import math


def fvu_at_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """FVU at `l0` by linear interpolation in log L0 between the two nearest measured points.

    points: (l0, fvu) pairs of one kind. None when l0 lies outside the measured range: a
    curve is never extrapolated.
    """
    pts = sorted(points)
    for (l_lo, f_lo), (l_hi, f_hi) in zip(pts, pts[1:], strict=False):
        if l_lo <= l0 <= l_hi:
            if l_hi == l_lo:
                return min(f_lo, f_hi)
            t = (math.log(l0) - math.log(l_lo)) / (math.log(l_hi) - math.log(l_lo))
            return f_lo + t * (f_hi - f_lo)
    if len(pts) == 1 and pts[0][0] == l0:
        return pts[0][1]
    return None


def table(points: list[dict], targets=(20, 50, 100)) -> dict[str, dict[float, float | None]]:
    """{kind: {target L0: interpolated FVU or None}} from dicts with kind, l0, fvu."""
    out = {}
    for kind in sorted({p["kind"] for p in points}):
        mine = [(p["l0"], p["fvu"]) for p in points if p["kind"] == kind]
        out[kind] = {t: fvu_at_l0(mine, t) for t in targets}
    return out


def markdown_table(fvus: dict[str, dict[float, float | None]]) -> str:
    targets = next(iter(fvus.values())).keys() if fvus else []
    lines = ["| kind | " + " | ".join(f"FVU @ L0={t:g}" for t in targets) + " |"]
    lines.append("|---" * (len(targets) + 1) + "|")
    for kind, row in fvus.items():
        cells = ["—" if v is None else f"{v:.4f}" for v in row.values()]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

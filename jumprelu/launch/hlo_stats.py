"""Collectives in a compiled XLA program: kind, operand shapes, bytes, replica group size."""

from __future__ import annotations

import dataclasses
import math
import re

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_LINE = re.compile(r"=\s*(?P<shapes>\(.*?\)|\S+)\s+(?P<kind>" + "|".join(_KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<dims>[^\]]*)\](?:, device_ids=\S+)? \{(?P<axes>[^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<groups>\d+),(?P<size>\d+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "s64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) per operand
    line: str

    @property
    def group_size(self) -> int:
        """Devices taking part in each instance of the op (1 = no communication)."""
        if m := _MESH_GROUPS.search(self.line):
            dims = dict(re.findall(r"'(\w+)'=(\d+)", m["dims"]))
            return math.prod(int(dims[a]) for a in re.findall(r"'(\w+)'", m["axes"]))
        if m := _IOTA_GROUPS.search(self.line):
            return int(m["size"])
        if m := _LIST_GROUPS.search(self.line):
            return len(m["first"].split(","))
        return 1

    @property
    def bytes(self) -> int:
        return sum(_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in self.shapes)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective op of the program (the async `-done` halves are not counted)."""
    found = []
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        shapes = tuple(
            (s["dtype"], tuple(int(d) for d in s["dims"].split(",") if d)) for s in _SHAPE.finditer(m["shapes"])
        )
        found.append(Collective(m["kind"], shapes, line.strip()))
    return found


def ring_bytes_per_device(c: Collective) -> float:
    """Bytes each device sends for a bandwidth-optimal ring implementation of `c`."""
    n = c.group_size
    if n <= 1:
        return 0.0
    frac = (n - 1) / n
    return (2 * frac if c.kind == "all-reduce" else frac) * c.bytes


_DEFINED = re.compile(r"%(?P<name>[\w.\-]+) = (?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
# the lhs operand by name, printed with or without its shape before it
_DOT = re.compile(r"= [a-z]+\d*\[(?P<out>[\d,]*)\]\S* dot\((?:[a-z]+\d*\[[\d,]*\]\S* )?%(?P<lhs>[\w.\-]+), ")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{(?P<dims>[\d,]*)\}")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) .*\{$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{(?P<names>[^}]*)\}")


def dot_flops(hlo_text: str) -> float:
    """FLOPs of the program's matrix products (2 per multiply-add) as one execution runs them: from
    the entry computation down through every computation it calls, a conditional's costliest
    branch only (the recipe's BatchTopK phase and the JumpReLU step after it are two branches of
    one step), and a loop's body once, not once per trip (the TPU form of the train step has no
    product in a loop)."""
    shapes = {m["name"]: [int(d) for d in m["dims"].split(",") if d] for m in _DEFINED.finditer(hlo_text)}
    own, calls, entry, current = {}, {}, None, None
    for line in hlo_text.splitlines():
        if m := _COMPUTATION.match(line):
            current = m["name"]
            own[current], calls[current] = 0.0, []
            entry = current if line.startswith("ENTRY") else entry
            continue
        if current is None:
            continue
        m = _DOT.search(line)
        contracting = _LHS_CONTRACTING.search(line)
        if m and contracting and m["lhs"] in shapes:
            k = math.prod(shapes[m["lhs"]][int(i)] for i in contracting["dims"].split(",") if i)
            own[current] += 2.0 * math.prod(int(d) for d in m["out"].split(",") if d) * k
        called = [[c["name"]] for c in _CALLED.finditer(line)]
        if b := _BRANCHES.search(line):  # alternatives: one of them runs
            called.append(re.findall(r"%([\w.\-]+)", b["names"]))
        calls[current] += called
    memo: dict[str, float] = {}

    def total(name: str) -> float:
        if name not in memo:
            memo[name] = 0.0  # a cycle (none in XLA's call graph) would count nothing more
            memo[name] = own.get(name, 0.0) + sum(max(total(n) for n in group) for group in calls.get(name, ()))
        return memo[name]

    if entry is None:  # a bare list of instructions: every dot once
        return sum(own.values())
    return total(entry)

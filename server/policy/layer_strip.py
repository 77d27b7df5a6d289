"""A schedule as the playground draws it: a strip of cells in execution order. Pure; imports no torch.

Each cell is a run of layers executed one after another in increasing order (one layer or several), a parallel group
(its layers drawn together), or a run of skipped layers (greyed, placed where they would have run). A block of steps that repeats back to back is one cell body counted `times` (loops,
`repeat`). `changed` lists the layers a policy treats differently from `full`: skipped, grouped, run more than once,
or moved out of their neighbours' order; the probe heatmap outlines them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.policy.compiler import Schedule, Step

CellKind = Literal["run", "group", "skipped"]
MAX_BLOCK = 16  # longest repeated block of steps folded into one counted cell


@dataclass(frozen=True)
class Cell:
    kind: CellKind
    layers: tuple[int, ...]
    combine: str | None = None  # a group's rule: mean, sum or pairs
    moved: bool = False  # a single layer run out of its neighbours' order (reverse, shuffle, explicit order)


@dataclass(frozen=True)
class Block:
    """Cells run `times` times back to back (1 for everything but loops and repeats)."""

    cells: tuple[Cell, ...]
    times: int = 1


@dataclass(frozen=True)
class Strip:
    policy: str
    schedule: str  # the schedule key, as in the `painters` object of every response
    num_layers: int
    layer_runs: int  # decoder-layer evaluations per token
    blocks: tuple[Block, ...]
    runs: tuple[int, ...]  # per layer: how many times the schedule runs it (0 = skipped)
    changed: tuple[int, ...] = field(default=())

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.runs) if n == 0)


def strip(schedule: Schedule) -> Strip:
    runs = [0] * schedule.num_layers
    for step in schedule.steps:
        for layer in step.layers:
            runs[layer] += 1
    moved = _moved(schedule.steps, runs)
    cells = _cells(schedule.steps, runs, moved)
    grouped = {layer for step in schedule.steps if step.parallel for layer in step.layers}
    changed = tuple(i for i, n in enumerate(runs) if n != 1 or i in grouped or i in moved)
    return Strip(policy=schedule.policy, schedule=schedule.key, num_layers=schedule.num_layers,
                 layer_runs=schedule.layer_runs, blocks=_fold(cells), runs=tuple(runs), changed=changed)


def _moved(steps: tuple[Step, ...], runs: list[int]) -> set[int]:
    """Layers run once, alone, whose predecessor and successor both differ from those of the same layers in
    increasing order (so the layer after a skipped range, or after a reversed one, is not flagged)."""
    order = [s.layers[0] for s in steps if not s.parallel and runs[s.layers[0]] == 1]
    ranked = sorted(order)
    expected = {layer: (ranked[k - 1] if k else None, ranked[k + 1] if k + 1 < len(ranked) else None)
                for k, layer in enumerate(ranked)}
    moved = set()
    for k, layer in enumerate(order):
        before = order[k - 1] if k else None
        after = order[k + 1] if k + 1 < len(order) else None
        want_before, want_after = expected[layer]
        if before != want_before and after != want_after:
            moved.add(layer)
    return moved


def _cells(steps: tuple[Step, ...], runs: list[int], moved: set[int]) -> list[Cell]:
    """Steps in order; each run of never-run layers goes just before the first step that starts above it."""
    pending = [i for i, n in enumerate(runs) if n == 0]
    cells: list[Cell] = []

    def flush(below: int) -> None:
        gone = [i for i in pending if i < below]
        for run in _consecutive(gone):
            cells.append(Cell("skipped", run))
        del pending[:len(gone)]

    for step in steps:
        flush(min(step.layers))
        layer = step.layers[0]
        if step.parallel:
            cells.append(Cell("group", step.layers, combine=step.combine))
        elif layer in moved:
            cells.append(Cell("run", (layer,), moved=True))
        elif cells and _extends(cells[-1], layer, runs):
            cells[-1] = Cell("run", (*cells[-1].layers, layer))
        else:
            cells.append(Cell("run", (layer,)))
    flush(len(runs))
    return cells


def _extends(cell: Cell, layer: int, runs: list[int]) -> bool:
    """`layer` continues `cell`'s run: both in order, each run once (a layer run twice stays its own cell, so that
    repeats fold into a count)."""
    return (cell.kind == "run" and not cell.moved and cell.layers[-1] == layer - 1
            and runs[layer] == 1 and runs[cell.layers[-1]] == 1)


def _consecutive(layers: list[int]) -> list[tuple[int, ...]]:
    out: list[list[int]] = []
    for i in layers:
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return [tuple(run) for run in out]


def _fold(cells: list[Cell]) -> tuple[Block, ...]:
    """Back-to-back repeats of a block of up to MAX_BLOCK cells -> one Block with its count; the rest one by one.
    At each position the shortest repeating block wins (`15,16,15,16` -> (15,16) x2; `15,15,15` -> 15 x3)."""
    blocks: list[Block] = []
    i, n = 0, len(cells)
    while i < n:
        best = (1, 1)  # (block length, times)
        for size in range(1, min(MAX_BLOCK, (n - i) // 2) + 1):
            body = cells[i:i + size]
            times = 1
            while cells[i + times * size:i + (times + 1) * size] == body:
                times += 1
            if times > 1:
                best = (size, times)
                break
        size, times = best
        blocks.append(Block(tuple(cells[i:i + size]), times))
        i += size * times
    return tuple(blocks)

"""Pipeline-parallel schedules on paper: 1F1B, ZB1P and DualPipe, simulated and drawn.

A model is cut into P stages on P devices, a batch into M micro-batches. Each device runs its
passes in a fixed order: F (forward), B (full backward), or B split into I (the input gradient, which
the previous stage waits for; costs B-W) and W (the weight gradient, which nobody waits for, so
zero-bubble schedules, Qi et al. 2023, move it into idle time). `simulate` starts every pass as soon
as its device is free and its inputs exist (communication is free) and measures, per device:

- bubble: idle time before the whole step ends (makespan - the device's busy time);
- peak activations: the most micro-batch activations held at once, counted from a chunk's forward
  to the end of its backward (its B, or its W when B is split: W still needs the layer inputs);
- stages held: how many distinct stages' parameters the device keeps.

The schedules (each a list of passes per device, built here from the papers' descriptions):
- 1F1B (PipeDream-flush): device i runs P-1-i warm-up forwards, then alternates F and B.
- ZB1P (ZB-H1 of the zero-bubble paper): 1F1B's order with B split; device i keeps its last i
  weight gradients pending and runs each later (the last ones in the drain, where 1F1B idles), so it
  holds P activations at most, like 1F1B's first device.
- DualPipe (DeepSeek-V3, 2024): M/2 micro-batches enter at each end. Device r holds stage r of the
  forward direction and stage P-1-r of the reverse one (2x parameters). In the steady phase it runs
  a forward of one direction together with a backward of the other as one block costing F&B (`FB`,
  at most F+B: each one's communication hides behind the other's computation). A device's order
  has eight phases, as in DeepSeek's reference implementation: warm-up forwards, forward pairs,
  split backwards each followed by its W, the overlapped main phase, backward + overlapped pairs,
  backward pairs (the later half split), split backwards alternating with pending Ws, the last Ws.

The write-up's table (github.com/deepseek-ai/DualPipe), in costs of one chunk:

    1F1B      bubble (P-1)(F+B)          parameters 1x  activations P
    ZB1P      bubble (P-1)(F+B-2W)       parameters 1x  activations P
    DualPipe  bubble (P/2-1)(F&B+B-3W)   parameters 2x  activations P+1

The simulation reproduces each bubble exactly as the largest bubble over devices, under the
conditions the formulas assume (tests/experiments/test_pipeline.py): 1F1B for any costs; ZB1P when
W <= min(F, B-W); DualPipe when the forward costs as much as the input gradient (F = B-W),
W <= F, max(F, B) <= F&B <= F+B, and M is even and >= 2P. Outside them the table is an
approximation and the simulator gives the actual idle time of these orders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.io import write_json, write_text


@dataclass(frozen=True)
class Chunk:
    """One micro-batch's pass through one stage. DualPipe's reverse direction is `direction=1`."""

    direction: int
    mb: int
    stage: int


@dataclass(frozen=True)
class Op:
    """A pass on a device: "F", "B", "I", "W", or "FB" (the forward of `chunk` overlapped with the
    backward of `back`, one block of cost F&B)."""

    kind: str
    chunk: Chunk
    back: Chunk | None = None


@dataclass(frozen=True)
class Costs:
    """Time of one chunk's forward F, full backward B (= input gradient I + weight gradient W), and of
    an overlapped forward + backward pair FB (None: no overlap, F + B)."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None

    def __post_init__(self) -> None:
        if not (self.F > 0 and self.B > 0 and 0 < self.W < self.B):
            raise UserError(f"pipeline costs F={self.F}, B={self.B}, W={self.W} do not fit",
                            fix="use F > 0 and 0 < W < B (B is the full backward, W its weight-gradient part)")
        if self.FB is not None and not max(self.F, self.B) <= self.FB <= self.F + self.B:
            raise UserError(f"pipeline cost FB={self.FB} (overlapped forward + backward) is out of range",
                            fix=f"use a value between max(F, B) = {max(self.F, self.B)} and F + B = {self.F + self.B}")

    @property
    def fb(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, op: Op) -> float:
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W, "FB": self.fb}[op.kind]


Schedule = list[list[Op]]  # per device, its passes in order


def one_f_one_b(P: int, M: int) -> Schedule:
    orders = []
    for i in range(P):
        warm = min(P - 1 - i, M)
        ops = [Op("F", Chunk(0, m, i)) for m in range(warm)]
        for k in range(M - warm):
            ops += [Op("F", Chunk(0, warm + k, i)), Op("B", Chunk(0, k, i))]
        ops += [Op("B", Chunk(0, m, i)) for m in range(M - warm, M)]
        orders.append(ops)
    return orders


def zb1p(P: int, M: int) -> Schedule:
    return [_zb1p_device(i, P, M) for i in range(P)]


def _zb1p_device(i: int, P: int, M: int) -> list[Op]:
    warm = min(P - 1 - i, M)
    ops = [Op("F", Chunk(0, m, i)) for m in range(warm)]
    pending: list[Chunk] = []  # input gradient done, weight gradient not yet

    def backward(m: int) -> None:
        ops.append(Op("I", Chunk(0, m, i)))
        pending.append(Chunk(0, m, i))
        if len(pending) > i:  # device i keeps i weight gradients for the drain
            ops.append(Op("W", pending.pop(0)))

    for k in range(M - warm):
        ops.append(Op("F", Chunk(0, warm + k, i)))
        backward(k)
    for m in range(M - warm, M):
        backward(m)
    return ops + [Op("W", c) for c in pending]


def dualpipe(P: int, M: int) -> Schedule:
    if P % 2 or M % 2 or M < 2 * P:
        raise UserError(f"DualPipe needs an even number of stages and an even number of micro-batches >= 2 x "
                        f"stages (got {P} stages, {M} micro-batches)", fix="e.g. --stages 4 --micro-batches 8")
    half, per_direction = P // 2, M // 2
    return [_dualpipe_device(r, P, half, per_direction) for r in range(P)]


def _dualpipe_device(r: int, P: int, half: int, N: int) -> list[Op]:
    """Device r's passes. Its two "phases": 0 is the direction entering at its end of the pipe (the
    forward direction on the first half of the devices, the reverse one on the second half), 1 the
    other; h counts devices from the nearer end."""
    h = min(r, P - 1 - r)
    flip = int(r >= half)
    count = {"F": [0, 0], "B": [0, 0]}
    weights: list[Chunk] = []  # split backwards whose W is still to run, oldest first
    ops: list[Op] = []

    def chunk(kind: str, phase: int) -> Chunk:
        direction = phase ^ flip
        m = count[kind][phase]
        count[kind][phase] += 1
        return Chunk(direction, m, r if direction == 0 else P - 1 - r)

    def forward(phase: int) -> None:
        ops.append(Op("F", chunk("F", phase)))

    def backward(phase: int, split: bool = False) -> None:
        c = chunk("B", phase)
        ops.append(Op("I" if split else "B", c))
        if split:
            weights.append(c)

    def weight() -> None:
        ops.append(Op("W", weights.pop(0)))

    def overlapped(f_phase: int) -> None:
        f = chunk("F", f_phase)
        ops.append(Op("FB", f, chunk("B", 1 - f_phase)))

    rest = half - h - 1
    for _ in range(2 * rest):  # 1: warm-up forwards of phase 0
        forward(0)
    for _ in range(h + 1):  # 2: forward pairs, both phases
        forward(0)
        forward(1)
    for _ in range(rest):  # 3: split backward, its W, a forward
        backward(1, split=True)
        weight()
        forward(1)
    for i in range(N - P + h + 1):  # 4: the main phase, forward and backward overlapped
        if i == 0 and h == half - 1:  # the middle devices start it unoverlapped (a smaller bubble)
            forward(0)
            backward(1)
        else:
            overlapped(0)
        overlapped(1)
    for _ in range(rest):  # 5: a backward, then an overlapped pair
        backward(1)
        overlapped(1)
    split = False
    for i in range(h + 1):  # 6: backward pairs; from the middle on, split (their Ws fill the drain)
        split = split or (i == (h + 1) // 2 and h % 2 == 1)
        backward(1, split)
        split = split or (i == (h + 1) // 2 and h % 2 == 0)
        backward(0, split)
    for _ in range(rest):  # 7: pending Ws between split backwards
        weight()
        backward(0, split=True)
    for _ in range(h + 1):  # 8: the last Ws
        weight()
    return ops


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"1F1B": one_f_one_b, "ZB1P": zb1p, "DualPipe": dualpipe}


@dataclass(frozen=True)
class Block:
    start: float
    end: float
    op: Op


@dataclass
class Result:
    name: str
    timeline: list[list[Block]]  # per device
    makespan: float
    bubble: list[float]  # per device: makespan - busy time
    peak_activations: list[int]  # per device, in micro-batch activations of one stage
    stages_held: list[int]  # per device: distinct stages whose parameters it keeps


def device_of(c: Chunk, P: int) -> int:
    return c.stage if c.direction == 0 else P - 1 - c.stage


def _needs(op: Op, P: int) -> list[tuple[str, Chunk]]:
    """What a pass waits for: ("F", c) c's forward output, ("I", c) c's input gradient."""
    def of_forward(c: Chunk) -> list[tuple[str, Chunk]]:
        return [("F", Chunk(c.direction, c.mb, c.stage - 1))] if c.stage > 0 else []

    def of_backward(c: Chunk) -> list[tuple[str, Chunk]]:
        later = [("I", Chunk(c.direction, c.mb, c.stage + 1))] if c.stage < P - 1 else []  # the last: the loss
        return [("F", c), *later]

    if op.kind == "F":
        return of_forward(op.chunk)
    if op.kind in ("B", "I"):
        return of_backward(op.chunk)
    if op.kind == "W":
        return [("I", op.chunk)]
    assert op.back is not None
    return of_forward(op.chunk) + of_backward(op.back)


def simulate(orders: Schedule, costs: Costs) -> list[list[Block]]:
    """Start times of every pass: as soon as its device is free and what it needs is done."""
    P = len(orders)
    done: dict[tuple[str, Chunk], float] = {}
    nxt, free = [0] * P, [0.0] * P
    timeline: list[list[Block]] = [[] for _ in range(P)]
    moved = True
    while moved:
        moved = False
        for d, ops in enumerate(orders):
            while nxt[d] < len(ops):
                op = ops[nxt[d]]
                needs = _needs(op, P)
                if any(n not in done for n in needs):
                    break
                start = max([free[d], *(done[n] for n in needs)])
                free[d] = end = start + costs.of(op)
                timeline[d].append(Block(start, end, op))
                if op.kind in ("F", "FB"):
                    done["F", op.chunk] = end
                if op.kind in ("B", "I"):
                    done["I", op.chunk] = end
                if op.kind == "FB":
                    assert op.back is not None
                    done["I", op.back] = end
                nxt[d] += 1
                moved = True
    if any(n < len(ops) for n, ops in zip(nxt, orders)):
        raise RuntimeError("the schedule deadlocks: a pass waits for one ordered after it")
    return timeline


def run(name: str, P: int, M: int, costs: Costs) -> Result:
    """Build schedule `name` for P stages and M micro-batches, simulate it, measure it."""
    if P < 2 or M < 1:
        raise UserError(f"a pipeline needs >= 2 stages and >= 1 micro-batch (got {P}, {M})",
                        fix="e.g. --stages 4 --micro-batches 8")
    timeline = simulate(SCHEDULES[name](P, M), costs)
    makespan = max(dev[-1].end for dev in timeline)
    bubble = [makespan - sum(b.end - b.start for b in dev) for dev in timeline]
    peaks, stages = [], []
    for dev in timeline:
        held = peak = 0
        for b in dev:
            held += b.op.kind in ("F", "FB")
            peak = max(peak, held)
            held -= b.op.kind in ("B", "W", "FB")  # the chunk's backward ended: its activations are freed
        peaks.append(peak)
        stages.append(len({b.op.chunk.stage for b in dev}))
    return Result(name, timeline, makespan, bubble, peaks, stages)


def formula(name: str, P: int, costs: Costs) -> tuple[float, int, int]:
    """The write-up's (bubble, parameters x, peak activations) for a schedule."""
    F, B, W = costs.F, costs.B, costs.W
    return {"1F1B": ((P - 1) * (F + B), 1, P),
            "ZB1P": ((P - 1) * (F + B - 2 * W), 1, P),
            "DualPipe": ((P / 2 - 1) * (costs.fb + B - 3 * W), 2, P + 1)}[name]


def table(results: list[Result], P: int, costs: Costs) -> str:
    rows = [f"{'schedule':<9} {'makespan':>9} {'bubble':>8} {'formula':>8} {'params':>6} {'formula':>7} "
            f"{'act.peak':>8} {'formula':>7}"]
    for r in results:
        bub, params, act = formula(r.name, P, costs)
        rows.append(f"{r.name:<9} {r.makespan:>9.2f} {max(r.bubble):>8.2f} {bub:>8.2f} {max(r.stages_held):>5}x "
                    f"{params:>6}x {max(r.peak_activations):>8} {act:>7}")
    return "\n".join(rows)


COLOURS = {"F": "#4c8bd6", "B": "#e07b39", "I": "#f2b134", "W": "#5bb56a", "FB": "#9b6bc9"}


def draw(results: list[Result], P: int, M: int, costs: Costs, png: Path) -> None:
    """One panel per schedule: devices as rows, passes as coloured blocks labelled by micro-batch
    (reverse-direction micro-batches primed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    end = max(r.makespan for r in results)
    fig, axes = plt.subplots(len(results), 1, figsize=(max(10.0, end * 0.35), 1.0 + 0.45 * P * len(results)),
                             squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        for d, dev in enumerate(r.timeline):
            for b in dev:
                ax.barh(d, b.end - b.start, left=b.start, color=COLOURS[b.op.kind], edgecolor="black", linewidth=0.5)
                label = f"{b.op.chunk.mb}" + "'" * b.op.chunk.direction
                if b.op.back is not None:
                    label += f"/{b.op.back.mb}" + "'" * b.op.back.direction
                ax.text((b.start + b.end) / 2, d, label, ha="center", va="center", fontsize=6)
        ax.set(xlim=(0, end), ylim=(P - 0.5, -0.5), yticks=range(P), yticklabels=[f"dev {d}" for d in range(P)],
               title=f"{r.name}: makespan {r.makespan:g}, largest bubble {max(r.bubble):g}, "
                     f"peak activations {max(r.peak_activations)}")
    names = {"F": "F forward", "B": "B backward", "I": "B input grad", "W": "W weight grad", "FB": "F&B overlapped"}
    fig.legend(handles=[Patch(color=c, label=names[k]) for k, c in COLOURS.items()], loc="lower center", ncol=5)
    fig.suptitle(f"P={P} stages, M={M} micro-batches; F={costs.F:g} B={costs.B:g} W={costs.W:g} F&B={costs.fb:g}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


def pipeline_experiment(P: int, M: int, costs: Costs, out: Path) -> Path:
    """Simulate the three schedules, print the table, write `out/pipeline.png` and `out/pipeline.json`."""
    names = [n for n in SCHEDULES if n != "DualPipe" or (P % 2 == 0 and M % 2 == 0 and M >= 2 * P)]
    results = [run(n, P, M, costs) for n in names]
    text = table(results, P, costs)
    if "DualPipe" not in names:
        text += f"\n(DualPipe left out: it needs an even P and an even M >= 2P; got P={P}, M={M})"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "pipeline.txt", text + "\n")
    write_json(out / "pipeline.json", {
        "stages": P, "micro_batches": M, "costs": {"F": costs.F, "B": costs.B, "W": costs.W, "FB": costs.fb},
        "schedules": {r.name: {"makespan": r.makespan, "bubble": r.bubble, "peak_activations": r.peak_activations,
                               "stages_held": r.stages_held} for r in results}})
    png = out / "pipeline.png"
    draw(results, P, M, costs, png)
    print(f"wrote {png}")
    return png

"""GEMM roofline: how much of a step the matrix products alone would take.

``python -m benchmarks.roofline --data gmm10,digits --models maf,iaf``

For each data set, model and library (the constructions of ``benchmarks/libs.py``) and for
each operation (a training step, ``log_prob`` of ``--points`` points, ``sample`` of
``--sample-points`` points) it

1. times the operation (median of ``--repeats`` calls after a warm-up, one torch thread);
   by default with the CPU time of the thread (``--clock cpu``), which on a shared
   machine leaves out the time spent waiting for a core, as the GEMM rates below do;
2. records every matrix product of one call with ``torch.profiler`` (``record_shapes``):
   ``aten::mm``, ``addmm``, ``addmm_``, ``bmm``, ``baddbmm``, ``addbmm``, with their shapes;
3. measures this machine's GEMM rate for each of those shapes with ``torch.mm`` /
   ``torch.bmm`` on contiguous operands, alone and hot in cache (median of repeats);
4. reports the **GEMM floor**, the time those products would take at those rates, and
   the fraction of the measured operation it is.

A fraction near 1 means the operation is bound by its matrix products: only fewer
multiply-adds (or a faster GEMM) can speed it up. A small fraction means the time goes
elsewhere (elementwise passes, Python and dispatch overhead, memory traffic). The floor
uses isolated, hot-cache rates, so in-place measurements can fall below it only by noise.
Results go to ``<out>/roofline.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import libs
from .data import load

#: Leaf GEMM operators (``matmul``/``linear`` dispatch to these, so they are not counted).
GEMM_OPS = {
    "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm"
}

Shape = tuple[int, int, int, int]  # (batch, m, k, n)


def gemm_shape(name: str, shapes: list) -> Shape | None:
    """``(b, m, k, n)`` of one recorded GEMM call, from the profiler's input shapes."""
    dims = [list(s) for s in shapes if isinstance(s, (list, tuple))]
    if name == "aten::mm" and len(dims) >= 2:
        (m, k), (_, n) = dims[0], dims[1]
        return (1, m, k, n)
    if name in ("aten::addmm", "aten::addmm_") and len(dims) >= 3:
        (m, k), (_, n) = dims[1], dims[2]
        return (1, m, k, n)
    if name == "aten::bmm" and len(dims) >= 2:
        (b, m, k), (_, _, n) = dims[0], dims[1]
        return (b, m, k, n)
    if name in ("aten::baddbmm", "aten::addbmm") and len(dims) >= 3:
        (b, m, k), (_, _, n) = dims[1], dims[2]
        return (b, m, k, n)
    return None


def gemm_calls(fn: Callable[[], object]) -> Counter[Shape]:
    """The matrix products of one call of ``fn``, counted by shape."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    calls: Counter[Shape] = Counter()
    for event in prof.events():
        if event.name in GEMM_OPS:
            shape = gemm_shape(event.name, event.input_shapes)
            if shape is not None:
                calls[shape] += 1
    return calls


_RATE_CACHE: dict[Shape, float] = {}
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = CLOCKS["cpu"]


def gemm_seconds(shape: Shape, budget_s: float = 0.05) -> float:
    """Seconds of one ``torch.mm`` (``bmm``) of this shape: alone, hot, median."""
    if shape in _RATE_CACHE:
        return _RATE_CACHE[shape]
    b, m, k, n = shape
    if m * k * n * b == 0:
        _RATE_CACHE[shape] = 0.0
        return 0.0
    if b == 1:
        x, y = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)

        def run() -> None:
            torch.mm(x, y, out=out)
    else:
        x, y = torch.randn(b, m, k), torch.randn(b, k, n)
        out = torch.empty(b, m, n)

        def run() -> None:
            torch.bmm(x, y, out=out)
    for _ in range(3):
        run()
    t0 = _clock()
    run()
    once = max(_clock() - t0, 1e-6)
    reps = max(3, min(200, int(budget_s / once)))
    times = []
    for _ in range(5):
        t0 = _clock()
        for _ in range(reps):
            run()
        times.append((_clock() - t0) / reps)
    _RATE_CACHE[shape] = statistics.median(times)
    return _RATE_CACHE[shape]


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = _clock()
        fn()
        times.append(_clock() - t0)
    return statistics.median(times)


def operations(model: libs.Model, train: torch.Tensor, points: torch.Tensor, n_sample: int):
    optimizer = torch.optim.Adam(model.module.parameters(), lr=1e-3)
    batch = train[:512]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = -model.log_prob(batch).mean()
        loss.backward()
        optimizer.step()

    def log_prob() -> None:
        with torch.inference_mode():
            model.log_prob(points)

    def sample() -> None:
        with torch.inference_mode():
            model.sample(n_sample)

    return {"train": step, "log_prob": log_prob, "sample": sample}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__)
    parser.add_argument("--data", default="gmm10,digits")
    parser.add_argument("--models", default="maf,iaf,realnvp,nsf")
    parser.add_argument("--libs", default=",".join(libs.LIBRARIES))
    parser.add_argument("--what", default="train,log_prob,sample")
    parser.add_argument("--points", type=int, default=10_000, help="log_prob points")
    parser.add_argument("--sample-points", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--clock", default="cpu", choices=sorted(CLOCKS),
                        help="cpu: this thread's CPU time (one thread only); wall: elapsed")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use --threads 1 or --clock wall")
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)

    rows = []
    what = [w for w in args.what.split(",") if w]
    names = [n for n in args.libs.split(",") if n and libs.available(n)]
    for data_name in [d for d in args.data.split(",") if d]:
        dataset = load(data_name)
        points = dataset.test.repeat(math.ceil(args.points / len(dataset.test)), 1)
        points = points[: args.points]
        for model_name in [m for m in args.models.split(",") if m]:
            for library in names:
                torch.manual_seed(0)
                model = libs.build(library, model_name, dataset.features, dataset.hidden)
                ops = operations(model, dataset.train, points, args.sample_points)
                for op in what:
                    # Sequential directions of the peers take long: fewer repeats there.
                    slow = (model_name, op) in (("maf", "sample"), ("iaf", "log_prob"))
                    repeats = 1 if slow and library != "exactflow" else args.repeats
                    seconds = timed(ops[op], repeats)
                    calls = gemm_calls(ops[op])
                    floor = sum(c * gemm_seconds(s) for s, c in calls.items())
                    flops = sum(c * 2 * b * m * k * n for (b, m, k, n), c in calls.items())
                    row = {
                        "data": data_name, "model": model_name, "library": library, "op": op,
                        "seconds": seconds, "gemm_calls": sum(calls.values()),
                        "gemm_gflop": flops / 1e9, "gemm_floor_seconds": floor,
                        "floor_fraction": floor / seconds if seconds > 0 else None,
                        "effective_parameters": model.effective_parameters,
                    }
                    rows.append(row)
                    print(
                        f"{data_name:7s} {model_name:8s} {library:10s} {op:9s} "
                        f"{seconds * 1e3:9.2f} ms  GEMM floor {floor * 1e3:8.2f} ms "
                        f"({row['floor_fraction']:.0%})  {row['gemm_calls']:5d} GEMMs "
                        f"{row['gemm_gflop']:7.3f} GFLOP",
                        flush=True,
                    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m benchmarks.roofline "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "threads": args.threads, "clock": args.clock,
        "load_average": list(os.getloadavg()),
    }
    (out / "roofline.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    loads = ", ".join(f"{v:.2f}" for v in meta["load_average"])
    lines = [
        f"GEMM roofline, {meta['date_utc']}: `{meta['command']}` (torch {meta['torch']}, "
        f"{meta['threads']} thread, {meta['clock']} clock, load average {loads})",
        "",
        "`floor`: the time the operation's matrix products take alone at this machine's "
        "measured `torch.mm` rate for each shape; `%`: floor / measured time.",
        "",
        "| data | model | library | op | time ms | GEMM floor ms | % | GEMMs | GFLOP |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['model']} | {r['library']} | {r['op']} "
            f"| {r['seconds'] * 1e3:.2f} | {r['gemm_floor_seconds'] * 1e3:.2f} "
            f"| {r['floor_fraction']:.0%} | {r['gemm_calls']} | {r['gemm_gflop']:.3f} |"
        )
    (out / "roofline.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'roofline.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

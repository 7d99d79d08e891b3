"""Run the head-to-head benchmark: exactflow against zuko, nflows and normflows.

Usage::

    python -m benchmarks.run --quick          # under 2 minutes: few steps, same code paths
    python -m benchmarks.run                  # the full table (under 30 minutes on 2 cores)
    python -m benchmarks.run --device cuda --batch 4096   # on a GPU (skips without CUDA)

For every data set (2D moons, 10-D Gaussian mixture, 64-D digits) and architecture (MAF,
IAF, RealNVP, NSF) it builds the model in each installed library with the same seed, then

1. trains all of them together with Adam (lr 1e-3, same batches, same batch size) in windows
   of ``window`` steps, interleaved A B C D A B C D ... with the order rotated each round so
   that machine drift and neighbours' load hit every library alike; training speed is
   ``window / median(window time)`` over the windows after the first (warm-up);
2. scores the test set (test NLL after the fixed number of steps, and its gap to the true
   NLL where the density is known) under ``torch.inference_mode``;
3. times ``log_prob`` on 10,000 points and ``sample`` of 10,000 points, under
   ``torch.inference_mode`` for every library, interleaved, median of the repeats;
4. measures peak training memory in a fresh process per library (``benchmarks.memory``).

Every figure is also given as a ratio to the best *peer* (zuko, nflows, normflows). The
results go to ``<out>/bench[-quick][-cuda].json`` and ``.md`` with the machine, versions,
load average, date and command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import libs
from .data import Dataset, load
from .report import write_markdown
from .saving import cpu_name

PEERS = ("zuko", "nflows", "normflows")

#: ``wall``: elapsed time. ``cpu``: the CPU time of this thread, which on a shared machine
#: leaves out the time the process waits for a core (every library runs on one thread).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass
class Settings:
    """Step counts and repeat counts of one run mode."""

    steps: dict[str, int]
    window: int
    #: Fewer training steps for some models: an IAF trains in its sequential direction.
    model_steps: dict[str, dict[str, int]] = field(default_factory=dict)
    eval_points: int = 10_000
    sample_points: dict[str, int] = field(default_factory=dict)
    repeats: int = 5
    repeat_budget_s: float = 6.0
    memory_steps: int = 5
    memory_data: tuple[str, ...] = ("moons", "gmm10", "digits")
    memory_models: tuple[str, ...] = ("maf", "realnvp", "nsf")


FULL = Settings(
    steps={"moons": 1200, "gmm10": 1200, "digits": 150},
    window=50,
    model_steps={"iaf": {"moons": 400, "gmm10": 100, "digits": 8}},
    repeats=9,
    repeat_budget_s=8.0,
)
QUICK = Settings(
    steps={"moons": 64, "gmm10": 48, "digits": 16},
    window=8,
    model_steps={"iaf": {"moons": 16, "gmm10": 8, "digits": 4}},
    sample_points={"digits": 1_000},
    repeats=2,
    repeat_budget_s=1.0,
    memory_steps=3,
    memory_data=("moons",),
    memory_models=("nsf",),
)


@dataclass
class Entry:
    """One library's model on one data set, with its measured figures."""

    library: str
    model: libs.Model
    step: Callable[[Tensor], Tensor]
    windows: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    log_prob_times: list[float] = field(default_factory=list)
    sample_times: list[float] = field(default_factory=list)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _train_step(
    model: libs.Model, optimizer: torch.optim.Optimizer
) -> Callable[[Tensor], Tensor]:
    def step(xb: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = -model.log_prob(xb).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _compiled_step(
    model: libs.Model, optimizer: torch.optim.Optimizer
) -> Callable[[Tensor], Tensor]:
    """The training step with the loss and its backward through ``torch.compile``.

    What ``exactflow.fit(..., compile=True)`` does (static shapes, one graph); the same
    optimizer as every other row, eager.
    """
    def nll(xb: Tensor) -> Tensor:
        return -model.log_prob(xb).mean()

    # A fresh code object per model, as exactflow.fit does: torch.compile's cache (and its
    # recompile limit of 8) is per code object, and this suite compiles many models.
    code = nll.__code__.replace()
    fresh = types.FunctionType(code, nll.__globals__, "nll", None, nll.__closure__)
    loss_fn = torch.compile(fresh, dynamic=False)

    def step(xb: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(xb)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def _median_rate(times: list[float], count: int) -> float | None:
    return count / statistics.median(times) if times else None


def bench_config(
    dataset: Dataset,
    model_name: str,
    libraries: list[str],
    settings: Settings,
    args: argparse.Namespace,
) -> list[dict]:
    device = args.device
    clock = CLOCKS[args.clock]
    steps = args.steps or settings.model_steps.get(model_name, settings.steps)[dataset.name]
    window = max(1, min(settings.window, steps // 4))  # at least 3 timed windows
    rounds = max(2, steps // window)
    entries: list[Entry] = []
    for library in libraries:
        base = library.split("+")[0]
        torch.manual_seed(args.seed)
        model = libs.build(base, model_name, dataset.features, dataset.hidden)
        model.module.to(device)
        optimizer = torch.optim.Adam(model.module.parameters(), lr=1e-3)
        make = _compiled_step if library.endswith("+compile") else _train_step
        step = make(model, optimizer)
        entries.append(Entry(library, model, step))

    # Same batches for everyone.
    gen = torch.Generator().manual_seed(args.seed + 1)
    train = dataset.train.to(device)
    batch = args.batch
    index = torch.randint(len(train), (rounds, window, batch), generator=gen).to(device)

    for r in range(rounds):
        for entry in _rotated(entries, r):
            loss = torch.zeros(())
            _sync(device)
            t0 = clock()
            for s in range(window):
                loss = entry.step(train[index[r, s]])
            _sync(device)
            entry.windows.append(clock() - t0)
            entry.losses.append(float(loss))

    test = dataset.test.to(device)
    reps = math.ceil(settings.eval_points / len(test))
    points = test.repeat(reps, 1)[: settings.eval_points]
    n_sample = settings.sample_points.get(dataset.name, settings.eval_points)

    results = []
    nll: dict[str, float] = {}
    # Compiled rows share the eager model code for scoring and sampling: time those once.
    eager = [e for e in entries if not e.library.endswith("+compile")]
    with torch.inference_mode():
        for entry in entries:
            entry.model.module.eval()
            values = torch.cat([entry.model.log_prob(chunk) for chunk in test.split(10_000)])
            nll[entry.library] = float(-values.double().mean())
        for timed, attr, arg in (
            (lambda e, p: e.model.log_prob(p), "log_prob_times", points),
            (lambda e, n: e.model.sample(n), "sample_times", n_sample),
        ):
            start = time.perf_counter()
            for r in range(settings.repeats):
                for entry in _rotated(eager, r):
                    _sync(device)
                    t0 = clock()
                    timed(entry, arg)
                    _sync(device)
                    getattr(entry, attr).append(clock() - t0)
                if time.perf_counter() - start > settings.repeat_budget_s:
                    break

    for entry in entries:
        warm = entry.windows[1:] or entry.windows
        final_loss = entry.losses[-1]
        row = {
            "data": dataset.name,
            "features": dataset.features,
            "hidden": dataset.hidden,
            "model": model_name,
            "library": entry.library,
            "parameters": entry.model.parameters,
            "effective_parameters": entry.model.effective_parameters,
            "note": entry.model.note,
            "batch": batch,
            "steps": rounds * window,
            "train_steps_per_s": _median_rate(warm, window),
            "train_windows_s": [round(t, 5) for t in entry.windows],
            "final_train_loss": final_loss,
            "test_nll": nll[entry.library],
            "true_test_nll": dataset.true_test_nll,
            "gap_to_truth": (
                nll[entry.library] - dataset.true_test_nll
                if dataset.true_test_nll is not None else None
            ),
            "log_prob_points_per_s": _median_rate(entry.log_prob_times, len(points)),
            "log_prob_times_s": [round(t, 5) for t in entry.log_prob_times],
            "sample_points": n_sample,
            "sample_points_per_s": _median_rate(entry.sample_times, n_sample),
            "sample_times_s": [round(t, 5) for t in entry.sample_times],
            "diverged": not math.isfinite(final_loss) or not math.isfinite(nll[entry.library]),
        }
        results.append(row)
    return results


def measure_memory(row: dict, args: argparse.Namespace, steps: int) -> float | None:
    library = row["library"].split("+")[0]
    cmd = [
        sys.executable, "-m", "benchmarks.memory", "--library", library, "--model", row["model"],
        "--data", row["data"], "--batch", str(args.batch), "--steps", str(steps),
        "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed),
    ]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, check=True, cwd=root, env=env
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError, KeyError) as err:
        print(f"  memory measurement failed for {row['library']}: {err}", file=sys.stderr)
        return None


def add_ratios(rows: list[dict]) -> None:
    """Ratios to the best peer for every figure (speed: value / best; NLL: difference)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["data"], row["model"]), []).append(row)
    higher = ("train_steps_per_s", "log_prob_points_per_s", "sample_points_per_s")
    for group in groups.values():
        peers = [r for r in group if r["library"] in PEERS]
        for key in higher:
            vals = [r[key] for r in peers if r.get(key) is not None and math.isfinite(r[key])]
            best = max(vals) if vals else None
            for r in group:
                r[key + "_vs_best_peer"] = (
                    r[key] / best if best and r.get(key) is not None else None
                )
        mems = [r["peak_mb"] for r in peers if r.get("peak_mb") is not None]
        best_mem = min(mems) if mems else None
        for r in group:
            r["peak_mb_vs_best_peer"] = (
                r["peak_mb"] / best_mem
                if best_mem and r.get("peak_mb") is not None and best_mem > 0 else None
            )
        nlls = [r["test_nll"] for r in peers if math.isfinite(r["test_nll"])]
        best_nll = min(nlls) if nlls else None
        for r in group:
            r["test_nll_minus_best_peer"] = (
                r["test_nll"] - best_nll if best_nll is not None else None
            )


def machine_info(args: argparse.Namespace, settings: Settings) -> dict:
    cpu = cpu_name()
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "torch_threads": args.threads,
        "clock": args.clock,
        "batch": args.batch,
        "mode": "quick" if args.quick else "full",
        "versions": {
            name: (libs.version(name) if name != "exactflow" else _ef_version())
            for name in ("torch", *libs.LIBRARIES)
        },
        "settings": {
            "steps": {k: (args.steps or v) for k, v in settings.steps.items()},
            "model_steps": {} if args.steps else settings.model_steps,
            "window": settings.window,
            "log_prob_points": settings.eval_points,
            "sample_points": {
                k: settings.sample_points.get(k, settings.eval_points) for k in settings.steps
            },
            "optimizer": "Adam(lr=1e-3)",
        },
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ef_version() -> str:
    try:
        import exactflow  # noqa: PLC0415

        return exactflow.__version__
    except ImportError:
        return "not importable"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="exactflow vs zuko, nflows and normflows: speed, memory and test NLL.",
    )
    parser.add_argument("--quick", action="store_true", help="few steps (under 2 minutes)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON and markdown")
    parser.add_argument("--data", default="moons,gmm10,digits", help="comma-separated data sets")
    parser.add_argument(
        "--models", default="maf,iaf,realnvp,nsf", help="comma-separated models"
    )
    parser.add_argument(
        "--libs", default=None,
        help="comma-separated libraries; NAME+compile adds a row with the loss compiled "
        "(default: all four, plus exactflow+compile in the full run)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for all)")
    parser.add_argument("--batch", type=int, default=512, help="training batch size")
    parser.add_argument("--steps", type=int, default=0, help="override the training steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock", default="wall", choices=sorted(CLOCKS),
        help="wall: elapsed time; cpu: this thread's CPU time (steadier on a loaded machine; "
        "CPU runs only, one torch thread)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; skipping the GPU benchmark.")
        return 0
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        print("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
        return 2
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    default = ["exactflow"] + ([] if args.quick else ["exactflow+compile"]) + list(PEERS)
    requested = [s for s in args.libs.split(",") if s] if args.libs else default
    libraries = [lib for lib in requested if libs.available(lib.split("+")[0])]
    missing = sorted(set(requested) - set(libraries))
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (pip install -e '.[bench]')")
    info = machine_info(args, settings)
    info["load_average_start"] = list(os.getloadavg())
    t_start = time.perf_counter()
    rows: list[dict] = []
    for data_name in [s for s in args.data.split(",") if s]:
        dataset = load(data_name, seed=args.seed)
        for model_name in [s for s in args.models.split(",") if s]:
            t0 = time.perf_counter()
            config_rows = bench_config(dataset, model_name, libraries, settings, args)
            measure = data_name in settings.memory_data and model_name in settings.memory_models
            if not args.no_memory and measure:
                for row in config_rows:
                    if not row["library"].endswith("+compile"):  # same model code as eager
                        row["peak_mb"] = measure_memory(row, args, settings.memory_steps)
            rows.extend(config_rows)
            print(f"{data_name:7s} {model_name:8s} done in {time.perf_counter() - t0:6.1f} s")
            for row in config_rows:
                lp, sp = row["log_prob_points_per_s"], row["sample_points_per_s"]
                print(
                    f"    {row['library']:18s} {row['train_steps_per_s']:8.1f} steps/s "
                    f"log_prob {(lp or math.nan) / 1e3:8.1f} kpts/s "
                    f"sample {(sp or math.nan) / 1e3:8.2f} kpts/s "
                    f"NLL {row['test_nll']:8.3f}  params {row['parameters']} "
                    f"(effective {row['effective_parameters']})"
                )
    add_ratios(rows)
    info["load_average_end"] = list(os.getloadavg())
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench" + ("-quick" if args.quick else "") + ("-cuda" if args.device == "cuda" else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": info, "results": rows}, indent=1))
    write_markdown(info, rows, out / f"{stem}.md")
    print(f"wrote {out / stem}.json and .md in {info['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

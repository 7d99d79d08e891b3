"""Scaling out: training throughput with 1 and 2 processes, and peak memory on big data.

``python -m benchmarks.scaling`` measures and writes ``benchmarks/results/scaling.{json,md}``:

* **throughput** (rows/s of ``ef.fit``) on the CPU for two flows (MAF on 2-D data, the
  latency-bound case; MAF on 16-D data with 256-wide networks): one process with one
  thread and with two, and two gloo processes of one thread each with the default DDP
  engine and with the flat all-reduce after the backward pass (``ddp=False``, the engine of
  exactflow before DDP). Every configuration runs in fresh processes
  (``ef.distributed.launch``); the configurations are interleaved in rounds, so a change
  of machine load hits them alike; the figure is the median over timed windows of steps
  (``history.time`` at records) after a warm-up window.
* **gpu** (only with CUDA): one GPU in float32 and in ``precision="bf16"``, and two GPUs
  (NCCL, DDP and flat all-reduce) when there are two.
* **memory**, each in a fresh process (``--probe``): training from ``.npy`` shards much
  larger than the memory it uses, and scoring a ``.npy`` file of one and of ten times the
  chunk size with ``ef.evaluate`` and ``exactflow.scoring.log_prob`` (the same peak for
  both sizes: memory follows the chunk, not the file). It reports the growth of anonymous
  resident memory (``RssAnon``, sampled every millisecond: the memory a process really
  holds; file pages of memory maps are not counted, the kernel drops them when it needs
  the room), the growth of the peak resident set (``VmHWM``, which does count the mapped
  file pages touched), and the ``tracemalloc`` peak of Python/numpy allocations.

Options: ``--quick`` (fewer steps and rounds, smaller files), ``--part throughput gpu
memory`` (any of them), ``--out DIR``. The command, the machine, torch's version and the
load average at start and end are written with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch

import exactflow as ef

from .saving import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"

MODELS: dict[str, dict[str, Any]] = {
    "maf-2d": {"features": 2, "layers": 5, "hidden": (64, 64), "batch": 512},
    "maf-16d": {"features": 16, "layers": 5, "hidden": (256, 256), "batch": 1024},
}
GPU_MODELS: dict[str, dict[str, Any]] = {
    "maf-16d": {"features": 16, "layers": 5, "hidden": (256, 256), "batch": 8192},
    "maf-64d": {"features": 64, "layers": 5, "hidden": (1024, 1024), "batch": 8192},
}
# name: (processes, threads per process, ddp)
CPU_CONFIGS: dict[str, tuple[int, int, bool]] = {
    "1 process, 1 thread": (1, 1, True),
    "1 process, 2 threads": (1, 2, True),
    "2 processes, DDP": (2, 1, True),
    "2 processes, flat all-reduce": (2, 1, False),
}


# -- throughput ----------------------------------------------------------------------------


def _data(features: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(features, features, generator=gen) / features**0.5
    x = torch.randn(rows, features, generator=gen) @ mix
    return x + 0.3 * x.pow(2)


def _throughput_worker(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: train, return the wall-clock of each record (every ``window`` steps)."""
    torch.manual_seed(rank)
    flow = ef.models.maf(spec["features"], layers=spec["layers"], hidden=spec["hidden"])
    data = _data(spec["features"], max(16 * spec["batch"], 20_000))
    window, windows = spec["window"], spec["windows"]
    cpu: list[float] = []
    history = ef.fit(
        flow, data, steps=window * (windows + 1), batch_size=spec["batch"], lr=1e-3,
        eval_every=window, val_fraction=0, progress=False, device=spec["device"],
        ddp=spec["ddp"],
        precision=spec.get("precision", "fp32"), seed=0,
        callback=lambda h: cpu.append(time.process_time()),
    )
    return {"time": history.time, "cpu": cpu}


def _rates(times: list[float], window: int, batch: int) -> list[float]:
    """Rows/s of each timed window (the first window, with the warm-up, is dropped)."""
    return [batch * window / (b - a) for a, b in zip(times[:-1], times[1:], strict=True)]


def _run_config(spec: dict[str, Any], processes: int, threads: int,
                backend: str) -> tuple[list[float], list[float]]:
    """Rows per wall-clock second, and rows per CPU-second of all processes together."""
    ranks = ef.distributed.launch(_throughput_worker, processes, spec, threads=threads,
                                  backend=backend, timeout=600)
    wall = _rates(ranks[0]["time"], spec["window"], spec["batch"])
    cpu = [sum(parts) for parts in zip(*(np.diff(r["cpu"]) for r in ranks), strict=True)]
    return wall, [spec["batch"] * spec["window"] / c for c in cpu]


def throughput(quick: bool) -> list[dict[str, Any]]:
    rounds, window, windows = (1, 5, 3) if quick else (3, 10, 4)
    rates: dict[tuple[str, str], list[float]] = {}
    per_cpu: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for model, base in MODELS.items():
            for name, (processes, threads, ddp) in CPU_CONFIGS.items():
                spec = {**base, "window": window, "windows": windows, "device": "cpu",
                        "ddp": ddp}
                got, cpu = _run_config(spec, processes, threads, "gloo")
                rates.setdefault((model, name), []).extend(got)
                per_cpu.setdefault((model, name), []).extend(cpu)
                print(f"round {r + 1}/{rounds} {model:8s} {name:30s} "
                      f"{statistics.median(got):10.0f} rows/s "
                      f"{statistics.median(cpu):10.0f} rows/CPU-s", flush=True)
    return _summarize(rates, MODELS, "cpu", per_cpu)


def _summarize(rates: dict[tuple[str, str], list[float]], models: dict[str, dict[str, Any]],
               device: str, per_cpu: dict[tuple[str, str], list[float]] | None = None,
               ) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        base_name = next(name for (m, name) in rates if m == model)
        base = statistics.median(rates[(model, base_name)])
        for (m, name), values in rates.items():
            if m != model:
                continue
            median = statistics.median(values)
            rows.append({
                "device": device, "model": model, "config": name,
                "batch": models[model]["batch"], "rows_per_s": round(median, 1),
                "spread": [round(min(values), 1), round(max(values), 1)],
                "windows": len(values), "speedup": round(median / base, 3),
                "rows_per_cpu_s": (round(statistics.median(per_cpu[(m, name)]), 1)
                                   if per_cpu else None),
            })
    return rows


def gpu(quick: bool) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        print("gpu: CUDA not available, skipped", flush=True)
        return []
    rounds, window, windows = (1, 5, 3) if quick else (2, 20, 4)
    configs: dict[str, tuple[int, bool, str]] = {"1 GPU, fp32": (1, True, "fp32")}
    if torch.cuda.is_bf16_supported():
        configs["1 GPU, bf16"] = (1, True, "bf16")
    if torch.cuda.device_count() >= 2 and torch.distributed.is_nccl_available():
        configs["2 GPUs, NCCL, DDP"] = (2, True, "fp32")
        configs["2 GPUs, NCCL, flat all-reduce"] = (2, False, "fp32")
    rates: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for model, base in GPU_MODELS.items():
            for name, (processes, ddp, precision) in configs.items():
                spec = {**base, "window": window, "windows": windows, "device": "cuda",
                        "ddp": ddp, "precision": precision}
                got, _ = _run_config(spec, processes, 2, "nccl" if processes > 1 else "gloo")
                rates.setdefault((model, name), []).extend(got)
                print(f"round {r + 1}/{rounds} {model:8s} {name:30s} "
                      f"{statistics.median(got):10.0f} rows/s", flush=True)
    return _summarize(rates, GPU_MODELS, torch.cuda.get_device_name())


# -- memory (each probe in a fresh process) ----------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{key} not in /proc/self/status")


class _Peak:
    """The largest RssAnon while the block runs (a thread samples it every millisecond)."""

    def __enter__(self) -> _Peak:
        self.anon_before = self.anon_peak = _status_mb("RssAnon")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.hwm_before = _status_mb("VmHWM")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        tracemalloc.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon_peak = max(self.anon_peak, _status_mb("RssAnon"))
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        self.anon_peak = max(self.anon_peak, _status_mb("RssAnon"))
        self.hwm = _status_mb("VmHWM")

    def result(self) -> dict[str, float]:
        return {"anon_growth_mb": round(self.anon_peak - self.anon_before, 1),
                "hwm_growth_mb": round(self.hwm - self.hwm_before, 1),
                "tracemalloc_peak_mb": round(self.traced, 1)}


def _probe_shards(folder: str, rows: int, features: int, steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    chunk = 1_000_000
    gen = np.random.default_rng(0)
    mix = gen.normal(size=(features, features)).astype(np.float32) / features**0.5
    for k, lo in enumerate(range(0, rows, chunk)):
        part = gen.normal(size=(min(chunk, rows - lo), features)).astype(np.float32) @ mix
        ef.datasets.write_shards(part, folder, rows_per_shard=chunk, prefix=f"p{k:04d}-")
    table = ef.datasets.Shards(folder)
    train, val = table.slice(0, rows - rows // 10), table.slice(rows - rows // 10, rows)
    # warm-up on a small array: one-time imports and caches are not what is measured
    ef.fit(ef.models.maf(features, layers=3, hidden=(64, 64), standardize=True),
           np.asarray(table[:4096]), steps=3, batch_size=512, progress=False, device="cpu")
    flow = ef.models.maf(features, layers=3, hidden=(64, 64), standardize=True)
    start = time.perf_counter()
    with _Peak() as peak:
        history = ef.fit(flow, train, val, steps=steps, batch_size=1024, eval_every=steps,
                         progress=False, device="cpu")
    return {"probe": "train from shards", "rows": rows, "features": features,
            "files": len(table.files), "data_mb": round(table.nbytes / 2**20, 1),
            "steps": history.total_steps, "batch": 1024, "val_rows": len(val),
            "seconds": round(time.perf_counter() - start, 1), **peak.result()}


def _probe_score(folder: str, chunk: int, features: int, multiple: int,
                 what: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = multiple * chunk
    path = Path(folder) / "score.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    gen = np.random.default_rng(1)
    for lo in range(0, rows, chunk):
        out[lo : lo + chunk] = gen.normal(size=(min(chunk, rows - lo), features))
    out.flush()
    del out
    torch.manual_seed(0)
    flow = ef.models.maf(features, layers=3, hidden=(64, 64))
    ef.evaluate(flow, np.zeros((16, features), np.float32))  # imports, not a chunk's memory
    data = np.load(path, mmap_mode="r")
    with _Peak() as peak:
        if what == "evaluate":
            ef.evaluate(flow, data, batch_size=chunk)
        else:
            ef.scoring.log_prob(flow, data, chunk=chunk)
    name = "ef.evaluate" if what == "evaluate" else "exactflow.scoring.log_prob"
    return {"probe": f"score a file {multiple}x the chunk ({name})", "rows": rows,
            "features": features, "data_mb": round(path.stat().st_size / 2**20, 1),
            "chunk_mb": round(chunk * features * 4 / 2**20, 1), **peak.result()}


def memory(quick: bool) -> list[dict[str, Any]]:
    if not Path("/proc/self/status").exists():
        print("memory: needs Linux /proc, skipped", flush=True)
        return []
    shard_rows, steps = (5_000_000, 100) if quick else (20_000_000, 300)
    chunk = 65_536
    probes = [["shards", str(shard_rows), "8", str(steps)]] + [
        ["score", str(chunk), "16", str(multiple), what]
        for what in ("evaluate", "log_prob") for multiple in (1, 10)
    ]
    out: list[dict[str, Any]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="exactflow-scaling-") as tmp:
        for k, probe in enumerate(probes):
            folder = Path(tmp) / f"probe-{k}"
            folder.mkdir()
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.scaling", "--probe", *probe, str(folder)],
                capture_output=True, text=True, env=env, check=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(out[-1]), flush=True)
    return out


# -- report -----------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "exactflow": ef.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_start": [round(v, 2) for v in os.getloadavg()]}


def _markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Scaling benchmark, {report['date']}: `{report['command']}`",
        "",
        f"- machine: {env['cpu']} ({env['cores']} cores), CUDA: {env['cuda'] or 'none'}; "
        f"torch {env['torch']}, exactflow {env['exactflow']}, Python {env['python']}",
        f"- load average (1, 5, 15 min) at start {env['load_start']}, at end "
        f"{env['load_end']}; wall time {report['seconds']:.0f} s",
        "",
    ]
    if report["throughput"] or report["gpu"]:
        lines += [
            "## Training throughput (`ef.fit`, rows per second)",
            "",
            "Median over timed windows (after a warm-up window) of interleaved rounds; "
            "`spread` is the slowest and fastest window; `x` is the ratio to the first "
            "configuration of the model; rows per CPU-second count the CPU time of all "
            "processes together (what the work costs, whatever else runs on the machine).",
            "",
            "| device | model | batch | configuration | rows/s | spread | x | rows/CPU-s |",
            "|---|---|---:|---|---:|---|---:|---:|",
        ]
        for row in report["throughput"] + report["gpu"]:
            lo, hi = row["spread"]
            cpu = row.get("rows_per_cpu_s")
            lines.append(f"| {row['device']} | {row['model']} | {row['batch']} | "
                         f"{row['config']} | {row['rows_per_s']:,.0f} | {lo:,.0f}-{hi:,.0f} | "
                         f"{row['speedup']:.2f}x | {'' if cpu is None else f'{cpu:,.0f}'} |")
        lines.append("")
    if report["memory"]:
        lines += [
            "## Peak memory on data larger than the memory used",
            "",
            "Growth over the process's memory before the call: anonymous resident memory "
            "(what the process holds), the peak resident set (also counts the mapped file "
            "pages the kernel may drop) and the tracemalloc peak.",
            "",
            "| what | rows x features | data MB | anon growth MB | peak RSS growth MB | "
            "tracemalloc MB |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in report["memory"]:
            what = row["probe"]
            if "chunk_mb" in row:
                what += f", chunks of {row['chunk_mb']} MB of rows"
            if "steps" in row:
                what += (f", {row['files']} files, {row['steps']} steps of {row['batch']}, "
                         f"{row['val_rows']:,} validation rows streamed")
            lines.append(f"| {what} | {row['rows']:,} x {row['features']} | {row['data_mb']} | "
                         f"{row['anon_growth_mb']} | {row['hwm_growth_mb']} | "
                         f"{row['tracemalloc_peak_mb']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", nargs="+", choices=["throughput", "gpu", "memory"],
                        default=["throughput", "gpu", "memory"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        kind, *rest = args.probe
        if kind == "shards":
            result = _probe_shards(rest[3], int(rest[0]), int(rest[1]), int(rest[2]))
        else:
            result = _probe_score(rest[4], int(rest[0]), int(rest[1]), int(rest[2]), rest[3])
        print(json.dumps(result))
        return 0
    start = time.perf_counter()
    command = "python -m benchmarks.scaling" + (" --quick" if args.quick else "") + (
        "" if set(args.part) == {"throughput", "gpu", "memory"} else " --part " +
        " ".join(args.part))
    report: dict[str, Any] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                              "environment": _environment(), "throughput": [], "gpu": [],
                              "memory": []}
    if "throughput" in args.part:
        report["throughput"] = throughput(args.quick)
    if "gpu" in args.part:
        report["gpu"] = gpu(args.quick)
    if "memory" in args.part:
        report["memory"] = memory(args.quick)
    report["environment"]["load_end"] = [round(v, 2) for v in os.getloadavg()]
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    name = "scaling-quick" if args.quick else "scaling"
    if set(args.part) != {"throughput", "gpu", "memory"}:
        name += "-" + "-".join(sorted(args.part))
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(_markdown(report))
    print(f"wrote {args.out / name}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

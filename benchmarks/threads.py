"""Wall time of an ``exactflow`` command by thread setting, on a machine under load.

``python -m benchmarks.threads`` runs the same command with the automatic thread choice
(no ``--threads``: what a user gets), with ``--threads 1``, with ``--threads 2`` and with
torch's own default (one thread per core: ``--threads <cores>``, what every command but
``demo`` used before the automatic choice), interleaved (variant after variant, repeat after
repeat, so a change in the machine's load hits every variant alike), while ``--load``
busy-loop processes keep the cores busy. Each run is a fresh process (``python -m
exactflow``), timed from start to exit, imports included. It prints a table of the median
time of each variant and its ratio to one thread, and writes it with the raw times to
``benchmarks/results/threads-<name>.md`` and ``.json``.

Examples::

    python -m benchmarks.threads                      # train, load = one busy loop per core
    python -m benchmarks.threads --load 0             # the same, no added load
    python -m benchmarks.threads --command sample --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .saving import publish

REPO = Path(__file__).resolve().parents[1]


def _busy_loops(n: int) -> list[subprocess.Popen]:
    code = "while True:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def _command(kind: str, work: Path, steps: int) -> list[str]:
    run = work / "run"
    if kind == "train":
        return ["train", "moons", "--model", "maf", "--steps", str(steps), "--samples", "5000",
                "--no-report", "--overwrite", "--out", str(run)]
    if kind == "train-large":
        return ["train", "moons", "--model", "maf", "--hidden", "512,512", "--batch-size",
                "1024", "--steps", str(max(1, steps // 10)), "--samples", "5000",
                "--no-report", "--overwrite", "--out", str(run)]
    if kind == "sample":
        return ["sample", str(run), "-n", "200000", "-o", str(work / "s.npy"), "--seed", "0"]
    if kind == "score":
        return ["score", str(run), str(work / "s.npy"), "-o", str(work / "scores.npy")]
    raise ValueError(f"unknown command {kind!r}")


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "exactflow", *argv], env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"exactflow {' '.join(argv)} failed: {proc.stderr.strip()}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--command", default="train",
                   choices=("train", "train-large", "sample", "score"))
    p.add_argument("--load", type=int, default=cores,
                   help="busy-loop processes running meanwhile (default: one per core)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="training steps of train")
    p.add_argument("--name", default=None, help="results file name (default: command-load)")
    args = p.parse_args(argv)

    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "EXACTFLOW_THREADS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    variants = {
        "automatic (no --threads)": [],
        "--threads 1": ["--threads", "1"],
        "--threads 2": ["--threads", "2"],
        f"torch default (--threads {cores})": ["--threads", str(cores)],
    }
    if cores == 2:  # torch's default is --threads 2 here: time it once, under both names
        del variants["--threads 2"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.command in ("sample", "score"):  # a run folder to sample from or score
            _time(_command("train", work, 30) + ["--threads", "1"], env)
            _time(_command("sample", work, 0) + ["--threads", "1"], env)
        load = _busy_loops(args.load)
        try:
            time.sleep(1.0 if args.load else 0.0)
            for repeat in range(args.repeats):
                for name, extra in variants.items():
                    times[name].append(_time(_command(args.command, work, args.steps) + extra,
                                             env))
                    print(f"repeat {repeat + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
    one = statistics.median(times["--threads 1"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "median_s": median, "vs_one_thread": median / one,
                     "times_s": values})
    try:
        loadavg = os.getloadavg()[0]
    except OSError:
        loadavg = None
    meta = {"command": "exactflow " + " ".join(_command(args.command, Path("WORK"),
                                                        args.steps)),
            "cores": cores, "busy_loops": args.load, "repeats": args.repeats,
            "loadavg_1min_after": loadavg}
    lines = [
        f"# exactflow {args.command}: wall time by thread setting",
        "",
        f"`{meta['command']}`, {cores} cores, {args.load} busy-loop processes meanwhile, "
        f"{args.repeats} interleaved repeats (1-min load average after: {loadavg}).",
        "",
        "| variant | median s | vs --threads 1 | runs (s) |",
        "| --- | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_s']:.2f} | {r['vs_one_thread']:.2f}x | "
                     + ", ".join(f"{t:.2f}" for t in r["times_s"]) + " |")
    name = args.name or f"threads-{args.command}-load{args.load}"
    publish(name, lines, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

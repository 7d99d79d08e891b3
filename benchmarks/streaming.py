"""Peak memory and time of ``exactflow sample -n N`` to CSV, ``.npy`` and stdout.

``python -m benchmarks.streaming`` trains a tiny run folder, then runs ``exactflow sample
RUN -n N`` in a fresh process for each ``N`` and output (``-o s.csv``, ``-o s.npy``, CSV
on stdout into ``/dev/null``), and reports each process's peak resident set size (from
``wait4``) and wall time. The first row's memory is mostly the interpreter and torch; what
grows with ``N`` is what the command holds. ``--pythonpath`` runs another checkout's
exactflow (to compare with a version that held every sample in memory).
Writes ``benchmarks/results/streaming-<name>.md``.

Examples::

    python -m benchmarks.streaming
    python -m benchmarks.streaming --pythonpath ../other-checkout --name before --n 1e5,1e6
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .saving import publish

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], env: dict[str, str], stdout: int | None, cwd: Path
         ) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of ``python -m exactflow argv`` in a fresh process
    (run from ``cwd``: ``-m`` puts the working folder first on the import path)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "exactflow", *argv], env=env,
                            stdout=stdout, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"exactflow {' '.join(argv)} failed: {err.strip()}")
    return usage.ru_maxrss / 1024, elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="1e4,1e6,1e7", help="comma-separated sample counts")
    p.add_argument("--outputs", default="csv,npy,stdout")
    p.add_argument("--pythonpath", default=str(REPO), help="the exactflow checkout to run")
    p.add_argument("--name", default="after")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "EXACTFLOW_THREADS"}
    env.update(PYTHONPATH=os.path.abspath(args.pythonpath), OMP_NUM_THREADS="1")
    counts = [int(float(v)) for v in args.n.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "exactflow", "train", "moons", "--model", "maf",
                        "--layers", "2", "--hidden", "16", "--steps", "20", "--samples",
                        "1000", "--no-report", "--out", str(run)], env=env, check=True,
                       capture_output=True, cwd=tmp)
        for n in counts:
            for output in args.outputs.split(","):
                cmd = ["sample", str(run), "-n", str(n), "--seed", "0"]
                if output == "stdout":
                    with open(os.devnull, "wb") as sink:
                        rss, secs = _run(cmd, env, sink.fileno(), Path(tmp))
                else:
                    target = Path(tmp) / f"s.{output}"
                    rss, secs = _run(cmd + ["-o", str(target)], env, subprocess.DEVNULL,
                                     Path(tmp))
                    target.unlink()
                rows.append((n, output, rss, secs))
                print(f"n={n:>11,} {output:>6}: peak RSS {rss:7.1f} MB, {secs:6.1f} s",
                      flush=True)
    lines = [
        f"# exactflow sample: peak memory by rows ({args.name})",
        "",
        f"`python -m benchmarks.streaming {' '.join(argv or sys.argv[1:])}` "
        "(a 2-feature MAF, one thread; peak RSS of the whole process, torch included).",
        "",
        "| rows | output | peak RSS (MB) | wall (s) |",
        "| ---: | --- | ---: | ---: |",
    ]
    lines += [f"| {n:,} | {o} | {r:.0f} | {s:.1f} |" for n, o, r, s in rows]
    publish(f"streaming-{args.name}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

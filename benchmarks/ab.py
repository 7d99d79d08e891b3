"""Speed of exactflow at a git revision against the working tree, one process at a time.

``python -m benchmarks.ab --base HEAD~1 --model maf --data gmm10,digits`` exports the
package at ``--base`` (``git archive``) to a temporary folder, then alternates processes
that import that copy and the working tree's package, ``--rounds`` times each. Every
process builds the benchmark's model (``libs.py``) for each data set and measures, in
thread CPU time with one torch thread, a training step at batch 512 with torch's Adam
(median of 5 windows of 20 steps, after 10 warm-up steps), ``log_prob`` of 10,000 test
rows and ``sample`` of 10,000 points (medians of 7 calls, after 3 warm-up calls: the first
calls of a process page in fresh buffers). The table gives the medians over rounds, their
range, and the ratio of the medians (above 1: the working tree is faster). Alternating
processes keeps a shared machine's load from favouring one side; a process's memory layout
and allocator state still move its figures by several percent (the ranges show how much),
so small differences need many rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROCESS = r"""
import json, statistics, sys, time
package, root, model, datas = sys.argv[1:5]
sys.path.insert(0, package)
import torch
import exactflow
assert exactflow.__file__.startswith(package), exactflow.__file__
sys.path.insert(1, root)
from benchmarks.data import load
from benchmarks.libs import build
torch.set_num_threads(1)
out = {}
for name in datas.split(","):
    data = load(name)
    torch.manual_seed(0)
    flow = build("exactflow", model, data.features, data.hidden)
    optimizer = torch.optim.Adam(flow.module.parameters(), lr=1e-3)
    batch = data.train[:512]
    rows = data.test.repeat(10000 // len(data.test) + 1, 1)[:10000]

    def step():
        optimizer.zero_grad(set_to_none=True)
        (-flow.log_prob(batch).mean()).backward()
        optimizer.step()

    for _ in range(10):
        step()
    windows = []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(20):
            step()
        windows.append((time.thread_time() - start) / 20)
    out[name] = [statistics.median(windows) * 1e3]
    for call in (lambda: flow.log_prob(rows), lambda: flow.sample(10000)):
        calls = []
        with torch.inference_mode():
            for _ in range(3):  # the allocator settles over the first calls
                call()
            for _ in range(7):
                start = time.thread_time()
                call()
                calls.append(time.thread_time() - start)
        out[name].append(statistics.median(calls) * 1e3)
print(json.dumps(out))
"""


def measure(package: Path, model: str, datas: str) -> dict[str, list[float]]:
    """One process's figures for the package in ``package`` (its parent folder)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROCESS, str(package), str(ROOT), model, datas],
        capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--model", default="maf")
    p.add_argument("--data", default="moons,gmm10,digits")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "exactflow"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        sides = {"base": Path(tmp), "tree": ROOT}
        results: dict[str, list[dict[str, list[float]]]] = {"base": [], "tree": []}
        for _ in range(args.rounds):
            for side, package in sides.items():
                results[side].append(measure(package, args.model, args.data))
    print(f"{args.model}: {args.base} against the working tree, thread CPU time, "
          f"medians of {args.rounds} alternating rounds")
    print("| data | what | base ms (range) | tree ms (range) | speed-up |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.data.split(","):
        for i, what in enumerate(
            ("training step", "log_prob of 10,000 rows", "sample of 10,000 points")
        ):
            base_all = [r[name][i] for r in results["base"]]
            tree_all = [r[name][i] for r in results["tree"]]
            base, tree = statistics.median(base_all), statistics.median(tree_all)
            print(f"| {name} | {what} | {base:.2f} ({min(base_all):.2f}-{max(base_all):.2f}) | "
                  f"{tree:.2f} ({min(tree_all):.2f}-{max(tree_all):.2f}) | "
                  f"{base / tree:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

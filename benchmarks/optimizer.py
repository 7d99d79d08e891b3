"""What ``exactflow.fit``'s optimizer saves: a training step with torch's default Adam
against the same step with fit's fused AdamW (``exactflow.training.loop.adam``).

``python -m benchmarks.optimizer`` builds exactflow's benchmark models (``libs.py``: the
architectures of ``run.py``) on its data sets and times, interleaved in one process on one
torch thread, training steps at batch 512 with each optimizer; the optimizer update alone
is timed the same way on the model's parameters with random gradients. The cross-library
table of ``run.py`` gives every library the same default Adam, so this gain is not in it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from . import data, libs
from .saving import command as saving_command
from .saving import cpu_name, save

MODELS = ("maf", "realnvp", "nsf")


def _step(model: libs.Model, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], Any]:
    def step(xb: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        (-model.log_prob(xb).mean()).backward()
        optimizer.step()

    return step


def _update(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], Any]:
    def step(xb: torch.Tensor) -> None:
        optimizer.step()

    return step


def measure(dataset: data.Dataset, model_name: str, rounds: int, window: int,
            seed: int = 0) -> dict[str, Any]:
    """Median milliseconds per training step and per update with each optimizer."""
    from exactflow.training.loop import adam  # noqa: PLC0415

    makers = {"Adam (torch default)": lambda p: torch.optim.Adam(p, lr=1e-3),
              "fit's AdamW (fused)": lambda p: adam(p, 1e-3)}
    runs: dict[str, Callable[[torch.Tensor], Any]] = {}
    tensors = 0
    for name, make in makers.items():
        torch.manual_seed(seed)
        model = libs.build("exactflow", model_name, dataset.features, dataset.hidden)
        params = [p for p in model.module.parameters() if p.requires_grad]
        tensors = len(params)
        runs[f"step, {name}"] = _step(model, make(params))
        for p in params:
            p.grad = torch.randn_like(p)
        alone = [p.detach().clone().requires_grad_() for p in params]
        for p, q in zip(alone, params, strict=True):
            p.grad = q.grad.clone()
        runs[f"update, {name}"] = _update(make(alone))
    gen = torch.Generator().manual_seed(seed + 1)
    index = torch.randint(len(dataset.train), (rounds, window, 512), generator=gen)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):  # the first round warms up
        order = list(runs) if r % 2 else list(reversed(runs))
        for key in order:
            t0 = time.perf_counter()
            for s in range(window):
                runs[key](dataset.train[index[r % rounds, s]])
            if r:
                times[key].append((time.perf_counter() - t0) / window * 1e3)
    return {"data": dataset.name, "model": model_name, "tensors": tensors,
            **{k: statistics.median(v) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="moons,gmm10,digits")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--name", default="optimizer", help="results/<name>.md and .json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for name in args.data.split(","):
        dataset = data.load(name)
        for model in args.models.split(","):
            rows.append(measure(dataset, model, args.rounds, args.window))
            print(rows[-1], flush=True)
    command = saving_command("optimizer", argv)
    lines = [
        "# Training step with torch's default Adam and with fit's fused AdamW",
        "",
        f"`{command}`: {time.perf_counter() - start:.0f} s, {cpu_name()}, torch "
        f"{torch.__version__}, one thread, batch 512; median milliseconds over "
        f"{args.rounds} interleaved windows of {args.window} steps.",
        "",
        "| data | model | tensors | step, Adam | step, fused AdamW | step ratio "
        "| update, Adam | update, fused AdamW |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        slow, fast = r["step, Adam (torch default)"], r["step, fit's AdamW (fused)"]
        lines.append(
            f"| {r['data']} | {r['model']} | {r['tensors']} | {slow:.2f} | {fast:.2f} | "
            f"{slow / fast:.2f}x | {r['update, Adam (torch default)']:.3f} | "
            f"{r['update, fit' + chr(39) + 's AdamW (fused)']:.3f} |")
    print(save(args.name, "\n".join(lines) + "\n", {"command": command, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

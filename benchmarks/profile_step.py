"""Profile one library's training step with ``torch.profiler`` (CPU).

``python -m benchmarks.profile_step --library exactflow --model nsf --data moons``
prints the operators that take the most self CPU time over ``--steps`` training steps
(forward, backward and Adam), after a warm-up, and the total wall time per step. Used to
find where exactflow's time goes (``benchmarks/NOTES.md``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .data import load
from .libs import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default="exactflow")
    parser.add_argument("--model", default="maf")
    parser.add_argument("--data", default="moons")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--what", default="train", choices=("train", "log_prob", "sample"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dataset = load(args.data)
    torch.manual_seed(0)
    model = build(args.library, args.model, dataset.features, dataset.hidden)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(len(dataset.train), (args.steps * 2, args.batch), generator=gen)

    def step(i: int) -> None:
        if args.what == "train":
            optimizer.zero_grad(set_to_none=True)
            loss = -model.log_prob(dataset.train[index[i]]).mean()
            loss.backward()
            optimizer.step()
        elif args.what == "log_prob":
            with torch.inference_mode():
                model.log_prob(dataset.train[index[i]])
        else:
            with torch.inference_mode():
                model.sample(args.batch)

    for i in range(args.steps):  # warm-up, and a profile-free timing
        step(i)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    per_step = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps, 2 * args.steps):
            step(i)
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))
    print(
        f"{args.library} {args.model} on {args.data} ({args.what}, batch {args.batch}): "
        f"{per_step * 1e3:.2f} ms per step without the profiler"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of training steps, measured in a fresh process per library.

``python -m benchmarks.memory --library zuko --model maf --data moons`` prints one JSON line.

What it measures (CPU): the process's peak resident set size during ``--steps`` training
steps (forward, backward, Adam update at the given batch) minus its resident set size just
before them, after importing, loading the data and building the model and the optimizer.
The kernel's high-water mark is reset first (``/proc/self/clear_refs``, Linux), so earlier
peaks (imports, data generation) do not hide it; where that is not possible it falls back
to the growth of ``ru_maxrss``. It counts activations kept for the backward pass,
gradients, Adam's state, temporaries and allocator overhead. On CUDA it reports
``torch.cuda.max_memory_allocated`` growth over the same steps instead.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from pathlib import Path

import torch


def measure(
    library: str, model: str, data: str, batch: int, steps: int, threads: int, device: str,
    seed: int = 0,
) -> dict:
    from .data import load  # noqa: PLC0415
    from .libs import build  # noqa: PLC0415

    torch.set_num_threads(threads)
    dataset = load(data, seed=seed)
    torch.manual_seed(seed)
    m = build(library, model, dataset.features, dataset.hidden)
    m.module.to(device)
    optimizer = torch.optim.Adam(m.module.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    batches = [
        dataset.train[torch.randint(len(dataset.train), (batch,), generator=gen)].to(device)
        for _ in range(steps)
    ]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak()
        before = _status_kib("VmRSS") if reset else _maxrss_kib()
    for xb in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = -m.log_prob(xb).mean()
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        what = "cuda max_memory_allocated growth"
    else:
        peak = _status_kib("VmHWM") if reset else _maxrss_kib()
        peak_mb = (peak - before) / 1024
        what = "peak RSS above the RSS before training" if reset else "ru_maxrss growth"
    return {
        "library": library, "model": model, "data": data, "batch": batch, "steps": steps,
        "peak_mb": round(peak_mb, 2), "measures": what,
    }


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1))


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = measure(
        args.library, args.model, args.data, args.batch, args.steps, args.threads,
        args.device, args.seed,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train from .npy shards in a fresh process and report the memory it took (one JSON line).

``python tests/shard_memory_probe.py FOLDER ROWS FEATURES`` writes ``ROWS x FEATURES``
float32 rows as shards in FOLDER, then measures ``ef.fit`` on them (the checks of every
row, the standardization statistics, the shuffle, 40 steps, the last tenth of the rows
streamed for validation): the growth of the process's anonymous resident memory
(``RssAnon`` in ``/proc/self/status``, sampled every millisecond by a thread; file pages of
the memory maps are not counted, as the kernel can drop them at will) and the peak of
Python/numpy allocations (``tracemalloc``), after a warm-up fit on a small array (one-time
imports and caches are not counted).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import tracemalloc

import numpy as np
import torch


def anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The largest RssAnon seen while the block runs."""

    def __enter__(self) -> PeakSampler:
        self.peak = anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_mb())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_mb())


def main(folder: str, rows: int, features: int) -> dict:
    import exactflow as ef

    torch.set_num_threads(1)
    chunk = 500_000
    gen = np.random.default_rng(0)
    mix = gen.normal(size=(features, features)).astype(np.float32)
    for k, lo in enumerate(range(0, rows, chunk)):
        part = gen.normal(size=(min(chunk, rows - lo), features)).astype(np.float32) @ mix
        ef.datasets.write_shards(part, folder, rows_per_shard=chunk, prefix=f"p{k:03d}-")
    table = ef.datasets.Shards(folder)
    # Warm up on a small array first: the first fit imports and caches (optimizers, autograd)
    # what every later one reuses; those one-time costs are not what is measured.
    small = gen.normal(size=(2048, features)).astype(np.float32)
    ef.fit(ef.models.maf(features, layers=2, hidden=(16,), standardize=True), small,
           small[:512], steps=3, batch_size=256, progress=False, device="cpu")
    torch.manual_seed(0)
    flow = ef.models.maf(features, layers=2, hidden=(16,), standardize=True)
    before = anon_mb()
    tracemalloc.start()
    # The validation rows are given (the last tenth of the table, streamed): fit's default
    # hold-out would draw them at random and keep index arrays of 16 bytes a row.
    train, val = table.slice(0, rows - rows // 10), table.slice(rows - rows // 10, rows)
    with PeakSampler() as sampler:
        history = ef.fit(flow, train, val, steps=40, batch_size=256, lr=1e-3, progress=False,
                         device="cpu")
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "data_mb": table.nbytes / 2**20,
        "files": len(table.files),
        "anon_before_mb": before,
        "peak_anon_growth_mb": sampler.peak - before,
        "tracemalloc_peak_mb": traced_peak / 2**20,
        "steps": history.total_steps,
        "final_nll": history.train_nll[-1],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))

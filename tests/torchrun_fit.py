"""One rank of a (simulated) multi-node run under ``torchrun``: ``ef.distributed.init()``,
then the ActNorm + MAF fit of ``tests/test_distributed.py`` with its checkpoint on a path
every node shares, interrupted after step 6 (the last checkpoint is step 4).

``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT
tests/torchrun_fit.py FOLDER`` on each node; ``tests/test_multinode.py`` runs two such
launchers on one machine and resumes the checkpoint in one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import exactflow as ef
from tests.test_distributed import MAF_ARGS, _actnorm_maf, _data, _Interrupt, _interrupt_at


def main(folder: Path) -> None:
    rank, world = ef.distributed.init()
    torch.set_num_threads(1)
    train, val = _data()
    flow = _actnorm_maf(seed=rank)  # different starts: rank 0's is broadcast
    try:
        ef.fit(flow, train, val, checkpoint=folder / "multinode.pt", checkpoint_every=4,
               callback=_interrupt_at(6), **MAF_ARGS)
    except _Interrupt:
        pass
    info = {"rank": rank, "world_size": world, "local_rank": int(os.environ["LOCAL_RANK"]),
            "node": int(os.environ["GROUP_RANK"]), "backend": torch.distributed.get_backend()}
    (folder / f"rank-{rank}.json").write_text(json.dumps(info))
    ef.distributed.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Several nodes: two ``torchrun`` launchers on one machine (one process each) meet through a
c10d rendezvous on 127.0.0.1, train together with the checkpoint on a shared path, and one
process resumes the checkpoint they wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import exactflow as ef
from tests.test_distributed import MAF_ARGS, _actnorm_maf, _data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("torchrun_fit.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loopback() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


def _run_nodes(command: list[str], env: dict[str, str], folder: Path) -> None:
    """Run ``command`` as two nodes, or fail with their logs.

    A node that fails makes the other wait in torchrun's exit barrier (300 s) for it: the
    first failure stops both, so the test fails at once with the logs that say why."""
    paths = [folder / f"node-{i}.log" for i in range(2)]
    nodes = []
    for path in paths:
        with open(path, "w") as log:
            nodes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and any(n.poll() is None for n in nodes):
            if any(n.poll() not in (None, 0) for n in nodes):
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # (the launcher and its worker)
            node.wait()
    logs = [path.read_text(errors="replace") for path in paths]
    codes = [node.returncode for node in nodes]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(
        f"--- node {i} ---\n{log[-3000:]}" for i, log in enumerate(logs))


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_two_nodes_train_and_one_process_resumes(tmp_path: Path) -> None:
    loop = _loopback()
    if loop is None:
        pytest.skip("no loopback interface found")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": loop}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", "exactflow-test", "--local-addr", "127.0.0.1", "--max-restarts", "0",
        "--monitor-interval", "0.5", str(SCRIPT), str(tmp_path),
    ]
    _run_nodes(command, env, tmp_path)
    infos = sorted((json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)),
                   key=lambda info: info["rank"])
    assert [i["rank"] for i in infos] == [0, 1] and {i["world_size"] for i in infos} == {2}
    assert sorted(i["node"] for i in infos) == [0, 1]  # one process on each node
    assert {i["local_rank"] for i in infos} == {0} and {i["backend"] for i in infos} == {"gloo"}
    payload = torch.load(tmp_path / "multinode.pt", weights_only=False)
    assert payload["step"] == 4

    # One process takes over the two nodes' checkpoint and ends where one process ends.
    train, val = _data()
    flow = _actnorm_maf(seed=9)
    ef.fit(flow, train, val, checkpoint=tmp_path / "multinode.pt", checkpoint_every=4,
           resume=True, **MAF_ARGS)
    reference = _actnorm_maf(seed=0)
    ef.fit(reference, train, val, **MAF_ARGS)
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(flow.state_dict()[key], value, atol=1e-5, rtol=0,
                                       msg=key)

"""Data-parallel fit on torch.distributed: two gloo processes on 127.0.0.1 against one process.

The multi-process scenarios share one launch (starting processes costs seconds on a small
machine): each worker returns what it trained and the assertions run here. The engines
(DDP by default, the flat all-reduce with ddp=False), gradient accumulation under no_sync,
DDP options and communication hooks, synchronized batch norm, resuming with another number
of processes, and data-parallel reverse KL are all checked against one process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import exactflow as ef
import exactflow.cli
import exactflow.cli.train as cli_train
from exactflow.training.metrics import NLLSummary
from exactflow.training.parallel import Replicas, _check_devices
from tests.helpers import perturb

FEATURES = 5  # odd on purpose
BATCH = 63  # global batch: shares of 32 and 31 rows
STEPS = 8


def _gloo_missing() -> str | None:
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


needs_gloo = pytest.mark.skipif(_gloo_missing() is not None, reason=str(_gloo_missing()))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    mix = torch.randn(FEATURES, FEATURES, generator=gen, dtype=torch.float64)
    x = torch.randn(400, FEATURES, generator=gen, dtype=torch.float64) @ mix
    x = x + torch.randn(400, FEATURES, generator=gen, dtype=torch.float64).pow(2)
    return x[:299], x[299:]  # 101 validation rows: unequal shares too


def _actnorm_maf(seed: int) -> ef.Flow:
    """ActNorm (data-initialized) then a 2-layer MAF, float64, away from the identity."""
    torch.manual_seed(seed)
    maf = ef.models.maf(FEATURES, layers=2, hidden=(16,))
    perturb(maf, 0.1, seed=seed)
    transform = ef.Compose(ef.transforms.ActNorm(FEATURES), maf.transform)
    return ef.Flow(transform, ef.StandardNormal(FEATURES)).double()


def _bn_realnvp(seed: int) -> ef.Flow:
    torch.manual_seed(seed)
    flow = ef.models.realnvp(FEATURES, layers=2, hidden=(16,), batch_norm=True)
    return perturb(flow, 0.1, seed=seed).double()


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int) -> Any:
    def callback(history: ef.History) -> None:
        if history.steps[-1] == step:
            raise _Interrupt

    return callback


MAF_ARGS: dict[str, Any] = dict(
    steps=STEPS, batch_size=BATCH, lr=1e-2, eval_every=2, progress=False, device="cpu", seed=3
)
BN_ARGS: dict[str, Any] = dict(
    steps=5, batch_size=64, lr=1e-2, eval_every=2, progress=False, device="cpu"
)

# Reverse KL to a Gaussian of known normalizer, which an elementwise affine flow can match.
MU, SCALE, OFFSET = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0]), 3.0
LOG_Z = OFFSET + math.log(2 * math.pi) + math.log(0.5) + math.log(2.0)
RKL_ARGS: dict[str, Any] = dict(
    steps=60, batch_size=128, lr=0.05, anneal_steps=0, progress=False, final_samples=4000,
    device="cpu", seed=1,
)


def _gaussian_target(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * (((x - MU) / SCALE) ** 2).sum(-1) + OFFSET


def _affine_flow() -> ef.Flow:
    return ef.Flow(ef.transforms.ElementwiseAffine(2), ef.StandardNormal(2))


# The amortized target: the same Gaussian, its mean moved by c * SLOPE for a context c.
SLOPE = torch.tensor([1.0, -0.5])


def _shift_flow() -> ef.Flow:
    layers = ef.Compose(ef.transforms.ElementwiseAffine(2), ef.transforms.ContextShift(2, 1))
    return ef.Flow(layers, ef.StandardNormal(2), context=1)


class _Unused(ef.Transform):
    """The identity with a parameter it never uses (DDP's find_unused_parameters case)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.spare = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, context: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z: torch.Tensor, context: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        return z, z.new_zeros(z.shape[0])


def _with_unused(seed: int) -> ef.Flow:
    torch.manual_seed(seed)
    flow = ef.Compose(ef.transforms.ElementwiseAffine(FEATURES), _Unused(FEATURES))
    return ef.Flow(flow, ef.StandardNormal(FEATURES)).double()


def _state(flow: ef.Flow) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def _worker(rank: int, folder: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    train, val = _data()
    out: dict[str, Any] = {}

    # 0. Ranks that disagree on an argument stop at the start, all with the same error.
    try:
        ef.fit(_actnorm_maf(0), train, steps=2, batch_size=BATCH + rank, progress=False)
    except ValueError as err:
        out["mismatch"] = str(err)
    out["too_small"] = []
    for make, batch in ((_actnorm_maf, 1), (_bn_realnvp, 3)):
        try:
            ef.fit(make(0), train, steps=1, batch_size=batch, progress=False)
        except ValueError as err:
            out["too_small"].append(str(err))

    # 1. ActNorm + MAF, each rank starting from different weights (rank 0's are broadcast);
    #    every rank names its own checkpoint path so that a write by rank 1 would show.
    flow = _actnorm_maf(seed=rank)
    history = ef.fit(flow, train, val, checkpoint=Path(folder) / f"maf-{rank}.pt", **MAF_ARGS)
    out["maf"] = _state(flow)
    out["maf_history"] = (history.steps, history.train_nll, history.val_nll, history.best_step)

    # 1a. The same run reading .npy shards: a folder path for training, Shards for validation.
    flow = _actnorm_maf(seed=rank)
    history = ef.fit(flow, str(Path(folder) / "train-shards"),
                     ef.datasets.Shards(Path(folder) / "val-shards"), **MAF_ARGS)
    out["maf_shards"] = (_state(flow), history.val_nll)

    # Two ranks on one GPU of one machine are refused (checked without a GPU: names only).
    try:
        _check_devices(2, torch.device("cuda", 0))
    except ValueError as err:
        out["same_gpu"] = str(err)

    # 1b. The flat all-reduce engine, and DDP with two micro-batches per rank (no_sync), a
    #     small bucket and a communication hook that counts its calls.
    flow = _actnorm_maf(seed=rank)
    ef.fit(flow, train, val, ddp=False, **MAF_ARGS)
    out["maf_allreduce"] = _state(flow)
    calls = []

    def hook(state, bucket):  # no annotations: DDP checks them against its own types
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    flow = _actnorm_maf(seed=rank)
    ef.fit(flow, train, val, accumulate=2, ddp={"bucket_cap_mb": 1, "comm_hook": (None, hook)},
           **MAF_ARGS)
    out["maf_accumulate"] = _state(flow)
    out["hook_calls"] = len(calls)

    # 2. The same run interrupted after step 6 (last checkpoint at step 4), then resumed; a
    #    copy of the interrupted checkpoint is resumed by one process in the test.
    flow = _actnorm_maf(seed=rank)
    shared = Path(folder) / "resume.pt"
    try:
        ef.fit(flow, train, val, checkpoint=shared, checkpoint_every=4,
               callback=_interrupt_at(6), **MAF_ARGS)
    except _Interrupt:
        pass
    if rank == 0:
        shutil.copy(shared, Path(folder) / "by-two.pt")
    flow = _actnorm_maf(seed=rank)
    ef.fit(flow, train, val, checkpoint=shared, checkpoint_every=4, resume=True, **MAF_ARGS)
    out["resumed"] = _state(flow)

    # 2b. A checkpoint that one process wrote (the fixture, before the launch) resumed by two.
    flow = _actnorm_maf(seed=rank)
    ef.fit(flow, train, val, checkpoint=Path(folder) / "by-one.pt", checkpoint_every=4,
           resume=True, **MAF_ARGS)
    out["resumed_from_one"] = _state(flow)

    # 3. A callback that stops on rank 1 alone stops both ranks at the same step.
    flow = _actnorm_maf(seed=rank)
    history = ef.fit(flow, train, val, steps=6, batch_size=BATCH, eval_every=1, progress=False,
                     callback=lambda h: rank == 1 and h.steps[-1] == 2)
    out["stopped"] = (history.total_steps, history.stopped_early, history.steps)

    # 4. RealNVP with batch norm, no validation data: per-rank batch statistics in training,
    #    running averages averaged across ranks; then synchronized batch norm.
    flow = _bn_realnvp(seed=rank)
    ef.fit(flow, train, **BN_ARGS)
    out["bn"] = _state(flow)
    with torch.no_grad():
        out["bn_logp"] = flow.log_prob(val)
    flow = _bn_realnvp(seed=rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ef.fit(flow, train, sync_batch_norm=True, **BN_ARGS)
    out["bn_synced"] = _state(flow)
    out["bn_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    out["bn_class"] = type(flow.transform.transforms[1]).__name__

    # 4b. A parameter the loss never uses: DDP refuses it, unless told to look for it.
    try:
        ef.fit(_with_unused(rank), train, steps=3, batch_size=BATCH, progress=False)
    except RuntimeError as err:
        out["unused_error"] = str(err)
    flow = _with_unused(rank)
    ef.fit(flow, train, steps=3, batch_size=BATCH, lr=1e-2, progress=False,
           ddp={"find_unused_parameters": True})
    out["unused"] = _state(flow)

    # 4c. Reverse KL: each rank draws its own samples (recorded at the first step).
    seen: list[torch.Tensor] = []

    def target(x: torch.Tensor) -> torch.Tensor:
        if not seen:
            seen.append(x.detach().clone())
        return _gaussian_target(x)

    torch.manual_seed(rank)
    flow = _affine_flow()
    history = ef.fit_reverse_kl(flow, target, **RKL_ARGS)
    out["rkl"] = (_state(flow), history.final, history.train_nll, seen[0])

    # 4d. Amortized reverse KL: each rank draws its own contexts (the first step's recorded).
    contexts: list[torch.Tensor] = []

    def conditional(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not contexts:
            contexts.append(c.detach().clone())
        return _gaussian_target(x - c * SLOPE)

    torch.manual_seed(rank)
    flow = _shift_flow()
    history = ef.fit_reverse_kl(flow, conditional, contexts=torch.linspace(-2, 2, 50)[:, None],
                                **RKL_ARGS)
    out["amortized"] = (_state(flow), history.final, contexts[0])

    # 5. The command line inside a process group: rank 0 alone writes the run folder.
    notes = io.StringIO()
    with contextlib.redirect_stderr(notes), contextlib.redirect_stdout(io.StringIO()):
        out["cli"] = ef.cli.main([
            "train", "moons", "--samples", "300", "--model", "maf", "--layers", "2",
            "--hidden", "16", "--steps", "6", "--batch-size", "64", "--no-report", "--device",
            "cpu", "--out", str(Path(folder) / "cli"),
        ])
    out["cli_notes"] = notes.getvalue()
    out["cli_kept_the_group"] = ef.distributed.initialized()  # (launch made it, not the CLI)

    # 6. Input noise: each rank adds its rows of the global batch's noise (every rank drew
    #    the same noise for its own rows, so the run was not the one-process run).
    flow = _actnorm_maf(seed=rank)
    ef.fit(flow, train, val, noise=0.1, **MAF_ARGS)
    out["noise"] = _state(flow)

    # 7. Leaving the group: every rank waits for the others, then the group is gone (and
    #    launch, which would have destroyed it, copes).
    ef.distributed.finish()
    out["left"] = not ef.distributed.initialized()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("distributed")
    # One process writes a checkpoint at step 4 (interrupted at 6) for two ranks to resume.
    train, val = _data()
    try:
        ef.fit(_actnorm_maf(seed=0), train, val, checkpoint=folder / "by-one.pt",
               checkpoint_every=4, callback=_interrupt_at(6), **MAF_ARGS)
    except _Interrupt:
        pass
    ef.datasets.write_shards(train.numpy(), folder / "train-shards", rows_per_shard=70)
    ef.datasets.write_shards(val.numpy(), folder / "val-shards", rows_per_shard=30)
    results = ef.distributed.launch(_worker, 2, str(folder), threads=1, timeout=120)
    return {"ranks": results, "folder": folder}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The one-process run that the two ranks must reproduce."""
    train, val = _data()
    flow = _actnorm_maf(seed=0)  # rank 0's starting point
    history = ef.fit(flow, train, val, **MAF_ARGS)
    return {"state": _state(flow), "history": history}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@needs_gloo
def test_two_ranks_match_one_process_on_the_same_global_batches(
    runs: dict[str, Any], reference: dict[str, Any]
) -> None:
    history = reference["history"]
    start = _state(_actnorm_maf(seed=0))
    moved = max((reference["state"][k] - start[k]).abs().max().item() for k in start
                if start[k].is_floating_point())
    assert moved > 1e-2  # the comparison is not between two untrained flows
    for rank in (0, 1):
        # DDP (the default engine): the same weights as one process, to 1e-5.
        _assert_same(runs["ranks"][rank]["maf"], reference["state"], atol=1e-5)
        steps, train_nll, val_nll, best_step = runs["ranks"][rank]["maf_history"]
        assert steps == history.steps and best_step == history.best_step
        assert train_nll[0] is None and history.train_nll[0] is None  # the step-0 record
        np.testing.assert_allclose(train_nll[1:], history.train_nll[1:], rtol=1e-9)
        np.testing.assert_allclose(val_nll, history.val_nll, rtol=1e-9)


@needs_gloo
def test_ranks_train_from_shards_as_from_arrays(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        state, val_nll = runs["ranks"][rank]["maf_shards"]
        _assert_same(state, runs["ranks"][rank]["maf"], atol=0.0)
        assert val_nll == runs["ranks"][rank]["maf_history"][2]


@needs_gloo
def test_two_ranks_on_one_gpu_are_refused(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        assert "ranks [0, 1] train on the same GPU" in runs["ranks"][rank]["same_gpu"]


@needs_gloo
def test_every_engine_and_accumulation_match_one_process(
    runs: dict[str, Any], reference: dict[str, Any]
) -> None:
    for rank in (0, 1):
        _assert_same(runs["ranks"][rank]["maf_allreduce"], reference["state"], atol=1e-5)
        _assert_same(runs["ranks"][rank]["maf_accumulate"], reference["state"], atol=1e-5)
        # the hook ran on the synchronized micro-batch only: one bucket per step
        assert runs["ranks"][rank]["hook_calls"] == STEPS


@needs_gloo
def test_ranks_end_with_identical_weights(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ranks"]
    for key in ("maf", "maf_allreduce", "maf_accumulate", "resumed", "resumed_from_one", "bn",
                "bn_synced", "unused"):
        _assert_same(r0[key], r1[key], atol=0.0)
    assert r0["maf_history"] == r1["maf_history"]


@needs_gloo
def test_only_rank_zero_writes_the_checkpoint(runs: dict[str, Any]) -> None:
    folder = runs["folder"]
    assert (folder / "maf-0.pt").stat().st_size > 0
    assert not (folder / "maf-1.pt").exists()
    payload = torch.load(folder / "maf-0.pt", weights_only=False)
    assert payload["step"] == STEPS
    assert payload["history"]["steps"] == runs["ranks"][0]["maf_history"][0]


@needs_gloo
def test_the_command_line_trains_with_rank_zero_writing(runs: dict[str, Any]) -> None:
    assert [r["cli"] for r in runs["ranks"]] == [0, 0]
    assert [r["cli_kept_the_group"] for r in runs["ranks"]] == [True, True]
    # The notes (the standardization, ...) come once, from rank 0.
    notes = [r["cli_notes"] for r in runs["ranks"]]
    assert "standardization" in notes[0] and "standardization" not in notes[1]
    run = runs["folder"] / "cli"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["metrics"]["steps"] == 6
    assert not (run / "checkpoint.pt").exists()
    assert math.isfinite(info["metrics"]["test"]["nll"])
    ef.load(run / "model.safetensors")


@needs_gloo
def test_resume_equals_the_uninterrupted_run(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        _assert_same(runs["ranks"][rank]["resumed"], runs["ranks"][rank]["maf"], atol=1e-12)


@needs_gloo
def test_resume_with_another_number_of_processes(
    runs: dict[str, Any], reference: dict[str, Any]
) -> None:
    # one process's checkpoint, finished by two ranks
    for rank in (0, 1):
        _assert_same(runs["ranks"][rank]["resumed_from_one"], reference["state"], atol=1e-5)
    # two ranks' checkpoint (step 4), finished by one process
    train, val = _data()
    payload = torch.load(runs["folder"] / "by-two.pt", weights_only=False)
    assert payload["step"] == 4
    flow = _actnorm_maf(seed=5)  # any start: the checkpoint replaces it
    ef.fit(flow, train, val, checkpoint=runs["folder"] / "by-two.pt", checkpoint_every=4,
           resume=True, **MAF_ARGS)
    _assert_same(_state(flow), reference["state"], atol=1e-5)


@needs_gloo
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        total, stopped, steps = runs["ranks"][rank]["stopped"]
        assert (total, stopped, steps) == (2, True, [0, 1, 2])


@needs_gloo
def test_input_noise_matches_one_process(runs: dict[str, Any]) -> None:
    train, val = _data()
    flow = _actnorm_maf(seed=0)
    ef.fit(flow, train, val, noise=0.1, **MAF_ARGS)
    _assert_same(runs["ranks"][0]["noise"], _state(flow), atol=1e-5)


def test_synchronized_batch_norm_matches_one_process(runs: dict[str, Any]) -> None:
    train, _ = _data()
    flow = _bn_realnvp(seed=0)
    ef.fit(flow, train, **BN_ARGS)
    one = _state(flow)
    r0 = runs["ranks"][0]
    _assert_same(r0["bn_synced"], one, atol=1e-5)
    assert r0["bn_warnings"] == []  # (torch's all_reduce with a gradient is deprecated)
    # per-rank statistics (the default) are not the one-process run
    assert max((r0["bn"][k] - one[k]).abs().max().item() for k in one
               if one[k].is_floating_point()) > 1e-4
    assert r0["bn_class"] == "BatchNorm"  # the layers are plain BatchNorm again after fit


@needs_gloo
def test_unused_parameters_need_the_ddp_option(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        assert "find_unused_parameters" in runs["ranks"][rank]["unused_error"]
        state = runs["ranks"][rank]["unused"]
        spare = state["transform.transforms.1.spare"]
        assert torch.equal(spare, torch.zeros(1, dtype=torch.float64))
        assert state["transform.transforms.0.shift"].abs().max() > 0  # it trained


@needs_gloo
def test_reverse_kl_trains_data_parallel(runs: dict[str, Any]) -> None:
    (s0, final0, curve0, seen0), (s1, final1, curve1, seen1) = (
        runs["ranks"][r]["rkl"] for r in (0, 1))
    _assert_same(s0, s1, atol=0.0)
    assert final0 == final1 and curve0 == curve1
    assert seen0.shape == seen1.shape == (64, 2)  # each rank drew its share ...
    assert not torch.allclose(seen0, seen1)  # ... from its own stream
    torch.manual_seed(0)
    flow = _affine_flow()
    alone = ef.fit_reverse_kl(flow, _gaussian_target, **RKL_ARGS).final
    for final in (final0, alone):  # the same bound and log Z, statistically
        assert final["n"] == 4000
        assert abs(final["elbo"] - LOG_Z) < 0.05 and final["elbo"] < LOG_Z + 4 * final["elbo_se"]
        assert abs(final["log_z_is"] - LOG_Z) < 5 * final["log_z_is_se"] + 0.01
    assert abs(final0["elbo"] - alone["elbo"]) < 0.05


@needs_gloo
def test_amortized_reverse_kl_trains_data_parallel(runs: dict[str, Any]) -> None:
    (s0, final0, seen0), (s1, final1, seen1) = (runs["ranks"][r]["amortized"] for r in (0, 1))
    _assert_same(s0, s1, atol=0.0)
    assert final0 == final1 and sorted(final0) == ["elbo", "elbo_se", "n", "n_nonfinite"]
    assert seen0.shape == seen1.shape == (64, 1) and not torch.equal(seen0, seen1)
    assert final0["n"] == 4000
    assert abs(final0["elbo"] - LOG_Z) < 0.05 and final0["elbo"] < LOG_Z + 4 * final0["elbo_se"]


@needs_gloo
def test_batch_norm_eval_models_are_identical(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ranks"]
    stats = [k for k in r0["bn"] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        assert torch.equal(r0["bn"][key], r1["bn"][key]), key
    # trained: the running averages left their initial (0, 1)
    assert max((r0["bn"][k] - float(k.endswith("var"))).abs().max().item() for k in stats) > 1e-2
    assert torch.equal(r0["bn_logp"], r1["bn_logp"])
    assert torch.isfinite(r0["bn_logp"]).all()


@needs_gloo
def test_ranks_that_disagree_fail_with_a_clear_error(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        message = runs["ranks"][rank].get("mismatch", "no error")
        assert "every rank must call fit with the same" in message
        assert "batch_size: rank 0 63, rank 1 64" in message
        small = runs["ranks"][rank]["too_small"]
        assert len(small) == 2
        assert "global batch, split across 2 ranks" in small[0]
        assert "batch norm needs at least 2 rows per rank" in small[1]
        assert "sync_batch_norm=True" in small[1]


# -- without processes -------------------------------------------------------------------------


def test_distributed_true_needs_a_process_group() -> None:
    train, _ = _data()
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        ef.fit(_actnorm_maf(0), train, steps=1, batch_size=BATCH, progress=False,
               distributed=True)
    with pytest.raises(TypeError, match="distributed must be"):
        ef.fit(_actnorm_maf(0), train, steps=1, batch_size=BATCH, progress=False,
               distributed="yes")  # type: ignore[arg-type]


def _fails_on_rank_one(rank: int) -> int:
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return rank


@needs_gloo
def test_launch_raises_the_error_of_the_rank_that_failed() -> None:
    # The rank that succeeded met the failed one at finish's barrier, whose gloo error
    # ("Connection closed by peer") was reported in its place, in 2 runs of 3 (a race:
    # three launches here).
    for _ in range(3):
        with pytest.raises(Exception, match="rank 1 fails on purpose"):
            ef.distributed.launch(_fails_on_rank_one, 2, threads=1, timeout=60)


def test_launch_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        ef.distributed.launch(_worker, 0)
    with pytest.raises(ValueError, match="backend"):
        ef.distributed.launch(_worker, 2, backend="mpi")


def test_init_outside_torchrun_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ef.distributed.init() == (0, 1)
    assert (ef.distributed.rank(), ef.distributed.world_size()) == (0, 1)
    ef.distributed.finish()  # nothing to leave
    assert ef.distributed.world_size() == 1


@needs_gloo
def test_every_rank_leaves_the_group_at_the_end(runs: dict[str, Any]) -> None:
    assert [r["left"] for r in runs["ranks"]] == [True, True]


def test_the_command_line_leaves_the_group_it_joined(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """Under torchrun, ``train`` joins the group and leaves it once the run is written; a
    group the caller made stays (the launch run above checks that half in a real group)."""
    calls: list[str] = []
    joined = {"now": False}

    def init(backend: str | None = None) -> tuple[int, int]:
        calls.append(f"init {backend}")
        joined["now"] = True
        return 0, 1

    # The command's view of torch.distributed only: the run itself trains in one process.
    monkeypatch.setattr(cli_train, "distributed", types.SimpleNamespace(
        init=init, initialized=lambda: joined["now"], rank=lambda: 0,
        finish=lambda: calls.append("finish")))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = ef.cli.main(["train", "moons", "--samples", "200", "--model", "gaussian",
                            "--no-report", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert code == 0 and calls == ["init gloo", "finish"]


def test_a_world_of_one_changes_nothing() -> None:
    local = Replicas(batch_size=8)
    index = torch.arange(8)
    assert local.shard(index) is index
    assert local.any(True) and not local.any(False)
    assert local.share_rows() == 8
    values = torch.arange(3.0)
    assert local.gather(values) is values
    flow = _actnorm_maf(0)
    x = _data()[0][:8]
    loss = -flow.log_prob(x).mean()
    loss.backward()
    plain = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    with local.attach(flow):
        assert local.model is flow

        def compute(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            value = -local.model(x[lo:hi]).mean()
            return value, value

        total, logged = local.backward(compute, 8)
    assert total == loss and logged == loss
    for p, g in zip(flow.parameters(), plain, strict=True):
        assert torch.equal(p.grad, g)


def test_accumulated_micro_batches_equal_one_batch() -> None:
    train, val = _data()
    one = _actnorm_maf(seed=0)
    ef.fit(one, train, val, **MAF_ARGS)
    three = _actnorm_maf(seed=0)
    ef.fit(three, train, val, accumulate=3, **MAF_ARGS)
    _assert_same(_state(three), _state(one), atol=1e-10)


def test_bad_data_parallel_options_are_named() -> None:
    train, _ = _data()
    args: dict[str, Any] = dict(steps=1, batch_size=BATCH, progress=False)
    with pytest.raises(TypeError, match="ddp must be True, False or a dict"):
        ef.fit(_actnorm_maf(0), train, ddp="yes", **args)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sync_batch_norm must be"):
        ef.fit(_actnorm_maf(0), train, sync_batch_norm=1, **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accumulate"):
        ef.fit(_actnorm_maf(0), train, accumulate=0, **args)
    with pytest.raises(ValueError, match="leaves a micro-batch without rows"):
        ef.fit(_actnorm_maf(0), train, accumulate=64, **args)
    with pytest.raises(ValueError, match="batch norm needs at least 2 rows per micro-batch"):
        ef.fit(_bn_realnvp(0), train, accumulate=32, **args)


def test_strided_shares_are_disjoint_and_cover_the_batch() -> None:
    index = torch.sort(torch.randperm(1000)[:63]).values
    shares = [Replicas(3, r, 63).shard(index) for r in range(3)]
    assert sorted(len(s) for s in shares) == [21, 21, 21]
    assert torch.equal(torch.sort(torch.cat(shares)).values, index)
    shares = [Replicas(2, r, 63).shard(index) for r in range(2)]
    assert [len(s) for s in shares] == [32, 31]
    assert torch.equal(torch.sort(torch.cat(shares)).values, index)


def _combine(parts: list[list[float]], n: int, features: int) -> dict[str, float]:
    """Merge per-share summaries in order, as the ranks do, into evaluate's metrics."""
    total = NLLSummary()
    for part in parts:
        total.merge(NLLSummary.from_list(part))
    return total.metrics(n, features)


def _stats(m: dict[str, float]) -> list[float]:
    count = m["n"] - m["n_nonfinite"]
    m2 = m["nll_se"] ** 2 * count * (count - 1) if count > 1 else 0.0
    return [float(count), m["nll_finite"] if count else 0.0, m2, float(m["n_nonfinite"]),
            float(math.isnan(m["nll"])), float(m["nll"] == -math.inf)]


def test_combined_shares_equal_the_whole_evaluation() -> None:
    _, val = _data()
    flow = _actnorm_maf(0)
    whole = ef.evaluate(flow, val)
    cuts = [0, 1, 40, 101]  # a one-row share (no standard error of its own) included
    parts = [_stats(ef.evaluate(flow, val[cuts[i] : cuts[i + 1]])) for i in range(3)]
    merged = _combine(parts, len(val), FEATURES)
    for key in ("nll", "nll_se", "bpd", "bpd_se", "nll_finite"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-10), key
    assert (merged["n"], merged["n_nonfinite"]) == (101, 0)


def test_combined_non_finite_rows_follow_evaluate() -> None:
    finite = [3.0, 1.0, 2.0, 0.0, 0.0, 0.0]
    empty = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    plus_inf = [0.0, 0.0, 0.0, 2.0, 0.0, 0.0]
    nan = [1.0, 5.0, 0.0, 1.0, 1.0, 0.0]
    minus_inf = [0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    merged = _combine([finite, empty, plus_inf], 5, 2)
    assert merged["nll"] == math.inf and merged["n_nonfinite"] == 2
    assert merged["nll_finite"] == 1.0
    assert math.isnan(_combine([minus_inf, nan, finite], 6, 2)["nll"])
    assert _combine([finite, minus_inf], 4, 2)["nll"] == -math.inf
    assert math.isnan(_combine([empty, plus_inf], 2, 2)["nll_finite"])

"""The command line's default thread count: one thread unless there is reason for more.

torch's own default (one thread per core) made every command but ``demo`` several times
slower on a busy machine (``benchmarks/threads.py``). The rule: ``--threads``, else
``EXACTFLOW_THREADS``, else ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (torch follows them),
else 1, except a large training run on idle cores where a timing says more is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch

from exactflow.cli import commands, main, threads
from exactflow.cli.threads import ThreadsError, choose_threads

ENV_VARS = ("EXACTFLOW_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def ns(command: str = "sample", **kwargs) -> argparse.Namespace:
    base = {"command": command, "threads": None, "hidden": None, "batch_size": 512}
    return argparse.Namespace(**{**base, **kwargs})


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_order_of_the_rule(clean_env):
    env: dict[str, str] = {}
    assert choose_threads(ns(threads=3), {"EXACTFLOW_THREADS": "2"}) == (3, "--threads")
    assert choose_threads(ns(), {"EXACTFLOW_THREADS": "2", "OMP_NUM_THREADS": "5"}) == (
        2, "EXACTFLOW_THREADS")
    assert choose_threads(ns(), {"OMP_NUM_THREADS": "5"}) == (None, "OMP_NUM_THREADS")
    assert choose_threads(ns(), {"MKL_NUM_THREADS": "5"}) == (None, "MKL_NUM_THREADS")
    for command in ("sample", "score", "check", "report", "demo", "train"):
        assert choose_threads(ns(command), env) == (1, "small model")
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ThreadsError, match="EXACTFLOW_THREADS must be a positive"):
            choose_threads(ns(), {"EXACTFLOW_THREADS": bad})
    # torch ignores an OMP_NUM_THREADS of 0 or "abc" and takes every core: the rule
    # goes on to its default (it deferred to the value, and ran on every core)
    for bad in ("0", "abc", "-1"):
        assert choose_threads(ns(), {"OMP_NUM_THREADS": bad}) == (1, "small model")


def test_the_rule_takes_the_parsers_own_arguments(clean_env):
    """``train`` without ``--batch-size`` (fit then follows the rows) parses to None: the
    rule crashed on it whenever no thread variable was set, so ``exactflow train data.csv``
    failed on a fresh shell."""
    from exactflow.cli.parser import build_parser

    parse = build_parser().parse_args
    assert choose_threads(parse(["train", "moons"]), {}) == (1, "small model")
    assert choose_threads(parse(["train", "moons", "--model", "maf", "--hidden", "64"]),
                          {}) == (1, "small model")
    for argv in (["sample", "run", "-n", "5"], ["score", "run", "x.csv"], ["check", "moons"]):
        assert choose_threads(parse(argv), {}) == (1, "small model")


def test_train_runs_in_a_shell_without_thread_variables(tmp_path):
    """The README's first command, in a shell that sets no thread variable (the test suite
    runs under OMP_NUM_THREADS=1, which the rule defers to before it looks any further)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    done = subprocess.run(
        [sys.executable, "-m", "exactflow", "train", "moons", "--samples", "300", "--model",
         "gaussian", "--no-report", "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_launch_gives_each_process_its_share_of_the_usable_cpus(monkeypatch):
    import exactflow.distributed as distributed

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 8)
    assert distributed.usable_cpus() <= 1  # (launch gave each of 1 process 8 threads)


def test_a_large_model_uses_idle_cores_only_when_faster(clean_env):
    large = ns("train", hidden=[512, 512], batch_size=1024)
    clean_env.setattr(threads, "idle_cores", lambda: 12)
    clean_env.setattr(threads, "_faster_with", lambda n, rows, width: True)
    assert choose_threads(large, {}) == (threads.MAX_AUTO_THREADS, "large model, 4 idle cores")
    clean_env.setattr(threads, "_faster_with", lambda n, rows, width: False)
    assert choose_threads(large, {})[0] == 1
    clean_env.setattr(threads, "idle_cores", lambda: 1)
    assert choose_threads(large, {}) == (1, "no idle cores")
    assert choose_threads(ns("sample", hidden=[4096]), {})[0] == 1  # only training


def test_the_timing_restores_the_thread_count():
    before = torch.get_num_threads()
    assert isinstance(threads._faster_with(2, 64, 32), bool)
    assert torch.get_num_threads() == before
    assert threads.idle_cores() >= 0


def test_main_runs_a_command_on_one_thread_and_restores_torch(clean_env):
    seen = []
    clean_env.setitem(commands.COMMANDS, "report",
                      lambda args: seen.append(torch.get_num_threads()) or {"ok": True})
    torch.set_num_threads(2)  # torch's default on a 2-core machine
    try:
        assert main(["report", "somewhere"]) == 0
        assert main(["report", "somewhere", "--threads", "3"]) == 0
        clean_env.setenv("EXACTFLOW_THREADS", "2")
        assert main(["report", "somewhere"]) == 0
        assert seen == [1, 3, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_a_bad_exactflow_threads_is_one_error_line(clean_env):
    clean_env.setenv("EXACTFLOW_THREADS", "many")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", "somewhere"])
    assert code == 1
    assert err.getvalue().strip() == (
        "exactflow: error: EXACTFLOW_THREADS must be a positive integer, got 'many'")


def test_more_threads_than_cores_warn(clean_env, monkeypatch):
    import warnings

    clean_env.setitem(commands.COMMANDS, "report", lambda args: {"ok": True})
    monkeypatch.setattr(commands.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        with pytest.warns(UserWarning, match="--threads asks for 1000 threads on a machine "
                                             "with 2 cores"):
            assert main(["report", "somewhere", "--threads", "1000"]) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert main(["report", "somewhere", "--threads", "2"]) == 0
        # OMP_NUM_THREADS sets torch's count at start-up; the command keeps it, and says so.
        clean_env.setenv("OMP_NUM_THREADS", "64")
        monkeypatch.setattr(commands.torch, "get_num_threads", lambda: 64)
        with pytest.warns(UserWarning, match="OMP_NUM_THREADS asks for 64 threads"):
            assert main(["report", "somewhere"]) == 0
    finally:
        torch.set_num_threads(before)


def _tiny_fit() -> None:
    import exactflow as ef

    flow = ef.models.maf(2, layers=1, hidden=(8,))
    ef.fit(flow, torch.randn(64, 2), steps=2, batch_size=32, progress=False, compile=False)


@pytest.mark.parametrize("idle, env, warns", [
    (0, {}, True),                          # a busy machine, torch's own count
    (0.5, {}, True),                        # 1.5 cores' worth of other work
    (1.9, {}, False),                       # a light background load
    (2, {}, False),                         # cores enough for every thread
    (0, {"OMP_NUM_THREADS": "2"}, False),   # a count the user chose
])
def test_python_training_names_threads_that_wait_for_cores(clean_env, idle, env, warns):
    """``ef.fit`` leaves torch's thread count alone (restoring a count above one breaks
    batched slogdet on some oneMKL builds) but says, once a process, when it
    oversubscribes a busy machine."""
    import exactflow.training.loop as loop

    clean_env.setattr(loop, "_threads_checked", False)
    clean_env.setattr(loop, "usable_cpus", lambda: 2)
    clean_env.setattr(loop.os, "getloadavg", lambda: (2.0 - idle,) * 3)
    clean_env.setattr(loop.torch, "get_num_threads", lambda: 2)
    for name, value in env.items():
        clean_env.setenv(name, value)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _tiny_fit()
        _tiny_fit()
    notes = [w for w in seen if "torch runs 2 threads on 2 CPUs" in str(w.message)]
    assert len(notes) == (1 if warns else 0)
    if warns:
        assert "torch.set_num_threads(1)" in str(notes[0].message)
        assert notes[0].filename == __file__  # (attributed to the caller's line)


def test_a_count_the_command_line_or_launch_chose_is_not_questioned(clean_env):
    import exactflow.training.loop as loop
    from exactflow.distributed import thread_count_chosen, threads_chosen

    clean_env.setattr(loop, "_threads_checked", False)
    clean_env.setattr(loop, "usable_cpus", lambda: 2)
    clean_env.setattr(loop.os, "getloadavg", lambda: (4.0,) * 3)
    clean_env.setattr(loop.torch, "get_num_threads", lambda: 2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with threads_chosen():
            _tiny_fit()
        assert not thread_count_chosen()  # (only inside: the command's count is restored)
        assert not [w for w in seen if "torch runs" in str(w.message)]
        main(["report", "nowhere"])  # a command, run and gone, leaves no mark
        _tiny_fit()
    assert [w for w in seen if "torch runs" in str(w.message)]

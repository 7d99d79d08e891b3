"""Fuzzing with hypothesis: every input gives a result or a documented error, no traceback.

* ``exactflow.datasets.load`` (then ``validate``) on generated file contents: random bytes,
  ragged rows, odd delimiters, BOMs, NUL bytes, huge numbers, empty cells; ``.npy`` files
  with mutated headers and truncated data; ``.npz`` files that are not zip archives;
* ``exactflow.cli.main`` with generated argv: an exit code, never an exception or a
  traceback (training and report building are stubbed: they are tested elsewhere, and
  arbitrary argv must not train for minutes);
* ``exactflow.load`` on mutated model files: truncated, bytes flipped, safetensors headers
  with absurd shapes, offsets and dtypes, configs with absurd sizes: a flow or a
  ``CheckpointError``.

The ``ci`` profile (``tests/conftest.py``) draws 30 derandomized examples per test;
``HYPOTHESIS_PROFILE=explore`` draws 1000 fresh ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import exactflow as ef  # noqa: E402
from exactflow.cli import inspect, main, train  # noqa: E402
from exactflow.datasets import DataError  # noqa: E402
from exactflow.io import CheckpointError  # noqa: E402
from exactflow.runs import RunError  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="exactflow-fuzz-"))


def _write(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


def _load_and_validate(path: Path) -> None:
    try:
        arr = ef.datasets.load(path)
        ef.datasets.validate(arr)
    except DataError:
        return
    a = np.asarray(arr)
    assert a.ndim == 2 and a.dtype.kind in "biuf" and np.isfinite(a).all()


# -- CSV and other text -----------------------------------------------------------------

CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", " ", "nan", "-inf", "1e400", "-1e-400", "1e39", "0x1p3", "1_000",
                     "abc", '"1"', '"a,b"', "'", '"', "\x00", "1\x002", "\ufeff1", "٣",
                     "１２", "1,5", "#", " 2 ", "\r", "\u2028", "NaN", "Infinity"]),
    st.text(max_size=6),
)
DELIMITERS = st.sampled_from([",", ";", "\t", " ", "|", ", ", ",,"])
ENDINGS = st.sampled_from(["\n", "\r\n", "\r", ""])


@st.composite
def tables(draw: st.DrawFn) -> bytes:
    width = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(CELLS, min_size=1, max_size=width + 1), max_size=6))
    delimiter, ending = draw(DELIMITERS), draw(ENDINGS)
    text = ending.join(delimiter.join(row) for row in rows)
    if draw(st.booleans()):
        text = "a" + delimiter + "b" + ending + text
    data = text.encode("utf-8", errors="surrogatepass")
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"# comment\n"]))
    return prefix + data


@given(content=tables(), ext=st.sampled_from([".csv", ".tsv", ".txt", ".dat"]))
def test_text_tables_load_or_raise_a_data_error(content, ext):
    _load_and_validate(_write("t" + ext, content))


@given(content=st.binary(max_size=300), ext=st.sampled_from([".csv", ".txt", ".npy", ".npz"]))
def test_random_bytes_load_or_raise_a_data_error(content, ext):
    _load_and_validate(_write("r" + ext, content))


# -- .npy and .npz ----------------------------------------------------------------------


def _npy(header: str, payload: bytes, version: bytes = b"\x01\x00") -> bytes:
    head = header.encode("latin1")
    pad = (64 - (10 + len(head) + 1) % 64) % 64
    head = head + b" " * pad + b"\n"
    return b"\x93NUMPY" + version + struct.pack("<H", len(head)) + head + payload


HEADERS = st.builds(
    lambda descr, shape, fortran: (
        f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    ),
    st.sampled_from(["<f8", "<f4", "<i8", "|u1", "|b1", "<c16", "<U3", "|O", "|V8", ">f8",
                     "<f2", "[('a', '<f8')]", "float64", "<m8", "zz"]),
    st.one_of(
        st.tuples(st.integers(0, 4), st.integers(0, 3)).map(str),
        st.sampled_from(["()", "(3,)", "(2, 2, 2)", "(10**12, 2)", "(-1, 2)", "(2**62, 2**62)",
                         "'x'", "(1.5, 2)"]),
    ),
    st.sampled_from(["False", "True", "1", "'no'"]),
)


@given(header=HEADERS, payload=st.binary(max_size=200),
       version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x00"]))
def test_npy_with_mutated_headers_loads_or_raises_a_data_error(header, payload, version):
    _load_and_validate(_write("m.npy", _npy(header, payload, version)))


@given(cut=st.integers(0, 400), flip=st.lists(st.integers(0, 400), max_size=3))
def test_npz_truncated_or_flipped_loads_or_raises_a_data_error(cut, flip):
    buf = io.BytesIO()
    np.savez(buf, data=np.arange(12.0).reshape(6, 2))
    raw = bytearray(buf.getvalue())
    for i in flip:
        if i < len(raw):
            raw[i] ^= 0xFF
    _load_and_validate(_write("z.npz", bytes(raw[: max(cut, 2)])))


# -- the command line -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_run() -> Path:
    out = WORK / "run"
    code = main(["train", "moons", "--model", "maf", "--layers", "1", "--hidden", "4",
                 "--steps", "3", "--batch-size", "32", "--samples", "100", "--no-report",
                 "--out", str(out), "--json"])
    assert code == 0
    (WORK / "data.csv").write_text("x1,x2\n0.1,0.2\n0.3,-0.4\n")
    return out


def _cheap(token: str) -> bool:
    # Arbitrary argv must not ask for hours of work (-n 10**9, --features 5000, --points).
    for parse in (int, float):
        try:
            return abs(parse(token)) <= 64
        except (ValueError, OverflowError):
            continue
    return True


TOKENS = st.one_of(
    st.sampled_from([
        "demo", "train", "sample", "score", "check", "report", "--json", "--debug", "-h",
        "--help", "--version", "-n", "--num", "-o", "--output", "--seed", "--threads",
        "--model", "maf", "nsf", "planar", "nope", "--layers", "--hidden", "--steps",
        "--epochs", "--batch-size", "--lr", "--columns", "--samples", "--device", "cpu",
        "cuda", "--out", "--resume", "--overwrite", "--no-report", "--threshold-quantile",
        "--features", "--points", "--val-fraction", "moons", "digits", "0", "1", "2", "-1",
        "0.5", "1e-3", "nan", "inf", "x1,x2", "0,1", "64,64", "", "-", "--", "=",
        "--threads=0", "--seed=-5", "-n3", "s.csv", "s.npy", "s.parquet", "sub/s.csv",
        "--key", "data.csv", "data.npz:a", "\x00", "é", "RUN",
    ]),
    st.text(max_size=8).filter(_cheap),
)


@given(argv=st.lists(TOKENS, max_size=8))
def test_the_command_line_always_returns_an_exit_code(fuzz_run, argv, monkeypatch_module):
    argv = [str(fuzz_run) if t == "RUN" else t for t in argv]
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(WORK)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # never: main returns its code
                raise AssertionError(f"main raised SystemExit({exit_.code})") from None
    finally:
        os.chdir(cwd)
    if "--debug" in argv and code == 1:
        return  # --debug re-raises: reached only when main raised, which the test forbids
    assert isinstance(code, int) and code in (0, 1, 2, 130, 141), code
    assert "Traceback" not in err.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def monkeypatch_module(fuzz_run):
    """Training and report building stubbed: argv that would train fails fast instead."""
    mp = pytest.MonkeyPatch()

    def no_training(*args, **kwargs):
        raise RunError("training is stubbed in the fuzz test")

    mp.setattr(train, "train_run", no_training)
    mp.setattr(train, "build_report", no_training)
    mp.setattr(inspect, "build_report", no_training)
    yield mp
    mp.undo()


# -- model files ------------------------------------------------------------------------


def _model_bytes() -> bytes:
    torch.manual_seed(0)
    flow = ef.models.maf(2, layers=2, hidden=(4,))
    path = ef.save(flow, WORK / "good.safetensors")
    return path.read_bytes()


GOOD = _model_bytes()


def _split(raw: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _try_load(raw: bytes) -> None:
    path = _write("fuzz.safetensors", raw)
    try:
        with warnings.catch_warnings():
            # A weight must load as stored, never be cast (complex to real) on the way in.
            warnings.filterwarnings("error", message="Casting complex")
            flow = ef.load(path)
    except CheckpointError:
        return
    assert isinstance(flow, ef.Flow)


@given(cut=st.integers(0, len(GOOD)), flips=st.lists(st.integers(0, len(GOOD) - 1),
                                                      max_size=4))
def test_truncated_or_flipped_model_files(cut, flips):
    raw = bytearray(GOOD)
    for i in flips:
        raw[i] ^= 0xA5
    _try_load(bytes(raw[:cut]))


@given(data=st.data())
def test_safetensors_headers_with_absurd_shapes_offsets_and_dtypes(data):
    header, body = _split(GOOD)
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys))
        entry = dict(header[key])
        field = data.draw(st.sampled_from(["shape", "data_offsets", "dtype"]))
        if field == "shape":
            entry["shape"] = data.draw(st.lists(
                st.sampled_from([0, 1, 2, 7, -1, 2**31, 2**40, 10**12]), max_size=4))
        elif field == "data_offsets":
            entry["data_offsets"] = data.draw(st.lists(
                st.sampled_from([0, 3, 8, -8, len(body), len(body) + 8, 2**40, 2**63]),
                min_size=2, max_size=3))
        else:
            entry["dtype"] = data.draw(st.sampled_from(
                ["F64", "F16", "BF16", "I64", "U8", "BOOL", "C64", "F8_E4M3", "X", ""]))
        header[key] = entry
    _try_load(_join(header, body))


CONFIG_VALUES = st.one_of(
    st.integers(-3, 10), st.sampled_from([10**6, 10**9, 2**63, -(2**63), 1.5, "8", None,
                                          True, [], [4], [0], [10**9], {"a": 1}]),
)


@given(changes=st.dictionaries(
    st.sampled_from(["model", "features", "layers", "hidden", "context", "bins", "kind",
                     "permutation", "standardize", "batch_norm", "bound", "fast", "extra"]),
    CONFIG_VALUES, min_size=1, max_size=3),
    model=st.sampled_from(["maf", "nsf", "planar", "nope", "", 3]))
def test_model_configs_with_absurd_values(changes, model):
    header, body = _split(GOOD)
    config = json.loads(header["__metadata__"]["config"])
    config.update(changes)
    if "model" not in changes:
        config["model"] = model
    header["__metadata__"] = dict(header["__metadata__"], config=json.dumps(config))
    _try_load(_join(header, body))


@given(version=st.sampled_from(["", "x", "-1", "0", "1", "2", "99", "1e9", " 2"]),
       fmt=st.sampled_from(["exactflow", "other", ""]),
       drop=st.sets(st.sampled_from(["format", "version", "config", "exactflow_version"])))
def test_model_metadata_mutations(version, fmt, drop):
    header, body = _split(GOOD)
    meta = dict(header["__metadata__"], version=version, format=fmt)
    for key in drop:
        meta.pop(key, None)
    header["__metadata__"] = meta
    _try_load(_join(header, body))


@given(payload=st.recursive(
    st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats(),
              st.just(torch.zeros(2))),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(
                                   ["format", "version", "config", "state_dict", "x"]),
                                   children, max_size=4)),
    max_leaves=8,
))
def test_legacy_torch_archives_of_any_shape(payload):
    path = WORK / "legacy.pt"
    torch.save(payload, path)
    try:
        flow = ef.load(path)
    except CheckpointError:
        return
    assert isinstance(flow, ef.Flow)

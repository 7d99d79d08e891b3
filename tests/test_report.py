"""The run report: a self-contained HTML page whose images exist and decode, metrics.json,
the layer-by-layer check, run-folder errors, and atomic writes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow import diagnostics, runs
from exactflow import report as rp
from exactflow.cli import main
from exactflow.io import atomic_write_json

pytest.importorskip("matplotlib")

TINY = ["--model", "maf", "--layers", "2", "--hidden", "16", "--steps", "30",
        "--batch-size", "128", "--no-report"]


def train(argv: list) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 0, err.getvalue()


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run2d"
    train(["train", "8gaussians", *TINY, "--samples", "800", "--out", out])
    rp.build_report(out)
    return out


@pytest.fixture(scope="module")
def run_5d(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report5")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5)) + 3.0
    np.save(base / "data.npy", data)
    out = base / "run5d"
    train(["train", base / "data.npy", *TINY, "--out", out])
    rp.build_report(out)
    return out


class Page(HTMLParser):
    """Collects every URL-bearing attribute and every tag of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data", "poster") and value:
                self.urls.append((tag, name, value))

    def handle_data(self, data):
        self.text.append(data)


def parse(index: Path) -> Page:
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.mark.parametrize("which", ["run_2d", "run_5d"])
def test_html_is_self_contained_and_every_image_decodes(which, request):
    import matplotlib.image

    run = request.getfixturevalue(which)
    index = run / "report" / "index.html"
    html = index.read_text(encoding="utf-8")
    page = parse(index)
    assert page.tags[0] == "html" and "body" in page.tags and "table" in page.tags
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert "http://" not in html and "https://" not in html and "//" not in "".join(
        v for _, _, v in page.urls
    )
    images = [v for tag, name, v in page.urls if tag == "img" and name == "src"]
    assert len(images) >= 3
    for src in images:
        path = index.parent / src
        assert path.parent == index.parent and path.is_file(), src
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert float(pixels[..., :3].std()) > 0.01  # not a blank image
    text = " ".join(page.text)
    assert "test NLL" in text and "bits per dimension" in text and "parameters" in text
    assert "training time" in text and "Layer-by-layer check" in text
    assert "n/a" not in text  # every number of the page was found


def test_a_report_stopped_in_its_checks_leaves_no_report_folder(run_5d, tmp_path,
                                                                 monkeypatch):
    # (a report killed during the check of a wide model left an empty report/ folder)
    copy = tmp_path / "run"
    shutil.copytree(run_5d, copy, ignore=shutil.ignore_patterns("report"))

    def stopped(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rp, "check_layers", stopped)
    with pytest.raises(KeyboardInterrupt):
        rp.build_report(copy)
    assert not (copy / "report").exists()


def test_2d_report_has_the_density_and_cartographer_figures(run_2d):
    names = sorted(p.name for p in (run_2d / "report").iterdir())
    for name in ("data_vs_model.png", "cartographer.png", "training.png",
                 "layer_log_dets.png", "metrics.json", "index.html"):
        assert name in names
    assert "pairwise.png" not in names
    text = " ".join(parse(run_2d / "report" / "index.html").text)
    assert "true entropy" in text


def test_a_closed_form_fit_has_no_training_curve(tmp_path):
    # (a Gaussian's history is one point at step 0: the figure was a lone dot)
    out = tmp_path / "gauss"
    train(["train", "8gaussians", "--model", "gaussian", "--samples", "400", "--out", out,
           "--no-report"])
    rp.build_report(out)
    names = {p.name for p in (out / "report").iterdir()}
    assert "data_vs_model.png" in names and "training.png" not in names
    page = (out / "report" / "index.html").read_text()
    assert "training and validation NLL" not in page
    # (its one layer is the standardization: the check now covers the Gaussian itself)
    assert "The base distribution (Gaussian) passes: its log-density at the latent " \
        "points of the same rows against torch.distributions" in page
    base = json.loads((out / "report" / "metrics.json").read_text())["check"]["base"]
    assert base["checked"] and base["ok"] and base["error"] < 1e-9
    assert '<p class="sub">gaussian on 8gaussians' in page  # (not "gaussian flow")


def test_the_report_says_what_train_noted_of_the_data(tmp_path):
    # train's notes (integer columns, point masses, IDs) were said once on stderr and were
    # not in the report, whose NLL they bear on.
    rng = np.random.default_rng(2)
    data = np.c_[rng.normal(size=(400, 2)), rng.poisson(3.0, 400)]
    np.save(tmp_path / "counts.npy", data)
    out = tmp_path / "counts"
    train(["train", tmp_path / "counts.npy", "--model", "gaussian", "--out", out,
           "--no-report"])
    said = json.loads((out / "run.json").read_text())["data"]["notes"]
    assert len(said) == 1 and said[0].startswith("column 2 (column indices) holds integers")
    rp.build_report(out)
    text = " ".join(parse(out / "report" / "index.html").text)
    assert "Notes on the data" in text and said[0] in text
    plain = tmp_path / "plain"
    np.save(tmp_path / "plain.npy", data[:, :2])
    train(["train", tmp_path / "plain.npy", "--model", "gaussian", "--out", plain,
           "--no-report"])
    rp.build_report(plain)
    assert "Notes on the data" not in (plain / "report" / "index.html").read_text()


def test_5d_report_shows_pairwise_marginals(run_5d):
    names = {p.name for p in (run_5d / "report").iterdir()}
    assert "pairwise.png" in names
    assert "data_vs_model.png" not in names and "cartographer.png" not in names


def test_metrics_json_matches_the_run(run_2d):
    metrics = json.loads((run_2d / "report" / "metrics.json").read_text())
    info = json.loads((run_2d / "run.json").read_text())
    assert metrics["test"]["nll"] == pytest.approx(info["metrics"]["test"]["nll"], abs=1e-9)
    flow = ef.load(run_2d / "model.safetensors")
    assert metrics["parameters"] == sum(p.numel() for p in flow.parameters())
    layers = diagnostics.flatten_layers(flow.transform)
    assert len(metrics["check"]["layers"]) == len(layers) and metrics["check"]["ok"]
    assert metrics["true_entropy"] == ef.datasets.TOY_ENTROPY["8gaussians"]
    # The per-layer mean log-dets add up to the flow's mean log-det on the test split.
    with np.load(run_2d / "data.npz") as npz:
        test = torch.as_tensor(npz["test"], dtype=torch.float32)
    with torch.no_grad():
        z, ladj = flow.transform(test)
    total = sum(r["mean_log_det"] for r in metrics["layer_mean_log_det"])
    assert total == pytest.approx(float(ladj.double().mean()), abs=1e-4)


def test_rebuilding_replaces_the_files(run_2d):
    before = {p.name for p in (run_2d / "report").iterdir()}
    index = rp.build_report(run_2d)
    assert {p.name for p in (run_2d / "report").iterdir()} == before
    assert not [p for p in (run_2d / "report").iterdir() if p.name.endswith(".tmp")]
    assert index.is_file()


# -- the check table --------------------------------------------------------------------


class WrongLogDet(ef.Transform):
    """``z = 2x`` claiming ``log|det| = d log 2 + 0.01``: a bug check_layers must find."""

    def forward(self, x, context=None):
        return 2 * x, x.new_full(x.shape[:1], x.shape[1] * float(np.log(2.0)) + 0.01)

    def inverse(self, z, context=None):
        return z / 2, z.new_full(z.shape[:1], -z.shape[1] * float(np.log(2.0)) - 0.01)


def test_check_layers_finds_the_wrong_layer_and_leaves_the_flow_alone():
    from tests.helpers import perturb

    good = perturb(ef.transforms.LULinear(3), 0.3, seed=0)
    flow = ef.Flow(ef.Compose(good, WrongLogDet(), ef.transforms.Reverse(3)),
                   ef.StandardNormal(3))
    flow.train()
    x = np.random.default_rng(0).normal(size=(40, 3))
    rows = diagnostics.check_layers(flow, x)
    assert [r.ok for r in rows] == [True, False, True]
    assert rows[1].name == "WrongLogDet" and rows[1].log_det_error == pytest.approx(0.01)
    assert rows[1].round_trip_error < 1e-12 and rows[1].failures
    with torch.no_grad():
        expected = copy.deepcopy(good).double()(torch.as_tensor(x))[1].mean()
    assert rows[0].mean_log_det == pytest.approx(float(expected), abs=1e-9)
    # The caller's model is untouched: same dtype, same mode.
    assert next(flow.parameters()).dtype == torch.float32 and flow.training
    table = diagnostics.format_check_table(rows)
    assert "WrongLogDet" in table and "FAIL" in table and table.count("ok") >= 2


def test_check_layers_sees_the_data_propagated_to_each_layer():
    # Layer 1 (Logit) needs data in (0, 1): it only gets it after Sigmoid, so a check that
    # fed every layer the raw data would crash on it.
    flow = ef.Flow(ef.Compose(ef.transforms.Sigmoid(), ef.transforms.Logit()),
                   ef.StandardNormal(2))
    rows = diagnostics.check_layers(flow, 3 * np.random.default_rng(1).normal(size=(30, 2)))
    assert all(r.ok for r in rows), [r.failures for r in rows]


# -- run folders and atomic files -------------------------------------------------------


def test_load_run_errors_name_the_problem(run_2d, tmp_path):
    with pytest.raises(runs.RunError, match="no such run folder"):
        runs.load_run(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.RunError, match="is a file"):
        runs.load_run(tmp_path / "file")
    with pytest.raises(runs.RunError, match="no run.json"):
        runs.load_run(tmp_path)
    (tmp_path / "run.json").write_text('{"format": "something else"}')
    with pytest.raises(runs.RunError, match="not an exactflow run"):
        runs.load_run(tmp_path)
    info = json.loads((run_2d / "run.json").read_text())
    info["status"] = "training"
    (tmp_path / "run.json").write_text(json.dumps(info))
    with pytest.raises(runs.RunError, match="did not finish"):
        runs.load_run(tmp_path)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"a": 2})
    monkeypatch.undo()
    # Non-finite numbers are written as null: strict JSON that any parser reads.
    atomic_write_json(tmp_path / "nan.json", {"a": float("nan")})
    assert json.loads((tmp_path / "nan.json").read_text()) == {"a": None}
    (tmp_path / "nan.json").unlink()
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]

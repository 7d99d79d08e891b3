"""Markdown tables of the benchmark results (written next to the JSON by ``benchmarks.run``)."""

from __future__ import annotations

import math
from pathlib import Path

#: The targets exactflow is held to, against the best peer, per model and data set.
TRAIN_TARGET = 1.5
LOG_PROB_TARGET = 1.5
MAF_SAMPLE_TARGET = 1.0
NLL_TOLERANCE = 0.01  # nats: "no worse than the best peer" up to this run-to-run noise
#: The sequential direction (MAF sampling, IAF density) on 64-D data, where it is d steps.
SEQUENTIAL_TARGET = {"digits": 5.0}


def _sequential_target(data: str) -> float:
    return SEQUENTIAL_TARGET.get(data, MAF_SAMPLE_TARGET)

_DATA_TITLES = {
    "moons": "2-D moons",
    "gmm10": "10-D Gaussian mixture (exact density known)",
    "digits": "64-D digits (dequantized, one global scale; 1438 training rows)",
}


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}x"


def _delta(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.3f}"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def targets(rows: list[dict]) -> list[dict]:
    """Whether exactflow meets each target, per data set and model."""
    out = []
    for row in rows:
        if row["library"] not in ("exactflow", "exactflow+compile"):
            continue
        train = row.get("train_steps_per_s_vs_best_peer")
        lp = row.get("log_prob_points_per_s_vs_best_peer")
        sample = row.get("sample_points_per_s_vs_best_peer")
        nll = row.get("test_nll_minus_best_peer")
        iaf = row["model"] == "iaf"
        lp_target = _sequential_target(row["data"]) if iaf else LOG_PROB_TARGET
        out.append({
            "data": row["data"],
            "model": row["model"],
            "library": row["library"],
            "train": train,
            "train_ok": None if train is None else train >= TRAIN_TARGET,
            "log_prob": lp,
            "log_prob_ok": None if lp is None else lp >= max(lp_target, LOG_PROB_TARGET),
            "sample": sample,
            "sample_ok": (
                None if sample is None or row["model"] != "maf"
                else sample >= _sequential_target(row["data"])
            ),
            "nll": nll,
            "nll_ok": None if nll is None or not math.isfinite(nll) else nll <= NLL_TOLERANCE,
        })
    return out


def write_markdown(meta: dict, rows: list[dict], path: Path) -> None:
    """Write the results table with the machine, versions, load, date and command."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    s = meta["settings"]
    lines = [
        f"Benchmark ({meta['mode']} run), {meta['date_utc']}: `{meta['command']}`",
        "",
        f"- machine: {meta['cpu']} ({meta['cpu_count']} cores), {meta['platform']}, "
        f"Python {meta['python']}" + (f", GPU {meta['gpu']}" if "gpu" in meta else ""),
        f"- device `{meta['device']}`, torch threads {meta['torch_threads']} for every library, "
        f"clock `{meta.get('clock', 'wall')}`, "
        f"batch {meta['batch']}, {s['optimizer']}, training steps {s['steps']} "
        f"(timed in windows of {s['window']} steps, first window = warm-up), "
        f"log_prob on {s['log_prob_points']:,} points, sample of {s['sample_points']} points",
        f"- versions: {versions}",
        f"- load average (1, 5, 15 min) at start {_loads(meta.get('load_average_start'))}, "
        f"at end {_loads(meta.get('load_average_end'))}; wall time {meta.get('wall_s')} s",
        "- `x` columns: ratio to the best peer (zuko, nflows, normflows) on the same row group; "
        "speeds are medians over interleaved windows/repeats; `peak MB` is the peak RSS during "
        "a few training steps above the RSS before them, in a fresh process "
        "(`benchmarks/memory.py`); `exactflow+compile` is the step of "
        "`ef.fit(..., compile=True)` (scored with the eager rows' code).",
        "",
        "**Targets** (exactflow vs the best peer: training and log_prob >= "
        f"{TRAIN_TARGET}x, MAF sampling >= {MAF_SAMPLE_TARGET}x, the sequential direction "
        "(MAF sampling, IAF log_prob) on digits >= "
        f"{SEQUENTIAL_TARGET['digits']}x, test NLL no worse than "
        f"the best peer's + {NLL_TOLERANCE} nats; `params` is every stored trainable number, "
        "`effective` leaves out the weights a fixed mask zeroes: compare models by it):",
        "",
        "| data | model | exactflow | train | met | log_prob | met | sample | met (MAF) "
        "| NLL - best peer | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in targets(rows):
        lines.append(
            f"| {t['data']} | {t['model']} | {t['library'].replace('exactflow', '') or 'eager'} "
            f"| {_ratio(t['train'])} | {_mark(t['train_ok'])} "
            f"| {_ratio(t['log_prob'])} | {_mark(t['log_prob_ok'])} | {_ratio(t['sample'])} "
            f"| {_mark(t['sample_ok'])} | {_delta(t['nll'])} | {_mark(t['nll_ok'])} |"
        )
    for data in dict.fromkeys(r["data"] for r in rows):
        group = [r for r in rows if r["data"] == data]
        g0 = group[0]
        true = g0.get("true_test_nll")
        title = _DATA_TITLES.get(data, data)
        lines += [
            "",
            f"#### {title}: d = {g0['features']}, h = {g0['hidden']}, "
            f"{g0['steps']} training steps" + (f", true test NLL {true:.3f}" if true else ""),
            "",
            "| model | library | params | effective | train steps/s | x | log_prob kpts/s | x "
            "| sample kpts/s | x | test NLL | - best peer |"
            + (" gap to truth |" if true else "")
            + " peak MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            + ("---:|" if true else "") + "---:|",
        ]
        for r in group:
            nll = "diverged" if r.get("diverged") else _num(r["test_nll"], 3)
            lines.append(
                f"| {r['model']} | {r['library']} | {r['parameters']:,} "
                f"| {_num(r.get('effective_parameters'), 0)} "
                f"| {_num(r['train_steps_per_s'])} "
                f"| {_ratio(r.get('train_steps_per_s_vs_best_peer'))} "
                f"| {_num((r['log_prob_points_per_s'] or math.nan) / 1e3)} "
                f"| {_ratio(r.get('log_prob_points_per_s_vs_best_peer'))} "
                f"| {_num((r['sample_points_per_s'] or math.nan) / 1e3, 2)} "
                f"| {_ratio(r.get('sample_points_per_s_vs_best_peer'))} "
                f"| {nll} | {_delta(r.get('test_nll_minus_best_peer'))} |"
                + (f" {_num(r.get('gap_to_truth'), 3)} |" if true else "")
                + f" {_num(r.get('peak_mb'))} |"
            )
    notes = sorted({f"{r['library']} {r['model']}: {r['note']}" for r in rows if r.get("note")})
    if notes:
        lines += ["", "Construction notes: " + "; ".join(notes) + "."]
    path.write_text("\n".join(lines) + "\n")


def _loads(values: list[float] | None) -> str:
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the markdown of a results JSON: ``python -m benchmarks.report FILE.json``."""
    import argparse  # noqa: PLC0415
    import json  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    write_markdown(data["meta"], data["results"], args.results.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which variant to ship: accuracy beside latency for every variant of a model on every target.

`make_report` builds each variant (float32, float16 where the target has it, int8 with each
calibration recipe, int8 mixed precision) for each target, runs it on the evaluation data (on
this machine, or on the emulated board for ARM presets), times it in one interleaved session per
device beside the baselines (PyTorch eager, torch.compile, onnxruntime float and the same int8
QDQ models), and marks the Pareto-optimal rows of each device. `write_report` writes
report.json, report.md, report.png and a self-contained report.html.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MixerEdgeError
from .formats import json_text

RANDOM_EVAL_SAMPLES = 64  # inputs drawn when the model has no evaluation data (agreement only)
HERE = "this machine"


@dataclass(frozen=True)
class Variant:
    """One way to build the model: a precision and, for int8, a calibration recipe and mixed precision."""

    precision: str
    recipe: str | None = None  # int8: a recipe name or .toml path; None = default
    mixed: bool = False  # int8: the most sensitive layers stay float within --max-accuracy-drop

    @classmethod
    def parse(cls, text: str) -> Variant:
        kind, _, recipe = text.partition(":")
        if kind in ("float32", "float16") and not recipe:
            return cls(kind)
        if kind in ("int8", "int8-mixed"):
            from .quant import resolve_recipe

            resolve_recipe(recipe or None)  # an unknown recipe is refused before any slow work
            return cls("int8", recipe or None, kind == "int8-mixed")
        raise MixerEdgeError(f"--variants: '{text}' is not a variant: use float32, float16, int8[:RECIPE] or "
                             "int8-mixed[:RECIPE] (RECIPE: a name in calibration/ or a .toml)")

    @property
    def name(self) -> str:
        if self.precision != "int8":
            return self.precision
        return ("int8-mixed" if self.mixed else "int8") + ":" + (Path(self.recipe).stem if self.recipe else "default")


def default_variants(preset, labelled: bool) -> list[Variant]:
    """What the target builds: its float precisions, int8 with every shipped recipe, and int8 mixed
    precision (which needs labelled evaluation data)."""
    from .quant import list_recipes

    variants = [Variant(p) for p in ("float32", "float16") if p in preset.precisions]
    if "int8" in preset.precisions:
        variants += [Variant("int8", None if name == "default" else name) for name in list_recipes()]
        variants += [Variant("int8", None, True)] if labelled else []
    return variants


def metrics(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """Top-1/top-5 accuracy on the labelled samples (label -1: unknown), and how close the logits are to the
    float model's."""
    out = {"top1": None, "top5": None}
    known = labels >= 0 if labels is not None else None
    if known is not None and known.any():
        top5 = np.argsort(-logits[known], axis=1)[:, :5]
        truth = labels[known]
        out = {"top1": float((top5[:, 0] == truth).mean()), "top5": float((top5 == truth[:, None]).any(1).mean())}
    from .bench import cosines
    from .quant.sensitivity import sqnr_db

    return {**out, "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "cosine": float(cosines(logits, reference).mean()), "sqnr_db": sqnr_db(reference, logits)}


def mark_pareto(rows: list[dict], score: str) -> None:
    """Set `pareto` on each timed row: no other row of its device is at least as fast and as accurate
    (on `score`) and better in one of the two."""
    for row in rows:
        row["pareto"] = False
        if row["latency"] is None:
            continue
        mine = (row["latency"]["median_ms"], row[score])
        row["pareto"] = not any(
            other is not row and other["device"] == row["device"] and other["latency"] is not None
            and other["latency"]["median_ms"] <= mine[0] and other[score] >= mine[1]
            and (other["latency"]["median_ms"], other[score]) != mine
            for other in rows)


def machine() -> dict:
    from .runtime import physical_cores

    info = {"system": platform.platform(), "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "physical_cores": physical_cores()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    return info


def make_report(source, presets: list, out: str | Path, variants: list[Variant] | None = None,
                eval_data: str | None = None, batch: int = 1, rounds: int = 20, threads: int | None = None,
                calib_data: str | None = None, calib_samples: int | None = None, max_accuracy_drop: float = 0.25,
                tuning=None, torch_compile: bool = True, progress=print) -> dict:
    """Build, evaluate and time every variant of `source` for every preset; write the report directory
    `out` (atomically, with the artifacts under artifacts/) and return report.json's content."""
    from . import runtime
    from .artifact import reference_logits, versions
    from .atomic import REPORT, atomic_dir, check_destination
    from .bench import use_threads
    from .compiler import Tuning, compile_model, tune
    from .data import load_inputs

    check_destination(out, REPORT, inputs=(eval_data, calib_data, tuning and tuning.database))
    threads = threads or runtime.physical_cores()
    use_threads(threads)
    tuning = tuning or Tuning()
    eval_data = eval_data or source.eval_data
    if eval_data:
        x, y = load_inputs(eval_data, source.preprocess)
        data_name = str(eval_data)
    else:
        x = np.random.default_rng(0).standard_normal((RANDOM_EVAL_SAMPLES, *source.input.shape[1:])).astype(np.float32)
        y, data_name = None, f"{RANDOM_EVAL_SAMPLES} random-normal inputs (no labels)"
    if len(x) < batch:
        raise MixerEdgeError(f"the evaluation data has {len(x)} samples, fewer than --batch {batch}")
    plan = [(preset, v) for preset in presets for v in (variants or default_variants(preset, y is not None))
            if v.precision in preset.precisions]
    if not plan:
        raise MixerEdgeError("no target builds any of the variants asked for: see `mixer-edge targets` for each "
                             "target's precisions")
    if tuning.database and len(plan) > 1:
        raise MixerEdgeError("--tuning-db holds one model/target/precision: report on one target and variant with it")
    if y is None and any(v.mixed for _, v in plan):
        raise MixerEdgeError("int8-mixed needs labelled evaluation data (--eval-data) to measure the accuracy drop")
    if any(p.emulator_cpu and p.arch != platform.machine() for p, _ in plan):
        from .emulator import require_board

        require_board()  # before the slow builds
    progress(f"report on {data_name}: {len(plan)} builds ({', '.join(f'{p.name} {v.name}' for p, v in plan)})")
    reference = reference_logits(source.torch_model, source.onnx_model, x)
    quantized = _quantize(source, {v for _, v in plan if v.precision == "int8"}, calib_data, calib_samples,
                          eval_data, max_accuracy_drop, progress)
    with atomic_dir(out, REPORT) as stage:
        rows = []
        for preset, variant in plan:
            quant, calibrate_s = quantized.get(variant, (None, None))
            tune_s = None
            if tuning.tune:  # into the database the compile below applies
                start = time.perf_counter()
                tune(quant.qdq if quant else source.onnx_model, preset, batch, variant.precision, tuning=tuning,
                     model=source.name, progress=progress)
                tune_s = time.perf_counter() - start
            path = stage / "artifacts" / f"{source.name}-{preset.name}-{variant.name.replace(':', '-')}"
            start = time.perf_counter()
            manifest = compile_model(source, preset, path, batch=batch, precision=variant.precision, verify=False,
                                     tuning=Tuning(tuning.database), quantized=quant, progress=progress)
            db = manifest["build"]["tuning_db"]
            rows.append({"engine": "mixer-edge", "target": preset.name, "variant": variant.name,
                         "precision": variant.precision, "artifact": str(path.relative_to(stage)),
                         "size_bytes": sum(f.stat().st_size for f in path.iterdir()),
                         "build_s": round(time.perf_counter() - start, 2), "tune_s": tune_s and round(tune_s, 1),
                         "calibrate_s": calibrate_s and round(calibrate_s, 1),
                         "tuning_db_records": db["records"] if db else 0,
                         "float_layers": quant.summary.get("mixed_precision", {}).get("float_layers") if quant else None,
                         "path": path, "preset": preset})
        _run_and_time(rows, source, x, batch, rounds, threads, quantized, torch_compile, progress)
        for row in rows:
            row.update(metrics(row.pop("logits"), reference, y) if row.get("logits") is not None else
                       {k: None for k in ("top1", "top5", "agreement", "cosine", "sqnr_db")})
            for build_only in ("path", "preset"):
                row.pop(build_only, None)
        score = "top1" if y is not None else "agreement"
        mark_pareto(rows, score)
        for i, row in enumerate(rows, 1):
            row["id"] = i
        report = {"model": source.name, "evaluation": {"data": data_name, "samples": len(x), "labelled": y is not None},
                  "score": score, "batch": batch, "threads": threads, "rounds": rounds,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "versions": versions(), "rows": rows}
        write_report(stage, report)
    progress(f"wrote {out}: report.json, report.md, report.png, report.html and {len(plan)} artifacts")
    return report


def _quantize(source, variants: set, calib_data, calib_samples, eval_data, max_accuracy_drop, progress) -> dict:
    """Calibrate once per int8 variant: {variant: (quant.Quantization, seconds)}."""
    from .quant import Quantization, calibrate

    out = {}
    for v in sorted(variants, key=lambda v: v.name):
        progress(f"calibrating {v.name}")
        start = time.perf_counter()
        out[v] = (Quantization(*calibrate(source, v.recipe, calib_data, calib_samples,
                                          max_accuracy_drop=max_accuracy_drop if v.mixed else None,
                                          val_data=eval_data, progress=progress)), time.perf_counter() - start)
    return out


def _run_and_time(rows, source, x, batch, rounds, threads, quantized, torch_compile, progress) -> None:
    """Fill each row's `logits` and `latency` (None where neither this machine nor the emulator runs it),
    and append the baselines, which run on this machine."""
    from . import emulator, runtime
    from .artifact import reference_logits
    from .bench import artifact_candidate, compile_torch, interleaved, onnxruntime_candidate, torch_candidates
    from .data import in_batches

    here, boards = [], {}
    for row in rows:
        row["device"], row["emulated"], row["logits"], row["latency"] = HERE, False, None, None
        try:
            row["model"] = runtime.load(row["path"])
            here.append(row)
        except MixerEdgeError as exc:
            cpu = row["preset"].emulator_cpu
            if cpu:
                row["device"], row["emulated"] = f"emulated {row['target']} ({cpu})", True
                boards.setdefault(cpu, []).append(row)
            else:
                row["device"] = f"not run: {exc}"
                progress(f"{row['target']} {row['variant']}: {exc}")
    first = np.ascontiguousarray(x[:batch])
    cands = []
    for row in here:
        row["logits"] = row["model"](x)
        cands.append(artifact_candidate(f"{row['target']} {row['variant']}", row.pop("model"), first))
    baselines = []
    if source.torch_model is not None:
        import torch

        compiled = compile_torch(source.torch_model, first, "cpu", progress) if torch_compile else None
        models = [source.torch_model, *([compiled] if compiled is not None else [])]
        for cand, model in zip(torch_candidates(source.torch_model, first, "cpu", compiled), models):
            engine, precision = cand.name.rsplit(" ", 1)
            with torch.no_grad():  # in the timed batch size: torch.compile specialised on it
                logits = in_batches(lambda chunk, m=model: m(torch.from_numpy(chunk)).numpy(), x, batch)
            baselines.append(({"engine": engine, "variant": precision, "precision": precision}, logits, cand))
    ort = [({"engine": "onnxruntime", "variant": "float32", "precision": "float32"}, source.onnx_model)]
    ort += [({"engine": "onnxruntime", "variant": f"{v.name} (QDQ)", "precision": "int8"}, q.qdq)
            for v, (q, _) in sorted(quantized.items(), key=lambda kv: kv[0].name)]
    for info, proto in ort:
        cand = onnxruntime_candidate(proto, first, "cpu", threads, f" {info['variant']}")
        baselines.append((info, reference_logits(None, proto, x), cand))
    cands += [cand for *_, cand in baselines]
    progress(f"timing on {HERE}: {len(cands)} candidates, {rounds} interleaved rounds")
    times = interleaved(cands, rounds=rounds) if cands else {}
    for row, cand in zip(here, cands):
        row["latency"] = times[cand.name]
    for info, logits, cand in baselines:
        rows.append({**info, "target": None, "artifact": None, "size_bytes": None, "build_s": None, "tune_s": None,
                     "calibrate_s": None, "tuning_db_records": None, "float_layers": None, "device": HERE,
                     "emulated": False, "logits": logits, "latency": times[cand.name]})
    for cpu, on_board in boards.items():
        progress(f"running and timing {len(on_board)} artifacts on the emulated {cpu} board")
        logits, latency = emulator.run_artifacts([r["path"] for r in on_board], x, cpu, rounds=rounds)
        for row, lg, lat in zip(on_board, logits, latency):
            row["logits"], row["latency"] = lg, lat



COLUMNS = ("#", "device", "engine", "variant", "target", "top-1", "top-5", "agreement", "cosine", "SQNR dB", "median ms",
           "p90 ms", "p99 ms", "size MB", "build s", "calibrate s", "tune s", "Pareto")


def _cells(row: dict) -> list[str]:
    def pct(v):
        return "–" if v is None else f"{v:.2%}"

    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    lat = row["latency"] or {}
    sqnr = "–" if row["agreement"] is None else "∞ (identical)" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
    return [str(row["id"]), row["device"], row["engine"], row["variant"], row["target"] or "–", pct(row["top1"]), pct(row["top5"]),
            pct(row["agreement"]), num(row["cosine"], ".6f"), sqnr, num(lat.get("median_ms"), ".3f"),
            num(lat.get("p90_ms"), ".3f"), num(lat.get("p99_ms"), ".3f"),
            num(row["size_bytes"] and row["size_bytes"] / 1e6, ".2f"), num(row["build_s"], ".1f"),
            num(row["calibrate_s"], ".1f"), num(row["tune_s"], ".1f"), "★" if row["pareto"] else ""]


def table(report: dict) -> list[str]:
    """The report's rows as the lines of a Markdown table."""
    return ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS),
            *("| " + " | ".join(_cells(row)) + " |" for row in report["rows"])]


def markdown(report: dict) -> str:
    m, ev = report["machine"], report["evaluation"]
    score = "top-1 accuracy" if report["score"] == "top1" else "top-1 agreement with the float model"
    lines = [f"# mixer-edge report: {report['model']}", "",
             f"Evaluated on {ev['data']} ({ev['samples']} samples); batch {report['batch']}, {report['threads']} "
             f"threads, {report['rounds']} interleaved timing rounds; {m.get('cpu', m['machine'])}, "
             f"{m['physical_cores']} cores; {report['created']}.", "",
             f"★ = Pareto-optimal on its device ({score} against median latency): nothing there is both as fast "
             "and as accurate. Agreement, cosine and SQNR compare the logits with the float model's. "
             "Emulated latency ranks builds for that board against each other; it is not the board's speed.", "",
             "![accuracy against latency](report.png)", "", *table(report)]
    v = report["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + "."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy (or agreement) against median latency, one panel per device, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    score = report["score"]
    timed = [r for r in report["rows"] if r["latency"] is not None and r[score] is not None]
    devices = list(dict.fromkeys(r["device"] for r in timed))
    fig, axes = plt.subplots(1, max(1, len(devices)), figsize=(6.5 * max(1, len(devices)), 5), squeeze=False)
    for ax, device in zip(axes[0], devices):
        rows = [r for r in timed if r["device"] == device]
        labels: dict[tuple, list[str]] = {}  # the table's row numbers, one label per cluster of close points
        for r in rows:
            mine = r["engine"] == "mixer-edge"
            xy = (r["latency"]["median_ms"], 100 * r[score])
            ax.scatter(*xy, s=70 if r["pareto"] else 40, marker="o" if mine else "s",
                       color={"float32": "C0", "float16": "C2", "int8": "C1"}.get(r["precision"], "C3") if mine
                       else "0.55", edgecolors="black" if r["pareto"] else "none", zorder=3)
            labels.setdefault((round(float(np.log10(xy[0])), 1), round(xy[1], 2)), [xy]).append(str(r["id"]))
        for xy, *ids in labels.values():
            ax.annotate(",".join(ids), xy, fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = sorted((r["latency"]["median_ms"], 100 * r[score]) for r in rows if r["pareto"])
        if front:
            ax.step(*zip(*front), where="post", color="black", linewidth=0.8, zorder=2)
        spread = max(r["latency"]["median_ms"] for r in rows) / min(r["latency"]["median_ms"] for r in rows)
        if spread > 5:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(device, fontsize=10)
        ax.set_xlabel("median latency, ms" + (" (emulated)" if rows[0]["emulated"] else ""))
        ax.set_ylabel("top-1 accuracy, %" if score == "top1" else "top-1 agreement with float, %")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['model']}: accuracy against latency\n(numbers: the table's rows; circles: mixer-edge, "
                 "squares: baselines; outlined: Pareto-optimal)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def html_page(report: dict, png: bytes) -> str:
    """A page that needs nothing beside it: the figure is inlined, the table is plain HTML."""
    intro = markdown(report).split("\n\n")[1:3]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr" + (' class="pareto"' if r["pareto"] else "") + ">" +
                   "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in report["rows"])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mixer-edge report: {html.escape(report['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:nth-child(-n+4){{text-align:left}}
tr.pareto{{background:#fff4d6}}img{{max-width:100%}}</style></head><body>
<h1>mixer-edge report: {html.escape(report['model'])}</h1>
{''.join(f'<p>{html.escape(p)}</p>' for p in intro)}
<img alt="accuracy against latency" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<table><tr>{head}</tr>{body}</table>
<p>Versions: {html.escape(versions)}. Machine: {html.escape(json.dumps(report['machine']))}.</p>
</body></html>
"""


def write_report(root: Path, report: dict) -> None:
    """report.json, report.md, report.png and report.html in directory `root`."""
    (root / "report.json").write_text(json_text(report))
    (root / "report.md").write_text(markdown(report), encoding="utf-8")
    plot(report, root / "report.png")
    (root / "report.html").write_text(html_page(report, (root / "report.png").read_bytes()), encoding="utf-8")

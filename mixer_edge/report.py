"""Which variant to ship: accuracy beside latency for every variant of a model on every target.

`make_report` builds each variant a plan.ReportRequest names (float32, float16 where the target has it,
int8 with each calibration recipe, int8 mixed precision) for each target, runs it on the evaluation data
(on this machine, or on the emulated board for ARM presets), times it in one interleaved session per
device beside the baselines (PyTorch eager, torch.compile, onnxruntime float and the same int8 QDQ
models, and the installed peers of peers.py), and marks the Pareto-optimal rows of each device. Each line is a `Row`; `write_report` writes
report.json (each row's `to_json`), report.md, report.png and a self-contained report.html.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .bench import Candidate, Latency, cosines
from .errors import MixerEdgeError, reason
from .formats import json_text
from .plan import Build, BuildRequest, ReportRequest, Variant
from .quant import Quantization

RANDOM_EVAL_SAMPLES = 64  # inputs drawn when the model has no evaluation data (agreement only)
HERE = "this machine"


@dataclass(frozen=True)
class Metrics:
    """An engine's logits on the evaluation data: top-1/top-5 accuracy on the labelled samples (None without
    any), and top-1 agreement, mean cosine and SQNR in dB (None: identical) against the float model's."""

    top1: float | None
    top5: float | None
    agreement: float
    cosine: float
    sqnr_db: float | None

    @classmethod
    def of(cls, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> Metrics:
        """`labels` -1: unknown."""
        from .quant.sensitivity import sqnr_db

        top1 = top5 = None
        known = labels >= 0 if labels is not None else None
        if known is not None and known.any():
            top = np.argsort(-logits[known], axis=1)[:, :5]
            truth = labels[known]
            top1, top5 = float((top[:, 0] == truth).mean()), float((top == truth[:, None]).any(1).mean())
        return cls(top1, top5, float((logits.argmax(1) == reference.argmax(1)).mean()),
                   float(cosines(logits, reference).mean()), sqnr_db(reference, logits))


@dataclass(frozen=True)
class BuildFacts:
    """What building one variant took: its artifact (a path inside the report), its size, the seconds spent,
    the tuning records it applied and the layers int8-mixed kept float."""

    target: str
    artifact: str
    size_bytes: int
    build_s: float
    tune_s: float | None
    calibrate_s: float | None
    tuning_db_records: int
    float_layers: list[str] | None


@dataclass(frozen=True)
class Row:
    """A line of the report: an engine running a variant on a device, and what it measured there."""

    engine: str  # mixer-edge, pytorch eager, torch.compile or onnxruntime
    variant: str
    precision: str
    device: str = HERE  # this machine, emulated TARGET (CPU), or not run: WHY
    emulated: bool = False
    built: BuildFacts | None = None  # mixer-edge rows
    latency: Latency | None = None  # None: not run
    metrics: Metrics | None = None  # None: not run

    def to_json(self, id: int, pareto: bool) -> dict:
        """The row in report.json: `id` its number in the table, `pareto` whether it is on its device's front."""
        built = asdict(self.built) if self.built else dict.fromkeys(f.name for f in fields(BuildFacts))
        metrics = asdict(self.metrics) if self.metrics else dict.fromkeys(f.name for f in fields(Metrics))
        return {"engine": self.engine, "target": built.pop("target"), "variant": self.variant,
                "precision": self.precision, **built, "device": self.device, "emulated": self.emulated,
                "latency": self.latency and self.latency.to_json(), **metrics, "pareto": pareto, "id": id}


def pareto_front(rows: list[Row], score: str) -> list[bool]:
    """Whether each row is Pareto-optimal on its device: timed, and no other timed row there is at least as fast
    and as accurate (on `score`, a Metrics field) and better in one of the two."""
    points = [(r.latency.median_ms, getattr(r.metrics, score)) if r.latency and r.metrics else None for r in rows]
    return [mine is not None and not any(
        theirs is not None and other is not row and other.device == row.device and theirs[0] <= mine[0]
        and theirs[1] >= mine[1] and theirs != mine for other, theirs in zip(rows, points))
        for row, mine in zip(rows, points)]


@dataclass(frozen=True)
class EvalData:
    """What every engine runs on: inputs, their labels (None: unlabelled) and where they came from (None: drawn
    at random)."""

    x: np.ndarray
    y: np.ndarray | None
    path: str | None

    @classmethod
    def load(cls, source, path: str | None, batch: int) -> EvalData:
        """`path`, else the model's evaluation data, else random-normal inputs; at least one `batch`."""
        from .data import load_inputs

        path = path or source.eval_data
        if path:
            data = cls(*load_inputs(path, source.preprocess), str(path))
        else:
            shape = (RANDOM_EVAL_SAMPLES, *source.input.shape[1:])
            data = cls(np.random.default_rng(0).standard_normal(shape).astype(np.float32), None, None)
        if len(data.x) < batch:
            raise MixerEdgeError(f"the evaluation data has {len(data.x)} samples, fewer than --batch {batch}")
        return data

    @property
    def labelled(self) -> bool:
        return self.y is not None

    @property
    def name(self) -> str:
        return self.path or f"{RANDOM_EVAL_SAMPLES} random-normal inputs (no labels)"


@dataclass(frozen=True)
class Quantized:
    """An int8 variant's quantization, and the seconds calibrating it took."""

    quantization: Quantization
    seconds: float


@dataclass(frozen=True)
class Run:
    """Where an artifact ran and what it gave: its logits on the evaluation data and its latency (None: not run)."""

    device: str
    emulated: bool = False
    logits: np.ndarray | None = None
    latency: Latency | None = None


@dataclass(frozen=True)
class Baseline:
    """A reference engine on this machine: its row's names, its logits on the evaluation data, what times it."""

    engine: str
    variant: str
    precision: str
    logits: np.ndarray
    candidate: Candidate


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


def make_report(source, request: ReportRequest, out: str | Path, progress=print) -> dict:
    """Build, evaluate and time every variant of `source` (an export.ModelSource) that `request` names; write the
    report directory `out` (atomically, with the artifacts under artifacts/) and return report.json's content."""
    from . import runtime
    from .artifact import reference_logits, versions
    from .atomic import REPORT, atomic_dir, check_destination
    from .bench import use_threads

    calib_data = request.calibration and request.calibration.data
    check_destination(out, REPORT, inputs=(request.eval_data, calib_data, request.tuning.database))
    threads = request.threads or runtime.physical_cores()
    use_threads(threads)
    data = EvalData.load(source, request.eval_data, request.batch)
    plan = request.builds(data.labelled)
    if any(b.preset.emulator_cpu and b.preset.arch != platform.machine() for b in plan.builds):
        from .emulator import require_board

        require_board()  # before the slow builds
    progress(f"report on {data.name}: {len(plan.builds)} builds "
             f"({', '.join(f'{b.preset.name} {b.variant.name}' for b in plan.builds)})")
    reference = reference_logits(source.torch_model, source.onnx_model, data.x)
    quantized = _quantize(source, plan, data, progress)
    with atomic_dir(out, REPORT) as stage:
        built = [_build(source, plan, build, stage, quantized.get(build.variant), progress) for build in plan.builds]
        rows = _measure(source, built, stage, data, reference, request, threads, quantized, progress)
        score = "top1" if data.labelled else "agreement"
        pareto = pareto_front(rows, score)
        report = {"model": source.name, "evaluation": {"data": data.name, "samples": len(data.x),
                                                       "labelled": data.labelled},
                  "score": score, "batch": request.batch, "threads": threads, "rounds": request.rounds,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "versions": versions(),
                  "rows": [row.to_json(i, front) for i, (row, front) in enumerate(zip(rows, pareto), 1)],
                  "inside": _look_inside(source, built, rows, stage, data.x, progress)}
        write_report(stage, report)
    progress(f"wrote {out}: report.json, report.md, report.png, report.html and {len(plan.builds)} artifacts")
    return report


INSIDE_SAMPLES, INSIDE_REPEAT = 16, 5  # inputs each variant's layers are compared on; inferences profiled


def _look_inside(source, built: list[tuple[Build, BuildFacts]], rows: list[Row], stage: Path, x: np.ndarray,
                 progress) -> dict:
    """Each mixer-edge variant that ran (here or on its emulated board) seen inside: its layers' times
    (layers.profile) and errors against the float model (layers.compare), as report.inside's sections."""
    from . import layers

    sections = {}
    for (build, facts), row in zip(built, rows):
        if row.latency is None:  # not run here nor on an emulated board
            continue
        name, board = f"{build.preset.name} {build.variant.name}", build.preset.name if row.emulated else None
        progress(f"looking inside {name}: each layer's time and error")
        artifact = stage / facts.artifact
        inputs = x[:max(INSIDE_SAMPLES, build.batch)]
        try:
            sections[name] = inside(*layers.look_inside(artifact, source, inputs, board=board, repeat=INSIDE_REPEAT))
        except Exception as exc:  # the look inside is an addition: a model it cannot map leaves the report whole
            progress(f"{name}: no look inside ({reason(exc)})")
    return sections


def _quantize(source, plan: BuildRequest, data: EvalData, progress) -> dict[Variant, Quantized]:
    """Calibrate each int8 variant once, for every target; int8-mixed measures its drop on the evaluation data."""
    out = {}
    for variant in plan.int8_variants:
        progress(f"calibrating {variant.name}")
        start = time.perf_counter()
        quantization = plan.quantize(source, variant, data.path, progress)
        out[variant] = Quantized(quantization, time.perf_counter() - start)
    return out


def _build(source, plan: BuildRequest, build: Build, stage: Path, quantized: Quantized | None,
           progress) -> tuple[Build, BuildFacts]:
    """Tune (with --tune) and compile one build into stage/artifacts/, timing both."""
    from .compiler import Tuning, compile_model, tune

    quant = quantized.quantization if quantized else None
    tune_s = None
    if plan.tuning.tune:  # into the database the compile below applies
        start = time.perf_counter()
        tune(quant.qdq if quant else source.onnx_model, build.preset, build.batch, build.variant.precision,
             tuning=plan.tuning, model=source.name, progress=progress)
        tune_s = round(time.perf_counter() - start, 1)
    path = stage / "artifacts" / build.name(source.name)
    start = time.perf_counter()
    manifest = compile_model(source, build.preset, path, batch=build.batch, precision=build.variant.precision,
                             verify=False, tuning=Tuning(plan.tuning.database), quantized=quant, progress=progress)
    build_s = round(time.perf_counter() - start, 2)
    db = manifest["build"]["tuning_db"]
    return build, BuildFacts(
        target=build.preset.name, artifact=str(path.relative_to(stage)),
        size_bytes=sum(f.stat().st_size for f in path.iterdir()), build_s=build_s, tune_s=tune_s,
        calibrate_s=quantized and round(quantized.seconds, 1), tuning_db_records=db["records"] if db else 0,
        float_layers=quant.summary.get("mixed_precision", {}).get("float_layers") if quant else None)


def _measure(source, built: list[tuple[Build, BuildFacts]], stage: Path, data: EvalData, reference: np.ndarray,
             request: ReportRequest, threads: int, quantized: dict[Variant, Quantized], progress) -> list[Row]:
    """Run every artifact on the evaluation data and time it (on this machine, interleaved with the baselines, or
    on its preset's emulated board); the rows: the artifacts in plan order, then the baselines."""
    from .bench import artifact_candidate, interleaved

    here, boards, runs = _place(built, stage, progress)
    logits = [model(data.x) for _, model in here]
    baselines = _baselines(source, data.x, request.batch, threads, quantized, request.torch_compile, progress,
                           request.peers)
    candidates = [artifact_candidate(f"{built[i][0].preset.name} {built[i][0].variant.name}", model, data.x)
                  for i, model in here] + [baseline.candidate for baseline in baselines]
    progress(f"timing on {HERE}: {len(candidates)} candidates, {request.rounds} interleaved rounds")
    latencies = interleaved(candidates, rounds=request.rounds)
    for (i, _), lg, latency in zip(here, logits, latencies):
        runs[i] = Run(HERE, False, lg, latency)
    runs.update(_run_on_boards(built, boards, stage, data.x, request.rounds, progress))

    def metrics(lg):
        return None if lg is None else Metrics.of(lg, reference, data.y)

    rows = [Row("mixer-edge", build.variant.name, build.variant.precision, runs[i].device, runs[i].emulated, facts,
                runs[i].latency, metrics(runs[i].logits)) for i, (build, facts) in enumerate(built)]
    return rows + [Row(b.engine, b.variant, b.precision, HERE, latency=latency, metrics=metrics(b.logits))
                   for b, latency in zip(baselines, latencies[len(here):])]


def _place(built: list[tuple[Build, BuildFacts]], stage: Path, progress):
    """Where each artifact runs: loaded here [(index, runtime.Model)], else on its preset's emulated board
    {cpu: [index]}, else nowhere {index: Run saying why}."""
    from . import runtime

    here, boards, runs = [], {}, {}
    for i, (build, facts) in enumerate(built):
        try:
            here.append((i, runtime.load(stage / facts.artifact)))
        except MixerEdgeError as exc:
            if build.preset.emulator_cpu:
                boards.setdefault(build.preset.emulator_cpu, []).append(i)
            else:
                runs[i] = Run(f"not run: {exc}")
                progress(f"{build.preset.name} {build.variant.name}: {exc}")
    return here, boards, runs


def _baselines(source, x: np.ndarray, batch: int, threads: int, quantized: dict[Variant, Quantized],
               torch_compile: bool, progress, peers: bool | tuple[str, ...] = True) -> list[Baseline]:
    """PyTorch eager and torch.compile in float32, onnxruntime on the float model and on each int8 variant's QDQ
    model, and the installed `peers` (a tuple: those engines): on this machine's CPU, timed on one batch."""
    from .artifact import reference_logits
    from .bench import compile_torch, onnxruntime_candidate, torch_candidate
    from .data import in_batches

    first = np.ascontiguousarray(x[:batch])
    baselines = []
    if source.torch_model is not None:
        import torch

        compiled = compile_torch(source.torch_model, first, "cpu", progress) if torch_compile else None
        for engine, model in (("pytorch eager", source.torch_model), ("torch.compile", compiled)):
            if model is None:
                continue
            with torch.no_grad():  # in the timed batch size: torch.compile specialised on it
                logits = in_batches(lambda chunk: model(torch.from_numpy(chunk)).numpy(), x, batch)
            baselines.append(Baseline(engine, "float32", "float32", logits, torch_candidate(engine, model, first, "cpu")))
    protos = [("float32", "float32", source.onnx_model)]
    protos += [(f"{v.name} (QDQ)", "int8", q.quantization.qdq) for v, q in quantized.items()]
    for variant, precision, proto in protos:
        candidate = onnxruntime_candidate(proto, first, "cpu", threads, precision)
        baselines.append(Baseline("onnxruntime", variant, precision, reference_logits(None, proto, x), candidate))
    return baselines + (_peer_baselines(source, x, first, threads, quantized, progress, peers) if peers else [])


def _peer_baselines(source, x: np.ndarray, first: np.ndarray, threads: int, quantized: dict[Variant, Quantized],
                    progress, engines: bool | tuple[str, ...] = True) -> list[Baseline]:
    """The installed peers (peers.py): OpenVINO on the float model and on each int8 variant's QDQ model,
    onnxruntime's own quantize_static int8 and ExecuTorch/XNNPACK float32 and int8 (both calibrated on the first
    int8 variant's calibration inputs); the rest named once through `progress`."""
    from .data import in_batches
    from .peers import OPENVINO, Peers, calibration_inputs

    calibrated = next(iter(quantized.values()), None)
    peers = Peers(threads, calibration_inputs(source, calibrated and calibrated.quantization), progress,
                  **({"engines": engines} if isinstance(engines, tuple) else {}))
    found = [("float32", peer) for peer in peers.float32(source, first.shape)]
    for v, q in quantized.items():
        found += [(f"{v.name} (QDQ)" if peer.engine == OPENVINO else peer.variant, peer)
                  for peer in peers.int8(source, q.quantization.qdq, first.shape)]
    baselines = {}
    for variant, peer in found:  # onnxruntime's and ExecuTorch's int8 once, whatever the variants
        if (peer.engine, variant) not in baselines:
            baselines[peer.engine, variant] = Baseline(peer.engine, variant, peer.precision,
                                                       in_batches(peer.infer, x, len(first)), peer.candidate(first))
    return list(baselines.values())


def _run_on_boards(built: list[tuple[Build, BuildFacts]], boards: dict[str, list[int]], stage: Path, x: np.ndarray,
                   rounds: int, progress) -> dict[int, Run]:
    """Run and time the artifacts of each emulated board there, interleaved: {index: Run}."""
    from . import emulator

    runs = {}
    for cpu, indices in boards.items():
        progress(f"running and timing {len(indices)} artifacts on the emulated {cpu} board")
        logits, latency = emulator.run_artifacts([stage / built[i][1].artifact for i in indices], x, cpu, rounds=rounds)
        for i, lg, lat in zip(indices, logits, latency):
            runs[i] = Run(f"emulated {built[i][0].preset.name} ({cpu})", True, lg, lat)
    return runs


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


def peer_lines(report: dict) -> list[str]:
    """Each timed mixer-edge row against the fastest other engine of its precision on its device (not the slowest)."""
    timed = [r for r in report["rows"] if r["latency"]]
    lines = []
    for mine in (r for r in timed if r["engine"] == "mixer-edge"):
        peers = [r for r in timed if r["engine"] != "mixer-edge" and r["device"] == mine["device"]
                 and r["precision"] == mine["precision"]]
        if not peers:
            continue
        peer = min(peers, key=lambda r: r["latency"]["median_ms"])
        ratio = peer["latency"]["median_ms"] / mine["latency"]["median_ms"]
        lines.append(f"- #{mine['id']} mixer-edge {mine['target']} {mine['variant']}: {ratio:.2f}x the speed of the "
                     f"fastest {mine['precision']} peer, #{peer['id']} {peer['engine']} {peer['variant']}"
                     + (" (mixer-edge is slower)" if ratio < 1 else ""))
    return ["", "Against the fastest other engine of the same precision on the same device:", "", *lines] \
        if lines else []


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
             "![accuracy against latency](report.png)", "", *table(report), *peer_lines(report)]
    for name, section in report.get("inside", {}).items():
        lines += ["", f"## Inside {name} ({section['where']})", "",
                  "Five slowest layers: " + ", ".join(f"{r['layer']} ({r['ms']:.4f} ms, {r['share']:.1%})"
                                                      for r in section["slowest"]) + ".",
                  "Five layers with the worst SQNR: " + (", ".join(f"{r['layer']} ({r['sqnr_db']:.1f} dB)"
                                                                   for r in section["worst_sqnr"]) or "none") + "."]
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
{''.join(inside_html(name, section) for name, section in report.get('inside', {}).items())}
<p>Versions: {html.escape(versions)}. Machine: {html.escape(json.dumps(report['machine']))}.</p>
</body></html>
"""


def inside(profile, comparison) -> dict:
    """One variant's look inside (layers.Profile, layers.Comparison): its five slowest layers, its five layers
    with the worst SQNR, and each layer's time and SQNR for the chart."""
    sqnr = {r.layer: r.sqnr_db for r in comparison.layers if r.compared in ("float", "dequantized")}
    return {"where": profile.where, "emulated": profile.emulated,
            "slowest": [{"layer": r.layer, "ms": r.ms, "share": r.share} for r in profile.slowest()],
            "worst_sqnr": [{"layer": r.layer, "sqnr_db": r.sqnr_db} for r in comparison.worst()],
            "layers": [{"layer": r.layer, "ms": r.ms, "sqnr_db": sqnr.get(r.layer)} for r in profile.layers]}


def inside_html(name: str, section: dict) -> str:
    """A variant's slowest and worst-SQNR layers, and an inline SVG chart: per layer, its time (left bar) beside
    its SQNR in dB (right bar; none where the layer's output is not compared)."""
    rows = section["layers"]
    top_ms = max((r["ms"] for r in rows), default=0) or 1
    top_db = max((r["sqnr_db"] for r in rows if r["sqnr_db"] is not None), default=0) or 1
    height, bar = 14 * len(rows) + 30, 220
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" class="inside" width="{300 + 2 * bar + 120}" height="{height}">',
           f'<text x="300" y="12" font-size="11">time, ms{" (emulated)" if section["emulated"] else ""}</text>',
           f'<text x="{300 + bar + 60}" y="12" font-size="11">SQNR, dB</text>']
    for i, r in enumerate(rows):
        y = 20 + 14 * i
        svg.append(f'<text x="295" y="{y + 10}" font-size="10" text-anchor="end">{html.escape(r["layer"])}</text>')
        svg.append(f'<rect x="300" y="{y}" width="{bar * r["ms"] / top_ms:.1f}" height="11" fill="#1f77b4" '
                   f'data-layer="{html.escape(r["layer"])}" data-ms="{r["ms"]:.6g}"/>')
        if r["sqnr_db"] is not None:
            svg.append(f'<rect x="{300 + bar + 60}" y="{y}" width="{bar * max(r["sqnr_db"], 0) / top_db:.1f}" '
                       f'height="11" fill="#ff7f0e" data-layer="{html.escape(r["layer"])}" '
                       f'data-sqnr-db="{r["sqnr_db"]:.6g}"/>')
    svg.append("</svg>")
    slow = "".join(f"<li>{html.escape(r['layer'])}: {r['ms']:.4f} ms ({r['share']:.1%})</li>"
                   for r in section["slowest"])
    worst = "".join(f"<li>{html.escape(r['layer'])}: {r['sqnr_db']:.1f} dB</li>" for r in section["worst_sqnr"])
    return (f"<h2>Inside {html.escape(name)} ({html.escape(section['where'])})</h2>"
            f"<p>Five slowest layers:</p><ol>{slow}</ol><p>Five layers with the worst SQNR:</p><ol>{worst}</ol>"
            + "".join(svg))


def write_report(root: Path, report: dict) -> None:
    """report.json, report.md, report.png and report.html in directory `root`."""
    (root / "report.json").write_text(json_text(report))
    (root / "report.md").write_text(markdown(report), encoding="utf-8")
    plot(report, root / "report.png")
    (root / "report.html").write_text(html_page(report, (root / "report.png").read_bytes()), encoding="utf-8")

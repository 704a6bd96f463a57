"""Latency of artifacts beside PyTorch eager, onnxruntime and the optional peers (peers.py: OpenVINO,
onnxruntime's own int8, ExecuTorch/XNNPACK on the CPU; torch.compile max-autotune and TensorRT on a GPU),
measured in one process, interleaved.

Each round runs every candidate a few times in turn, so a noisy machine slows all of them alike;
the report gives medians over rounds, ratios to PyTorch eager float32 on the same device, each
candidate's agreement with PyTorch, and mixer-edge against the fastest peer of its precision.
Measurements are typed (`Latency`, `Timing`, `Agreement`, one `BenchRow` per artifact, whose `to_json`
is a row of `bench --json`). Importable with numpy and the TVM runtime alone: the emulated board times
artifacts with `artifact_candidate` and `interleaved`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MixerEdgeError, reason

REFERENCE = ("pytorch eager", "float32")  # the (engine, precision) every speed-up is relative to


@dataclass(frozen=True)
class Candidate:
    """One engine to time: `run` does one synchronised inference (it returns when the result is ready)."""

    name: str  # its label in tables
    run: Callable[[], object]
    engine: str = "mixer-edge"  # mixer-edge, pytorch eager, torch.compile, onnxruntime or a peer (peers.py)
    precision: str | None = None
    output: Callable[[], np.ndarray] | None = None  # its logits on the timed input (None: not checked)


@dataclass(frozen=True)
class Latency:
    """Per-call latency in milliseconds over `calls` timed calls; `per` says what one timed call is where it is
    not one inference (on a board over RPC: the mean of several)."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    calls: int
    per: str | None = None

    @classmethod
    def of(cls, ms: list[float], calls: int | None = None, per: str | None = None) -> Latency:
        """Median, p90, p99 and min of per-call latencies `ms` (`calls`: how many calls they cover)."""
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(min(ms)), calls or len(ms), per)

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def interleaved(candidates: list[Candidate], rounds: int = 20, inner: int = 5, warmup: int = 3) -> list[Latency]:
    """Per-inference latency of each candidate, in their order: every call of `rounds` x `inner` timed on its own."""
    for cand in candidates:
        for _ in range(warmup):
            cand.run()
    samples: list[list[float]] = [[] for _ in candidates]
    for _ in range(rounds):
        for cand, ms in zip(candidates, samples):
            cand.run()  # untimed: wakes this engine's threads after the previous engine's turn
            for _ in range(inner):
                start = time.perf_counter()
                cand.run()
                ms.append((time.perf_counter() - start) * 1e3)
    return [Latency.of(ms) for ms in samples]


def artifact_candidate(name: str, model, x: np.ndarray) -> Candidate:
    """The artifact `model` (a runtime.Model) on the first batch of `x`, input and weights already on its device
    (a wgpu artifact: the whole call, upload and read-back included)."""
    return Candidate(name, model.timer(x), "mixer-edge", model.record.precision.compute)


def torch_runner(model, x: np.ndarray, device: str, precision: str = "float32") -> Callable[[], object]:
    """One synchronised call of `model` (a torch module already on `device` in `precision`) on `x`, which is put
    on the device once, here."""
    import torch

    data = torch.from_numpy(x).to(device=device, dtype=getattr(torch, precision))

    def run():
        with torch.no_grad():
            out = model(data)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def torch_candidate(engine: str, model, x: np.ndarray, device: str, precision: str = "float32") -> Candidate:
    """`model` (a torch module already on `device` in `precision`) on `x`."""
    run = torch_runner(model, x, device, precision)
    return Candidate(f"{engine} {precision}", run, engine, precision, output=lambda: run().float().cpu().numpy())


def torch_candidates(torch_model, x: np.ndarray, device: str, compiled=None) -> list[Candidate]:
    """PyTorch eager in float32, and in float16 on a GPU, on the same input; `compiled` (from
    `compile_torch`) adds torch.compile in float32."""
    import copy

    import torch

    cands = []
    for precision in ("float32", "float16") if device == "cuda" else ("float32",):
        model = copy.deepcopy(torch_model).to(device=device, dtype=getattr(torch, precision)).eval()
        cands.append(torch_candidate("pytorch eager", model, x, device, precision))
    return cands + ([torch_candidate("torch.compile", compiled, x, device)] if compiled is not None else [])


def compile_torch(torch_model, x: np.ndarray, device: str = "cpu", progress=print):
    """torch.compile of the float32 model, compiled for `x`'s shape; None where it does not work here."""
    progress(f"torch.compile for input {tuple(x.shape)} (tens of seconds)")
    try:
        return torch_compiled(torch_model, x, device)
    except Exception as exc:  # no C++ compiler, an op Inductor lacks, ...: the baseline is then left out
        progress(f"torch.compile does not work here ({reason(exc)}); left out")
        return None


def torch_compiled(torch_model, x: np.ndarray, device: str, precision: str = "float32", mode: str | None = None):
    """torch.compile (`mode`: e.g. max-autotune) of the model in `precision` on `device`, compiled by one call on
    `x`'s shape; raises where it does not work here."""
    import copy

    import torch

    dtype = getattr(torch, precision)
    model = torch.compile(copy.deepcopy(torch_model).to(device=device, dtype=dtype).eval(), dynamic=False, mode=mode)
    with torch.no_grad():
        model(torch.from_numpy(x).to(device=device, dtype=dtype))
    return model


def use_threads(threads: int) -> None:
    """Give every candidate the same CPU thread count (call before TVM's runtime starts its pool)."""
    import os

    import torch

    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def onnxruntime_candidate(proto, x: np.ndarray, device: str, threads: int, precision: str = "float32") -> Candidate | None:
    """onnxruntime running `proto` (int8: a QDQ model) on the same device, or None where it has no provider for it."""
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return None
    sess = onnxruntime_session(proto, threads, provider)
    feed = {sess.get_inputs()[0].name: x}
    name = f"onnxruntime {provider.removesuffix('ExecutionProvider')}" + (" int8 (QDQ)" if precision == "int8" else "")
    return Candidate(name, lambda: sess.run(None, feed), "onnxruntime", precision,
                     output=lambda: sess.run(None, feed)[0])


def onnxruntime_session(proto, threads: int, provider: str = "CPUExecutionProvider"):
    """An onnxruntime session for `proto` on `threads` intra-op threads that sleep when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would slow the next candidate
    return ort.InferenceSession(proto.SerializeToString(), options, providers=[provider])


@dataclass(frozen=True)
class Agreement:
    """How far an artifact's logits are from the reference's: top-1 agreement, max |diff|, min cosine."""

    top1_agreement: float
    max_abs_diff: float
    min_cosine: float

    @classmethod
    def of(cls, got: np.ndarray, ref: np.ndarray) -> Agreement:
        return cls(float((got.argmax(1) == ref.argmax(1)).mean()), float(np.abs(got - ref).max()),
                   float(cosines(got, ref).min()))


def cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of logits with the reference's."""
    return (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)


@dataclass(frozen=True)
class Timing:
    """One candidate's latency in a bench row, its inferences per second, its speed-up over PyTorch eager
    float32 timed beside it (None where that did not run) and its logits against PyTorch's (None: not checked)."""

    candidate: str  # the candidate's label
    engine: str
    precision: str | None
    latency: Latency
    throughput_per_s: float
    speedup_vs_pytorch_fp32: float | None = None
    vs_torch_fp32: Agreement | None = None

    @property
    def peer(self) -> bool:
        """Whether this is another engine's (not mixer-edge's)."""
        return self.engine != "mixer-edge"

    def to_json(self) -> dict:
        speedup, agreement = self.speedup_vs_pytorch_fp32, self.vs_torch_fp32
        return {**self.latency.to_json(), "throughput_per_s": self.throughput_per_s,
                **({"speedup_vs_pytorch_fp32": speedup} if speedup is not None else {}),
                **({"vs_torch_fp32": asdict(agreement)} if agreement is not None else {})}


def timings(candidates: list[Candidate], latencies: list[Latency], batch: int,
            agreements: list[Agreement | None] | None = None) -> tuple[Timing, ...]:
    """Each candidate's Timing, from latencies measured side by side at `batch` inputs per call (and each one's
    agreement with PyTorch, in the same order)."""
    base = next((lat.median_ms for c, lat in zip(candidates, latencies) if (c.engine, c.precision) == REFERENCE), None)
    agreements = agreements or [None] * len(candidates)
    return tuple(Timing(c.name, c.engine, c.precision, lat, batch * 1e3 / lat.median_ms,
                        None if base is None else base / lat.median_ms, agreement)
                 for c, lat, agreement in zip(candidates, latencies, agreements))


@dataclass(frozen=True)
class BenchRow:
    """One artifact timed beside its baselines at its batch size."""

    artifact: str
    batch: int
    precision: str
    device: str  # cuda or cpu (where the baselines ran too), or rpc:KEY (a board, no baselines)
    threads: int | None  # CPU threads of every candidate; None: the board's
    vs_torch_fp32: Agreement
    timings: tuple[Timing, ...]
    left_out: tuple[str, ...] = ()  # the peers left out of this row, and why

    def timing(self, engine: str) -> Timing | None:
        """The first timing of `engine`."""
        return next((t for t in self.timings if t.engine == engine), None)

    def fastest_peer(self) -> Timing | None:
        """The fastest other engine of this artifact's precision timed beside it (None: there was none)."""
        return min((t for t in self.timings if t.peer and t.precision == self.precision),
                   key=lambda t: t.latency.median_ms, default=None)

    def vs_fastest_peer(self) -> float | None:
        """mixer-edge's speed as a multiple of the fastest peer's (above 1: mixer-edge is faster)."""
        mine, peer = self.timing("mixer-edge"), self.fastest_peer()
        return None if mine is None or peer is None else peer.latency.median_ms / mine.latency.median_ms

    def to_json(self) -> dict:
        """The row in `bench --json`: latency keyed by candidate label."""
        peer = self.fastest_peer()
        return {"artifact": self.artifact, "batch": self.batch, "precision": self.precision, "device": self.device,
                "threads": self.threads, "vs_torch_fp32": asdict(self.vs_torch_fp32),
                "latency": {t.candidate: t.to_json() for t in self.timings},
                "fastest_peer": peer and {"candidate": peer.candidate, "mixer_edge_speedup": self.vs_fastest_peer()},
                "left_out": list(self.left_out)}


def build_and_compare(request, model, rounds: int = 20, threads: int | None = None, torch_compile: bool = True,
                      board=None, peers: bool | tuple[str, ...] = True, progress=print) -> list[BenchRow]:
    """`bench`: build every artifact of `request` (a plan.BuildRequest) for `model` (a plan.ModelRequest) in a
    temporary directory, then compare() them (on `board`, a compiler.tuning.RpcBoard, when given)."""
    import tempfile

    from .plan import build_all
    from .runtime import physical_cores

    if model.is_onnx:
        raise MixerEdgeError("bench times artifacts beside PyTorch: give a preset (and --checkpoint), not an ONNX file")
    use_threads(threads or physical_cores())  # before the build starts TVM's thread pool
    with tempfile.TemporaryDirectory() as tmp:  # compare() checks every artifact against PyTorch itself
        source, artifacts = build_all(request, model, parent=tmp, verify=False, progress=progress)
        quantization = next((a.quantization for a in artifacts if a.quantization), None)
        return compare(source, [a.path for a in artifacts], rounds=rounds, threads=threads,
                       qdq=quantization and quantization.qdq, torch_compile=torch_compile, rpc=board,
                       calibration=quantization, peers=peers, progress=progress)


def compare(source, artifacts: list[Path], rounds: int = 20, threads: int | None = None, qdq=None,
            torch_compile: bool = False, rpc=None, calibration=None, peers: bool | tuple[str, ...] = True,
            progress=print) -> list[BenchRow]:
    """Time each artifact (they share one model) beside the baselines at its batch size, every candidate on
    `threads` CPU threads (default: the physical cores); check its outputs. int8 artifacts are timed
    beside onnxruntime running `qdq`, the QDQ ONNX they were compiled from; `torch_compile` adds
    torch.compile to the PyTorch baselines; `peers` adds the installed peers (peers.py; a tuple: those engines
    only) beside CPU and CUDA artifacts, their CPU int8 calibrated on the inputs `calibration` (the
    quant.Quantization of `qdq`) was. With `rpc` (a compiler.tuning.RpcBoard) the artifacts run and are timed on
    a board from that tracker instead, without baselines (they do not run there)."""
    from . import runtime
    from .peers import Peers, calibration_inputs

    if rpc is not None:
        return [remote_row(source, path, rpc, rounds, progress) for path in artifacts]
    threads = threads or runtime.physical_cores()
    use_threads(threads)
    compiled = {} if torch_compile else None  # torch.compile by (input shape, device), compiled once
    others = None
    if peers:
        others = Peers(threads, calibration_inputs(source, calibration), progress,
                       **({"engines": peers} if isinstance(peers, tuple) else {}))
    return [local_row(source, path, rounds, threads, qdq, compiled, progress, others) for path in artifacts]


def local_row(source, path: Path, rounds: int, threads: int, qdq, compiled: dict | None, progress,
              peers=None) -> BenchRow:
    """compare()'s row for an artifact run here, interleaved with PyTorch (and torch.compile, cached in
    `compiled`; None: left out), onnxruntime on the device PyTorch uses beside it and the `peers` (a
    peers.Peers) of its precision and device (Peers.beside); every candidate's logits checked against PyTorch's.
    A CUDA artifact on a machine without a GPU is refused by runtime.load, before any baseline or peer is built."""
    from . import runtime
    from .artifact import reference_logits

    model = runtime.load(path)
    x = timing_input(source, model.input_shape)
    device, precision = model.baseline_device, model.record.precision.compute
    if compiled is not None and (x.shape, device) not in compiled:
        compiled[x.shape, device] = compile_torch(source.torch_model, x, device, progress)
    torch_compiled = compiled[x.shape, device] if compiled is not None else None
    cands = [artifact_candidate(f"mixer-edge {precision}", model, x),
             *torch_candidates(source.torch_model, x, device, torch_compiled)]
    proto, onnx_batch = qdq if precision == "int8" else source.onnx_model, source.input.shape[0]
    onnx_fits = isinstance(onnx_batch, str) or onnx_batch == model.batch
    ort = onnxruntime_candidate(proto, x, device, threads, precision) if proto is not None and onnx_fits else None
    cands += [ort] if ort else []
    left_out = ()
    if peers is not None:
        cands += [peer.candidate(x) for peer in peers.beside(source, qdq, x.shape, device, precision, onnx_fits)]
        left_out = tuple(peers.last_left_out)
    progress(f"timing {path.name}: {', '.join(c.name for c in cands)} ({rounds} interleaved rounds)")
    latencies = interleaved(cands, rounds=rounds)
    ref = reference_logits(source.torch_model, source.onnx_model, x)
    agreement = Agreement.of(model(x), ref)
    agreements = [agreement if c.engine == "mixer-edge" else Agreement.of(np.asarray(c.output()), ref)
                  if c.output else None for c in cands]
    return BenchRow(str(path), model.batch, precision, device, threads, agreement,
                    timings(cands, latencies, model.batch, agreements), left_out)


def timing_input(source, shape) -> np.ndarray:
    """One batch to time on: the first of the model's evaluation data (int8 ranges were calibrated on data
    like it), else random-normal."""
    if source.eval_data:
        from .data import load_inputs

        real = load_inputs(source.eval_data, source.preprocess)[0]
        if len(real) >= shape[0]:
            return real[:shape[0]]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def remote_row(source, path: Path, rpc, rounds: int, progress=print, inner: int = 5) -> BenchRow:
    """compare()'s row for an artifact run on a board over RPC (`rpc`: compiler.tuning.RpcBoard): its latency there
    (TVM's time_evaluator: `rounds` repeats, each the mean of `inner` calls), its outputs against PyTorch."""
    from . import runtime
    from .artifact import reference_logits

    progress(f"timing {Path(path).name} on a '{rpc.key}' board from the tracker {rpc.host}:{rpc.port}")
    with runtime.artifact_dir(path) as root:
        model = runtime.load_remote(root, connect(rpc))
    x = timing_input(source, model.input_shape)
    precision = model.record.precision.compute
    seconds = model.device_times(x, number=inner, repeat=rounds)
    latency = Latency.of([s * 1e3 for s in seconds], calls=rounds * inner, per=f"mean of {inner} calls")
    timing = Timing(f"mixer-edge {precision} on {rpc.key}", "mixer-edge", precision, latency,
                    model.batch * 1e3 / latency.median_ms)
    agreement = Agreement.of(model(x), reference_logits(source.torch_model, source.onnx_model, x))
    return BenchRow(str(path), model.batch, precision, f"rpc:{rpc.key}", None, agreement, (timing,))


def connect(rpc):
    """A session with a board taken from a TVM RPC tracker (`rpc`: compiler.tuning.RpcBoard)."""
    from tvm import rpc as tvm_rpc

    try:
        return tvm_rpc.connect_tracker(rpc.host, rpc.port).request(rpc.key, session_timeout=600)
    except Exception as exc:
        raise MixerEdgeError(f"no board under key '{rpc.key}' at the tracker {rpc.host}:{rpc.port} "
                             f"({reason(exc, last=True)}): start one with python -m mixer_edge.rpc_server") from exc


def format_rows(rows: list[BenchRow]) -> str:
    lines = ["| artifact | batch | threads | candidate | median ms | p90 ms | p99 ms | min ms | inferences/s | "
             "speed-up vs PyTorch fp32 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for t in row.timings:
            lat = t.latency
            speedup = "–" if t.speedup_vs_pytorch_fp32 is None else f"{t.speedup_vs_pytorch_fp32:.2f}x"
            lines.append(f"| {Path(row.artifact).name} | {row.batch} | {row.threads or 'board'} | {t.candidate} | "
                         f"{lat.median_ms:.3f} | {lat.p90_ms:.3f} | {lat.p99_ms:.3f} | {lat.min_ms:.3f} | "
                         f"{t.throughput_per_s:.1f} | {speedup} |")
    lines += ["", "| artifact | candidate | top-1 agreement vs PyTorch fp32 | max abs diff | min cosine |",
              "| --- | --- | --- | --- | --- |"]
    for row in rows:
        checked = [(t.candidate, t.vs_torch_fp32) for t in row.timings if t.vs_torch_fp32 is not None] or \
            [(row.timings[0].candidate if row.timings else "mixer-edge", row.vs_torch_fp32)]
        for name, a in checked:
            lines.append(f"| {Path(row.artifact).name} | {name} | {a.top1_agreement:.2%} | {a.max_abs_diff:.2e} | "
                         f"{a.min_cosine:.6f} |")
    return "\n".join(lines + peer_ratios(rows) + int8_ratios(rows) + left_out_notes(rows))


def peer_ratios(rows: list[BenchRow]) -> list[str]:
    """mixer-edge against the fastest other engine of the same precision timed beside it, per artifact."""
    lines = []
    for row in rows:
        mine, peer = row.timing("mixer-edge"), row.fastest_peer()
        if mine is None or peer is None:
            continue
        ratio = row.vs_fastest_peer()
        verdict = f"{ratio:.2f}x its speed" + (" (mixer-edge is slower)" if ratio < 1 else "")
        lines.append(f"{Path(row.artifact).name} (batch {row.batch}, {row.precision}): mixer-edge "
                     f"{mine.latency.median_ms:.3f} ms against the fastest {row.precision} peer, {peer.candidate}, "
                     f"{peer.latency.median_ms:.3f} ms: {verdict}")
    return ["", *lines] if lines else []


def left_out_notes(rows: list[BenchRow]) -> list[str]:
    """The peers left out of any row, each named once."""
    notes = list(dict.fromkeys(note for row in rows for note in row.left_out))
    return ["", *(f"not timed: {note}" for note in notes)] if notes else []


def int8_ratios(rows: list[BenchRow]) -> list[str]:
    """Speed-up of int8 over float32 at each batch that has both, in mixer-edge and in each engine timed in both."""
    by_batch = {(row.batch, row.precision): row for row in rows}
    lines = []
    for (batch, precision), int8 in by_batch.items():
        fp32 = by_batch.get((batch, "float32"))
        if precision != "int8" or fp32 is None:
            continue
        mine_fp32, mine_int8 = (row.timing("mixer-edge").latency.median_ms for row in (fp32, int8))
        line = f"batch {batch}: mixer-edge int8 is {mine_fp32 / mine_int8:.2f}x the speed of mixer-edge float32"
        for engine in dict.fromkeys(t.engine for t in int8.timings if t.peer and t.precision == "int8"):
            same = [t for t in fp32.timings if t.engine == engine and t.precision == "float32"]
            if same:
                best = min(t.latency.median_ms for t in int8.timings if t.engine == engine and t.precision == "int8")
                line += f"; {engine} int8 {same[0].latency.median_ms / best:.2f}x {engine} float32"
        lines.append(line)
    return ["", *lines] if lines else []

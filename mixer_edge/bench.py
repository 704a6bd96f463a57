"""Latency of artifacts beside PyTorch eager and onnxruntime, measured in one process, interleaved.

Each round runs every candidate a few times in turn, so a noisy machine slows all of them alike;
the report gives medians over rounds and ratios to PyTorch eager float32 on the same device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MixerEdgeError, reason


@dataclass
class Candidate:
    name: str
    run: Callable[[], object]  # one inference, synchronised (returns when the result is ready)


def interleaved(candidates: list[Candidate], rounds: int = 20, inner: int = 5, warmup: int = 3) -> dict[str, dict]:
    """Per-inference latency of each candidate: every call of `rounds` x `inner` timed on its own."""
    for cand in candidates:
        for _ in range(warmup):
            cand.run()
    samples: dict[str, list[float]] = {c.name: [] for c in candidates}
    for _ in range(rounds):
        for cand in candidates:
            cand.run()  # untimed: wakes this engine's threads after the previous engine's turn
            for _ in range(inner):
                start = time.perf_counter()
                cand.run()
                samples[cand.name].append((time.perf_counter() - start) * 1e3)
    return {name: latency_stats(s) for name, s in samples.items()}


def latency_stats(ms: list[float]) -> dict:
    """Median, p90, p99 and min of per-call latencies in milliseconds."""
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "min_ms": float(min(ms)),
            "calls": len(ms)}


def artifact_candidate(name: str, model, x: np.ndarray) -> Candidate:
    """The artifact's `main` on an input already on its device (weights are resident too).

    A wgpu (Vulkan) artifact is timed as a whole call: input upload, all dispatches, logits read back.
    """
    if not hasattr(model, "_vm"):
        return Candidate(name, lambda: model(x))

    import tvm

    data = tvm.runtime.tensor(np.ascontiguousarray(x[: model.batch], np.float32), model.device)
    main, params, device = model._vm["main"], model._params, model.device

    def run():
        main(data, *params)
        device.sync()

    return Candidate(name, run)


def torch_candidates(torch_model, x: np.ndarray, device: str, compiled=None) -> list[Candidate]:
    """PyTorch eager in float32, and in float16 on a GPU, on the same input; `compiled` (from
    `compile_torch`) adds torch.compile in float32."""
    import copy

    import torch

    data = torch.from_numpy(x).to(device)

    def timed(model, data):
        def run():
            with torch.no_grad():
                model(data)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    cands = []
    for dtype in (torch.float32, torch.float16) if device == "cuda" else (torch.float32,):
        model = copy.deepcopy(torch_model).to(device=device, dtype=dtype).eval()
        cands.append(Candidate(f"pytorch eager {str(dtype).split('.')[1]}", timed(model, data.to(dtype))))
    if compiled is not None:
        cands.append(Candidate("torch.compile float32", timed(compiled, data)))
    return cands


def compile_torch(torch_model, x: np.ndarray, device: str = "cpu", progress=print):
    """torch.compile of the float32 model, compiled for `x`'s shape; None where it does not work here."""
    import copy

    import torch

    progress(f"torch.compile for input {tuple(x.shape)} (tens of seconds)")
    model = torch.compile(copy.deepcopy(torch_model).to(device).eval(), dynamic=False)
    try:
        with torch.no_grad():
            model(torch.from_numpy(x).to(device))
    except Exception as exc:  # no C++ compiler, an op Inductor lacks, ...: the baseline is then left out
        progress(f"torch.compile does not work here ({reason(exc)}); left out")
        return None
    return model


def use_threads(threads: int) -> None:
    """Give every candidate the same CPU thread count (call before TVM's runtime starts its pool)."""
    import os

    import torch

    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def onnxruntime_candidate(proto, x: np.ndarray, device: str, threads: int, label: str = "") -> Candidate | None:
    """onnxruntime on the same device, or None where it has no provider for it."""
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would slow the next candidate
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=[provider])
    feed = {sess.get_inputs()[0].name: x}
    return Candidate(f"onnxruntime {provider.removesuffix('ExecutionProvider')}{label}", lambda: sess.run(None, feed))


def agreement(got: np.ndarray, ref: np.ndarray) -> dict:
    """How far an artifact's logits are from the reference's: top-1 agreement, max |diff|, cosine."""
    return {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(got - ref).max()), "min_cosine": float(cosines(got, ref).min())}


def cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of logits with the reference's."""
    return (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)


def compare(source, artifacts: list[Path], rounds: int = 20, threads: int | None = None, qdq=None,
            torch_compile: bool = False, rpc=None, progress=print) -> list[dict]:
    """Time each artifact (they share one model) beside the baselines at its batch size, every candidate on
    `threads` CPU threads (default: the physical cores); check its outputs. int8 artifacts are timed
    beside onnxruntime running `qdq`, the QDQ ONNX they were compiled from; `torch_compile` adds
    torch.compile to the PyTorch baselines. With `rpc` (a compiler.tuning.RpcBoard) the artifacts run
    and are timed on a board from that tracker instead, without baselines (they do not run there)."""
    from . import runtime
    from .artifact import reference_logits

    if rpc is not None:
        return [remote_row(source, path, rpc, rounds, progress) for path in artifacts]

    threads = threads or runtime.physical_cores()
    use_threads(threads)
    rows = []
    compiled = {}
    for path in artifacts:
        model = runtime.load(path)
        x = timing_input(source, model.input_shape)
        device = "cuda" if model.manifest["target"]["device"]["kind"] == "cuda" else "cpu"
        reference = reference_logits(source.torch_model, source.onnx_model, x)
        precision = model.manifest["precision"]["compute"]
        mine = f"mixer-edge {precision}"
        if torch_compile and (x.shape, device) not in compiled:
            compiled[x.shape, device] = compile_torch(source.torch_model, x, device, progress)
        cands = [artifact_candidate(mine, model, x),
                 *torch_candidates(source.torch_model, x, device, compiled.get((x.shape, device)))]
        onnx_batch = source.input.shape[0]
        proto, label = (qdq, " int8 (QDQ)") if precision == "int8" else (source.onnx_model, "")
        ort = onnxruntime_candidate(proto, x, device, threads, label) \
            if proto is not None and (isinstance(onnx_batch, str) or onnx_batch == model.batch) else None
        cands += [ort] if ort else []
        progress(f"timing {path.name}: {', '.join(c.name for c in cands)} ({rounds} interleaved rounds)")
        times = interleaved(cands, rounds=rounds)
        base = times["pytorch eager float32"]["median_ms"]
        rows.append({"artifact": str(path), "batch": model.batch, "precision": precision, "device": device,
                     "threads": threads,
                     "vs_torch_fp32": agreement(model(x), reference),
                     "latency": {name: {**t, "throughput_per_s": model.batch * 1e3 / t["median_ms"],
                                        "speedup_vs_pytorch_fp32": base / t["median_ms"]}
                                 for name, t in times.items()}})
    return rows


def timing_input(source, shape) -> np.ndarray:
    """One batch to time on: the first of the model's evaluation data (int8 ranges were calibrated on data
    like it), else random-normal."""
    if source.eval_data:
        from .data import load_inputs

        real = load_inputs(source.eval_data, source.preprocess)[0]
        if len(real) >= shape[0]:
            return real[:shape[0]]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def remote_row(source, path: Path, rpc, rounds: int, progress=print) -> dict:
    """compare()'s row for an artifact run on a board over RPC: its latency there, its outputs against torch."""
    from . import runtime
    from .artifact import reference_logits

    with runtime.artifact_dir(path) as root:
        manifest = runtime.read_manifest(root)
    shape = manifest["input"]["shape"]
    x = timing_input(source, shape)
    progress(f"timing {Path(path).name} on a '{rpc.key}' board from the tracker {rpc.host}:{rpc.port}")
    measured = remote(path, rpc, x, rounds)
    reference = reference_logits(source.torch_model, source.onnx_model, x)
    precision = manifest["precision"]["compute"]
    latency = {**measured["latency"], "throughput_per_s": shape[0] * 1e3 / measured["latency"]["median_ms"]}
    return {"artifact": str(path), "batch": shape[0], "precision": precision, "device": f"rpc:{rpc.key}",
            "threads": None, "vs_torch_fp32": agreement(measured["logits"], reference),
            "latency": {f"mixer-edge {precision} on {rpc.key}": latency}}


def format_rows(rows: list[dict]) -> str:
    lines = ["| artifact | batch | threads | candidate | median ms | p90 ms | p99 ms | min ms | inferences/s | "
             "speed-up vs PyTorch fp32 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for name, t in row["latency"].items():
            speedup = f"{t['speedup_vs_pytorch_fp32']:.2f}x" if "speedup_vs_pytorch_fp32" in t else "–"
            lines.append(f"| {Path(row['artifact']).name} | {row['batch']} | {row['threads'] or 'board'} | {name} | "
                         f"{t['median_ms']:.3f} | {t['p90_ms']:.3f} | {t['p99_ms']:.3f} | {t['min_ms']:.3f} | "
                         f"{t['throughput_per_s']:.1f} | {speedup} |")
    lines += ["", "| artifact | top-1 agreement vs PyTorch fp32 | max abs diff | min cosine |", "| --- | --- | --- | --- |"]
    for row in rows:
        a = row["vs_torch_fp32"]
        lines.append(f"| {Path(row['artifact']).name} | {a['top1_agreement']:.2%} | {a['max_abs_diff']:.2e} | "
                     f"{a['min_cosine']:.6f} |")
    return "\n".join(lines + int8_ratios(rows))


def int8_ratios(rows: list[dict]) -> list[str]:
    """Speed-up of int8 over float32 at each batch that has both: mixer-edge's, and onnxruntime's (QDQ)."""
    latency = {(row["batch"], row["precision"]): row["latency"] for row in rows}
    lines = []
    for (batch, precision), int8 in latency.items():
        fp32 = latency.get((batch, "float32"))
        if precision != "int8" or fp32 is None:
            continue
        ort = {p: next((t["median_ms"] for n, t in lat.items() if n.startswith("onnxruntime")), None)
               for p, lat in (("float32", fp32), ("int8", int8))}
        mine = fp32["mixer-edge float32"]["median_ms"] / int8["mixer-edge int8"]["median_ms"]
        line = f"batch {batch}: mixer-edge int8 is {mine:.2f}x the speed of mixer-edge float32"
        if None not in ort.values():
            line += (f"; onnxruntime QDQ int8 {ort['float32'] / ort['int8']:.2f}x onnxruntime float32; "
                     f"mixer-edge int8 {ort['int8'] / int8['mixer-edge int8']['median_ms']:.2f}x onnxruntime int8")
        lines.append(line)
    return ["", *lines] if lines else []


def remote(path: Path, rpc, x: np.ndarray, rounds: int = 20, inner: int = 5) -> dict:
    """Run and time artifact `path` on a board taken from a TVM RPC tracker (`rpc`: compiler.tuning.RpcBoard).

    The artifact's hashes are checked here; its library is uploaded, loaded by the board's TVM runtime
    and timed there by TVM's time_evaluator (`rounds` repeats, each the mean of `inner` calls).
    Returns {"logits", "latency"} for the first batch of `x`.
    """
    import tvm
    from tvm import rpc as tvm_rpc
    from tvm.runtime.vm import VirtualMachine

    from . import runtime

    with runtime.artifact_dir(path) as root:
        manifest = runtime.read_manifest(root)
        if runtime.LIBRARY not in manifest["files"]:
            raise MixerEdgeError(f"{path} is a wgpu (Vulkan) artifact: time it on the device with mixer-edge bench there")
        try:
            board = tvm_rpc.connect_tracker(rpc.host, rpc.port).request(rpc.key, session_timeout=600)
        except Exception as exc:
            raise MixerEdgeError(f"no board under key '{rpc.key}' at the tracker {rpc.host}:{rpc.port} "
                                 f"({reason(exc, last=True)}): start one with python -m mixer_edge.rpc_server") from exc
        board.upload(str(root / runtime.LIBRARY))
        weights = runtime.read_params(root, manifest)
    device = board.cuda(0) if manifest["target"]["device"]["kind"] == "cuda" else board.cpu(0)
    vm = VirtualMachine(board.load_module(runtime.LIBRARY), device)
    params = [tvm.runtime.tensor(w, device) for w in weights]
    batch = manifest["input"]["shape"][0]
    data = tvm.runtime.tensor(np.ascontiguousarray(x[:batch], np.float32), device)
    logits = vm["main"](data, *params).numpy()
    result = vm.time_evaluator("main", device, number=inner, repeat=rounds)(data, *params)
    return {"logits": logits, "latency": {**latency_stats([t * 1e3 for t in result.results]), "calls": rounds * inner,
                                          "per": f"mean of {inner} calls"}}

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


@dataclass
class Candidate:
    name: str
    run: Callable[[], object]  # one inference, synchronised (returns when the result is ready)


def interleaved(candidates: list[Candidate], rounds: int = 20, inner: int = 5, warmup: int = 3) -> dict[str, dict]:
    """Per-inference latency in ms of each candidate: median, p90 and min over rounds."""
    for cand in candidates:
        for _ in range(warmup):
            cand.run()
    samples: dict[str, list[float]] = {c.name: [] for c in candidates}
    for _ in range(rounds):
        for cand in candidates:
            start = time.perf_counter()
            for _ in range(inner):
                cand.run()
            samples[cand.name].append((time.perf_counter() - start) / inner * 1e3)
    return {name: {"median_ms": float(np.median(s)), "p90_ms": float(np.percentile(s, 90)), "min_ms": float(min(s))}
            for name, s in samples.items()}


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


def torch_candidates(torch_model, x: np.ndarray, device: str) -> list[Candidate]:
    """PyTorch eager in float32, and in float16 on a GPU, on the same input."""
    import copy

    import torch

    cands = []
    for dtype in (torch.float32, torch.float16) if device == "cuda" else (torch.float32,):
        model = copy.deepcopy(torch_model).to(device=device, dtype=dtype).eval()
        data = torch.from_numpy(x).to(device=device, dtype=dtype)

        def run(model=model, data=data):
            with torch.no_grad():
                model(data)
            if device == "cuda":
                torch.cuda.synchronize()

        cands.append(Candidate(f"pytorch eager {str(dtype).split('.')[1]}", run))
    return cands


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
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=[provider])
    feed = {sess.get_inputs()[0].name: x}
    return Candidate(f"onnxruntime {provider.removesuffix('ExecutionProvider')}{label}", lambda: sess.run(None, feed))


def agreement(got: np.ndarray, ref: np.ndarray) -> dict:
    """How far an artifact's logits are from the reference's: top-1 agreement, max |diff|, cosine."""
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(got - ref).max()), "min_cosine": float(cos.min())}


def compare(source, artifacts: list[Path], rounds: int = 20, threads: int | None = None, qdq=None,
            progress=print) -> list[dict]:
    """Time each artifact (they share one model) beside the baselines at its batch size, every candidate on
    `threads` CPU threads (default: the physical cores); check its outputs. int8 artifacts are timed
    beside onnxruntime running `qdq`, the QDQ ONNX they were compiled from."""
    import torch

    from . import runtime

    threads = threads or runtime.physical_cores()
    use_threads(threads)
    rows = []
    rng = np.random.default_rng(0)
    if source.eval_data:  # real inputs: int8 ranges were calibrated on data like them
        from .data import load_inputs

        real = load_inputs(source.eval_data, source.preprocess)[0]
    for path in artifacts:
        model = runtime.load(path)
        x = real[:model.batch] if source.eval_data and len(real) >= model.batch else \
            rng.standard_normal(model.input_shape).astype(np.float32)
        device = "cuda" if model.manifest["target"]["device"]["kind"] == "cuda" else "cpu"
        with torch.no_grad():
            reference = source.torch_model(torch.from_numpy(x)).numpy()
        precision = model.manifest["precision"]["compute"]
        mine = f"mixer-edge {precision}"
        cands = [artifact_candidate(mine, model, x), *torch_candidates(source.torch_model, x, device)]
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
                     "latency": {name: {**t, "speedup_vs_pytorch_fp32": base / t["median_ms"]} for name, t in times.items()}})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| artifact | batch | threads | candidate | median ms | p90 ms | speed-up vs PyTorch fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for name, t in row["latency"].items():
            lines.append(f"| {Path(row['artifact']).name} | {row['batch']} | {row['threads']} | {name} | "
                         f"{t['median_ms']:.3f} | {t['p90_ms']:.3f} | {t['speedup_vs_pytorch_fp32']:.2f}x |")
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

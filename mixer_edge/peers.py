"""The strongest peers a deployment tool is chosen against, timed beside mixer-edge in `bench` and `report`.

Each is optional (`pip install 'mixer-edge[peers]'`, versions pinned in constraints.txt), runs on this machine's
CPU with the bench's thread count, on the same input and in the same interleaved rounds as every other
candidate, and is checked against PyTorch like them:

- OpenVINO (CPU plugin): the float ONNX in float32 (`INFERENCE_PRECISION_HINT` f32: on CPUs with AMX or
  AVX512-BF16 its default would run bfloat16), and mixer-edge's own QDQ ONNX in int8 (OpenVINO runs QDQ
  models as int8 itself).
- onnxruntime's own int8: `quantize_static` as its documentation recommends for x86 CPUs: the model
  pre-processed (`quant_pre_process`), QOperator format, uint8 activations and int8 weights (U8S8), weights
  per channel, `reduce_range` on CPUs without VNNI (7-bit weights avoid the U8S8 saturation there), MinMax
  ranges from the same calibration inputs mixer-edge used. (onnxruntime running mixer-edge's S8S8 QDQ model,
  the `onnxruntime` baseline, is its slowest int8 configuration.)
- ExecuTorch with its XNNPACK delegate (the ARM deployment path from PyTorch; XNNPACK runs on x86 too):
  float32, and int8 from its PT2E `XNNPACKQuantizer` (symmetric, per-channel weights) calibrated on the same
  inputs.

Beside a CUDA artifact (its baselines run on the GPU; PyTorch eager float16 is a baseline there already):

- torch.compile with `mode="max-autotune"` in float16 (Inductor's Triton autotuning), beside float16 artifacts.
- TensorRT (`pip install tensorrt` on the GPU machine; not needed anywhere else): an engine built with its
  Builder and ONNX parser for the artifact's input shape, run with `execute_async_v3` on torch CUDA buffers
  (input put on the GPU once, like every GPU candidate): from the float ONNX with the FP16 flag beside float16
  artifacts, and from mixer-edge's QDQ ONNX with the INT8 and FP16 flags beside int8 artifacts (explicit
  quantization: TensorRT takes the scales from the Q/DQ nodes, so it runs the same int8 model). TensorRT 11 has
  no precision flags (strongly typed networks): there the int8 engine is built from the QDQ ONNX as it is and
  the float16 one is left out, saying so.

A peer that is not installed is named once and left out; one that fails on a model says why in one line and
is left out. Nothing here stops a bench.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import reason

INSTALL = "pip install 'mixer-edge[peers]'"
OPENVINO, ORT_INT8, EXECUTORCH = "openvino", "onnxruntime quantize_static", "executorch xnnpack"  # engine names
TORCH_MAX_AUTOTUNE, TENSORRT = "torch.compile max-autotune", "tensorrt"  # the GPU peers' engine names
ORT_INT8_VARIANT = "int8 (QOperator U8S8 per-channel)"
VNNI = {"avx512_vnni", "avx_vnni"}  # x86 int8 dot products (Linux cpuinfo flags): U8S8 needs no reduce_range
MODULES = {OPENVINO: "openvino", EXECUTORCH: "executorch", TORCH_MAX_AUTOTUNE: "torch",
           TENSORRT: "tensorrt"}  # the module each optional peer needs
INSTALLS = {"tensorrt": "pip install tensorrt (on the GPU machine)"}  # modules outside the peers extra
GPU_PEERS = {"float16": (TORCH_MAX_AUTOTUNE, TENSORRT), "int8": (TENSORRT,)}  # beside a CUDA artifact of each precision


def unavailable(module: str) -> str | None:
    """Why `module` cannot be imported here (None: it can)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install failing on import
        return f"{module} not installed: {INSTALLS.get(module, INSTALL)}" if isinstance(exc, ImportError) else \
            f"{module} does not import ({reason(exc)})"
    return None


@dataclass(frozen=True)
class Peer:
    """One peer engine ready to run: `infer` gives the logits of one batch of the shape it was built for; `timer`
    (GPU peers) gives one synchronised call on a batch it has put on the device once."""

    engine: str  # openvino, onnxruntime quantize_static, executorch xnnpack, torch.compile max-autotune, tensorrt
    variant: str  # float32, int8 (QDQ), ...
    precision: str
    infer: Callable[[np.ndarray], np.ndarray]
    timer: Callable[[np.ndarray], Callable[[], object]] | None = None

    @property
    def name(self) -> str:
        return f"{self.engine} {self.variant}"

    def candidate(self, x: np.ndarray):
        from .bench import Candidate

        run = self.timer(x) if self.timer is not None else lambda: self.infer(x)
        return Candidate(self.name, run, self.engine, self.precision, output=lambda: self.infer(x))


class Peers:
    """The peers of one bench or report run on `threads` CPU threads: each built once per model, precision and
    input shape. Every "left out" message is said once through `progress` and kept in `left_out`; `last_left_out`
    holds those of the latest float32() or int8() call."""

    def __init__(self, threads: int, calib: np.ndarray | None = None, progress=print,
                 engines: tuple[str, ...] = (OPENVINO, ORT_INT8, EXECUTORCH, TORCH_MAX_AUTOTUNE, TENSORRT)):
        self.threads, self.calib, self.progress, self.engines = threads, calib, progress, engines
        self.left_out: list[str] = []
        self.last_left_out: list[str] = []
        self._cache: dict = {}

    def _leave_out(self, message: str) -> None:
        if message not in self.last_left_out:
            self.last_left_out.append(message)
        if message not in self.left_out:
            self.left_out.append(message)
            self.progress(message)

    def _built(self, key, build: Callable[[], Peer], name: str) -> Peer | None:
        """build() once per `key`; a failure is said once, cached, and None."""
        if key not in self._cache:
            try:
                self._cache[key] = build()
            except Exception as exc:  # a peer that cannot run this model is left out, never the bench
                self._cache[key] = f"{name} left out: fails on this model ({reason(exc)})"
        built = self._cache[key]
        if isinstance(built, str):
            self._leave_out(built)
            return None
        return built

    def _installed(self, engine: str) -> bool:
        if engine not in self.engines:
            return False
        why = unavailable(MODULES[engine])
        if why:
            self._leave_out(f"{engine} left out: {why}")
        return why is None

    def _openvino(self, proto, shape: tuple[int, ...], precision: str) -> list[Peer | None]:
        """OpenVINO's latency mode on the batch; beside a batch of more than one image, its throughput mode too
        (one image per request: where the ONNX's batch is symbolic, as `bench --batch 1,8` exports it)."""
        from .export import input_spec

        modes = [False]
        if shape[0] > 1 and isinstance(input_spec(proto).shape[0], int):
            self._leave_out(f"{OPENVINO} {precision} throughput mode left out: the ONNX has a fixed batch (bench "
                            "more than one batch size, e.g. --batch 1,8, for an ONNX with a symbolic one)")
        elif shape[0] > 1:
            modes.append(True)
        return [self._built((OPENVINO, id(proto), shape, throughput),
                            lambda: openvino_peer(proto, shape, self.threads, precision, throughput),
                            f"{OPENVINO} {precision}" + (" throughput mode" if throughput else ""))
                for throughput in modes]

    def beside(self, source, qdq, shape: tuple[int, ...], device: str, precision: str,
               onnx_ok: bool = True) -> list[Peer]:
        """The peers of an artifact of `precision` whose baselines run on `device` (cpu or cuda)."""
        if device == "cuda":
            return self.cuda(source, qdq, shape, precision, onnx_ok)
        if precision in ("float32", "int8"):
            return self.float32(source, shape, onnx_ok) if precision == "float32" else \
                self.int8(source, qdq, shape, onnx_ok)
        self.last_left_out = []
        return []

    def cuda(self, source, qdq, shape: tuple[int, ...], precision: str, onnx_ok: bool = True) -> list[Peer]:
        """Beside a CUDA artifact (GPU_PEERS): torch.compile max-autotune float16; TensorRT on the float ONNX
        (float16) or on the QDQ ONNX `qdq` (int8), where its batch fits `shape` (`onnx_ok`)."""
        self.last_left_out, peers = [], []
        proto = qdq if precision == "int8" else source.onnx_model
        builds = {TORCH_MAX_AUTOTUNE: (source.torch_model is not None, lambda: torch_compile_peer(
                      source.torch_model, shape), id(source.torch_model)),
                  TENSORRT: (onnx_ok and proto is not None, lambda: tensorrt_peer(proto, shape, precision), id(proto))}
        for engine in GPU_PEERS.get(precision, ()):
            ok, build, of = builds[engine]
            if ok and self._installed(engine):
                peers.append(self._built((engine, precision, of, shape), build, f"{engine} {precision}"))
        return [p for p in peers if p is not None]

    def float32(self, source, shape: tuple[int, ...], onnx_ok: bool = True) -> list[Peer]:
        """OpenVINO on the float ONNX (where its batch fits `shape`: `onnx_ok`), ExecuTorch XNNPACK float32."""
        self.last_left_out, peers = [], []
        if onnx_ok and self._installed(OPENVINO):
            peers += self._openvino(source.onnx_model, shape, "float32")
        if source.torch_model is not None and self._installed(EXECUTORCH):
            peers.append(self._built((EXECUTORCH, "float32", id(source.torch_model), shape),
                                     lambda: executorch_peer(source.torch_model, shape, self.threads, None,
                                                             self.progress), f"{EXECUTORCH} float32"))
        return [p for p in peers if p is not None]

    def int8(self, source, qdq, shape: tuple[int, ...], onnx_ok: bool = True) -> list[Peer]:
        """OpenVINO on mixer-edge's QDQ ONNX `qdq`, onnxruntime's own quantize_static model, ExecuTorch XNNPACK int8
        (the last two need the calibration inputs)."""
        self.last_left_out, peers = [], []
        if onnx_ok and qdq is not None and self._installed(OPENVINO):
            peers += self._openvino(qdq, shape, "int8")
        if self.calib is None and (ORT_INT8 in self.engines or EXECUTORCH in self.engines):
            self._leave_out(f"{ORT_INT8} and {EXECUTORCH} int8 left out: no calibration inputs "
                            "(a QDQ ONNX given as it is)")
        if self.calib is None:
            return [p for p in peers if p is not None]
        if onnx_ok and ORT_INT8 in self.engines:
            proto = self._built((ORT_INT8, "model", id(source.onnx_model)), lambda: ort_quantize(
                source.onnx_model, self.calib, self.progress), ORT_INT8)
            if proto is not None:
                peers.append(self._built((ORT_INT8, id(source.onnx_model), shape),
                                         lambda: ort_int8_peer(proto, self.threads), ORT_INT8))
        if source.torch_model is not None and self._installed(EXECUTORCH):
            peers.append(self._built((EXECUTORCH, "int8", id(source.torch_model), shape),
                                     lambda: executorch_peer(source.torch_model, shape, self.threads, self.calib,
                                                             self.progress), f"{EXECUTORCH} int8"))
        return [p for p in peers if p is not None]


def calibration_inputs(source, quantization, progress=print) -> np.ndarray | None:
    """The inputs mixer-edge calibrated `quantization` on (a quant.Quantization), drawn again the same way; None
    where it was not calibrated here (a QDQ ONNX compiled as it is)."""
    from .quant import calibration_data

    summary = quantization.summary if quantization is not None else {}
    recipe = summary.get("recipe")
    if "calibration_data" not in summary or not isinstance(recipe, dict):
        return None
    return calibration_data(summary["calibration_data"], source.preprocess, summary["samples"],
                            recipe.get("seed", 0), progress=lambda *_: None)


# ---- OpenVINO -------------------------------------------------------------------------------------------------

def openvino_peer(proto, shape: tuple[int, ...], threads: int, precision: str, throughput: bool = False) -> Peer:
    """OpenVINO's CPU plugin compiling `proto` (float32 ONNX, or a QDQ ONNX it runs in int8) for `shape`; with
    `throughput`, its throughput mode instead: the batch's images one each through as many parallel requests
    (streams) as OpenVINO picks for `threads` threads, a call done when the whole batch is."""
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        model = core.read_model(str(path))
    model.reshape([1, *shape[1:]] if throughput else list(shape))  # static, like every other candidate
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",  # non-int8 parts in f32 (not bf16)
        **({"PERFORMANCE_HINT": "THROUGHPUT"} if throughput else {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})})
    variant = ("CPU float32" if precision == "float32" else "CPU int8 (QDQ)") + (", throughput mode" if throughput
                                                                                 else "")
    if not throughput:
        request = compiled.create_infer_request()

        def infer(x: np.ndarray) -> np.ndarray:
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return Peer(OPENVINO, variant, precision, infer)

    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    logits: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: logits.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def infer_each(x: np.ndarray) -> np.ndarray:
        logits.clear()
        for i in range(len(x)):
            queue.start_async({0: x[i:i + 1]}, i)
        queue.wait_all()
        return np.concatenate([logits[i] for i in range(len(x))])

    return Peer(OPENVINO, variant, precision, infer_each)


# ---- onnxruntime's own static quantization --------------------------------------------------------------------

def ort_quantize(proto, calib: np.ndarray, progress=print):
    """`proto` quantized by onnxruntime's `quantize_static` as its documentation recommends for x86 CPUs (see the
    module's docstring), MinMax ranges from `calib`."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    from .export import input_spec
    from .runtime import machine_cpu_features

    spec = input_spec(proto)
    step = spec.shape[0] if isinstance(spec.shape[0], int) else 1
    chunks = [calib[i:i + step] for i in range(0, len(calib) - step + 1, step)] or [calib[:step]]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(chunks)

        def get_next(self):
            chunk = next(self.it, None)
            return None if chunk is None else {spec.name: np.ascontiguousarray(chunk)}

    progress(f"onnxruntime quantize_static: QOperator U8S8 per-channel on {len(calib)} calibration inputs")
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / name for name in ("float.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(proto.SerializeToString())
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as exc:  # the recommended step; quantizing without it still works
            progress(f"onnxruntime quant_pre_process failed ({reason(exc)}); quantizing the model as exported")
            pre = src
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=not VNNI & machine_cpu_features(), calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(out))


def ort_int8_peer(proto, threads: int) -> Peer:
    from .bench import onnxruntime_session

    sess = onnxruntime_session(proto, threads)
    name = sess.get_inputs()[0].name
    return Peer(ORT_INT8, ORT_INT8_VARIANT, "int8", lambda x: sess.run(None, {name: x})[0])


# ---- ExecuTorch / XNNPACK ------------------------------------------------------------------------------------

def executorch_peer(torch_model, shape: tuple[int, ...], threads: int, calib: np.ndarray | None,
                    progress=print) -> Peer:
    """`torch_model` exported for `shape` and lowered to ExecuTorch's XNNPACK delegate: float32, or int8 with the
    PT2E XNNPACKQuantizer (symmetric, per-channel) calibrated on `calib` when given."""
    import copy

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    precision = "float32" if calib is None else "int8"
    progress(f"executorch: lowering the {precision} model to XNNPACK for input {shape}")
    model = copy.deepcopy(torch_model).float().eval()
    example = (torch.zeros(shape),)
    if calib is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                              get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        try:  # calibrated 64 inputs a call (its histogram observers are slow per call), exported once more below
            dim = torch.export.Dim("batch", min=1, max=max(2, len(calib)))
            graph = torch.export.export(model, (torch.zeros((2, *shape[1:])),), dynamic_shapes=({0: dim},))
            chunks = [calib[i:i + 64] for i in range(0, len(calib), 64)]
        except Exception:  # a model that exports for one batch size only: whole batches of it
            graph, batch = torch.export.export(model, example), shape[0]
            chunks = [calib[i:i + batch] for i in range(0, len(calib) - batch + 1, batch)] or \
                [np.resize(calib, (batch, *calib.shape[1:]))]
        prepared = prepare_pt2e(graph.module(), quantizer)
        with torch.no_grad():
            for chunk in chunks:
                prepared(torch.from_numpy(np.ascontiguousarray(chunk)))
        model = convert_pt2e(prepared)
    program = to_edge_transform_and_lower(torch.export.export(model, example),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    _unsafe_reset_threadpool(threads)  # ExecuTorch's one thread pool, shared by every method
    method = Runtime.get().load_program(program.buffer).load_method("forward")

    def infer(x: np.ndarray, _keep=program) -> np.ndarray:  # _keep: the program's buffer outlives the method
        return method.execute([torch.from_numpy(x)])[0].numpy().copy()

    return Peer(EXECUTORCH, "float32" if calib is None else "int8 (PT2E)", precision, infer)


# ---- GPU: torch.compile max-autotune, TensorRT ---------------------------------------------------------------

def torch_compile_peer(torch_model, shape: tuple[int, ...]) -> Peer:
    """torch.compile(mode="max-autotune") of `torch_model` in float16 on the GPU, compiled for `shape`."""
    from .bench import torch_compiled, torch_runner

    model = torch_compiled(torch_model, np.zeros(shape, np.float32), "cuda", "float16", "max-autotune")

    def timer(x: np.ndarray):
        return torch_runner(model, x, "cuda", "float16")

    return Peer(TORCH_MAX_AUTOTUNE, "float16", "float16", lambda x: timer(x)().float().cpu().numpy(), timer)


def tensorrt_peer(proto, shape: tuple[int, ...], precision: str) -> Peer:
    """A TensorRT engine of `proto` for `shape`: float16 from the float ONNX, int8 from a QDQ ONNX (explicit
    quantization; the layers left float may run in float16), run through torch CUDA buffers."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode since TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(proto.SerializeToString()):
        raise RuntimeError("ONNX parser: " + "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    weak = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 10; 11 builds strongly typed networks only
    if not weak and precision == "float16":
        raise RuntimeError(f"TensorRT {trt.__version__} has no FP16 flag (strongly typed networks only): "
                           "pip install 'tensorrt>=10,<11' for its float16 engine")
    if weak:
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    name = network.get_input(0).name
    if any(d < 0 for d in network.get_input(0).shape):  # a dynamic batch: one profile, the artifact's shape
        profile = builder.create_optimization_profile()
        profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("the TensorRT builder made no engine")
    trt_runtime = trt.Runtime(logger)
    engine = trt_runtime.deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    context.set_input_shape(name, shape)
    out_name = next(n for n in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
                    if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    data = torch.empty(shape, dtype=torch.float32, device="cuda")
    out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(name, data.data_ptr())
    context.set_tensor_address(out_name, out.data_ptr())

    def run(_keep=(logger, trt_runtime, engine)):  # _keep: they outlive the context
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed")
        torch.cuda.synchronize()
        return out

    def timer(x: np.ndarray):
        data.copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return run

    variant = "float16" if precision == "float16" else "int8 (QDQ)"
    return Peer(TENSORRT, variant, precision, lambda x: timer(x)().cpu().numpy().copy(), timer)

"""`mixer-edge`: a thin command line over the library. Each command parses, calls, prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import options
from .atomic import REPORT, TUNING_DB, atomic_file, check_destination
from .errors import MixerEdgeError, reason
from .formats import json_text, safe_text


def say(message: str) -> None:
    print(f"[mixer-edge] {message}", file=sys.stderr, flush=True)


NO_PEERS = ("leave out the peers: on the CPU OpenVINO, onnxruntime's own int8 and ExecuTorch/XNNPACK (pip install "
            "'mixer-edge[peers]'); beside CUDA artifacts torch.compile max-autotune and TensorRT")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the bundled digits Mixer)")
    g.add_argument("--model", help="a preset name (mixer_s16, mixer_digits, ...) or a Mixer .onnx file")
    g.add_argument("--checkpoint", help="weights for the preset: timm .pth/.safetensors or official Flax .npz")
    g.add_argument("--num-classes", type=options.integer(1, options.MAX_CLASSES),
                   help="classifier size, when the checkpoint's differs from the preset's")
    g.add_argument("--batch", type=options.batches, default=[1],
                   help="static batch size; compile takes several (1,8,64), one artifact each")
    g = p.add_argument_group("preprocessing (default: the checkpoint's or the preset's; else mean 0.5, std 0.5, "
                             "bilinear, no crop, assumed and said so)")
    g.add_argument("--preprocessing", metavar="FILE", help="a .toml or .json with the fields below (size, mean, std, "
                   "interpolation, crop_pct); the options override it")
    g.add_argument("--size", type=options.preprocessing("size", "HEIGHT,WIDTH or one side in pixels"), metavar="H,W",
                   help="the model input's size (a check: it must be the model's)")
    g.add_argument("--mean", type=options.preprocessing("mean", "comma-separated numbers, one per channel"),
                   metavar="M,...",
                   help="per-channel mean of [0, 1] pixels, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=options.preprocessing("std", "comma-separated numbers > 0, one per channel"),
                   metavar="S,...",
                   help="per-channel std of [0, 1] pixels, e.g. 0.229,0.224,0.225")
    filters = "nearest, box, bilinear, hamming, bicubic, lanczos"  # data.RESAMPLE
    g.add_argument("--interpolation", type=options.preprocessing("interpolation", filters), metavar="NAME",
                   help="resize filter: " + filters)
    g.add_argument("--crop-pct", type=options.preprocessing("crop_pct", "a fraction in (0, 1]"), metavar="FRACTION",
                   help="resize the shorter side to size / CROP_PCT, then cut size from the center (timm's "
                   "crop_pct, e.g. 0.875); 1: no crop")


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", type=options.targets,
                   help="preset name, host (the default), a .toml file or a JSON TVM target; repeat or "
                   "comma-separate for several")
    p.add_argument("--precision", type=options.precisions, help="float32; float16 (fp16 compute, fp32 accumulation) or int8 (integer "
                   "kernels, calibrated first) where the target has it; comma-separate for several (default: the "
                   "target's)")


def _calibration_args(p: argparse.ArgumentParser, int8_only: bool) -> None:
    g = p.add_argument_group("int8 calibration" + (" (with --precision int8)" if int8_only else ""))
    g.add_argument("--calibration", help="recipe: a name in calibration/ (default, minmax, entropy, mse) or a .toml")
    g.add_argument("--calib-data", help="calibration inputs: image folder, .npy/.npz, digits-train "
                   "(default for the demo model)")
    g.add_argument("--calib-samples", type=options.positive, help="how many samples to draw (default: the recipe's)")


def _calibration(args):
    """The int8 calibration the arguments ask for, or None."""
    from .quant import Calibration

    recipe = getattr(args, "calibration", None)  # report has none: its recipes come from --variants
    asked = (recipe, args.calib_data, args.calib_samples)
    return Calibration(*asked) if any(value is not None for value in asked) else None


def _tuning_args(p: argparse.ArgumentParser, compile_: bool) -> None:
    g = p.add_argument_group("tuning (MetaSchedule)")
    if compile_:
        g.add_argument("--tune", action="store_true", help="tune before building (resumes the database)")
    g.add_argument("--tuning-db", help="tuning database directory (default: this model/target/precision's own in "
                   "~/.cache/mixer-edge/tuning, else the one shipped with mixer-edge)")
    g.add_argument("--trials", type=options.positive, help="total measurement trials (default: the target's trials per task "
                   "times the number of tasks)")
    g.add_argument("--time-budget", type=options.duration, help="wall-clock limit such as 10m or 1h (default: the target's, 15m)")
    g.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on the boards registered there")
    g.add_argument("--rpc-key", help="the key the boards registered under (e.g. rpi5)")


def _rpc(args):
    """The boards --rpc-tracker/--rpc-key name, or None."""
    from .compiler.tuning import RpcBoard

    return RpcBoard.parse(args.rpc_tracker, args.rpc_key) if args.rpc_tracker or args.rpc_key else None


def _tuning(args, tune: bool, rpc=None):
    """The tuning the arguments ask for; `rpc`: the boards it measures on."""
    from .compiler.tuning import Budget, Tuning

    return Tuning(Path(args.tuning_db) if args.tuning_db else None, tune, Budget(args.trials, args.time_budget), rpc)


def _model(args):
    from .plan import ModelRequest

    return ModelRequest(args.model, args.checkpoint, args.num_classes, _preprocessing(args))


def _preprocessing(args):
    """What --preprocessing FILE and the options over it state, or None."""
    from .data import STATED, StatedPreprocessing

    given = {key: getattr(args, key) for key, _, _ in STATED if getattr(args, key) is not None}
    named = ", ".join(option for key, option, _ in STATED if key in given)
    flags = StatedPreprocessing(**given, source=named)
    return flags.over(StatedPreprocessing.read(args.preprocessing)) if args.preprocessing else \
        flags if given else None


def _targets(args, default: list[str]) -> tuple[str, ...]:
    """The target specs of every --target (each a parsed list), or `default`."""
    return tuple(spec for specs in args.target or [default] for spec in specs)


def _builds(args, tuning):
    """The builds --target, --precision, --batch and the int8 calibration options ask for (a plan.BuildRequest)."""
    from .plan import BuildRequest, Variant

    return BuildRequest(_targets(args, ["host"]),
                        tuple(Variant(precision) for precision in args.precision or [None]), tuple(args.batch),
                        _calibration(args), tuning)


INPUT_OPTIONS = ("model", "checkpoint", "preprocessing", "calibration", "calib_data", "val_data", "eval_data", "input",
                 "tuning_db", "target", "artifact", "databases")


def _inputs(args, *leave_out: str) -> list:
    """Every path the command reads (what names no file is skipped by the output checks): no output may be,
    hold or lie inside one of them (atomic.check_destination)."""
    def flat(value):
        return [x for v in value for x in flat(v)] if isinstance(value, (list, tuple)) else [value]

    return [v for name in INPUT_OPTIONS if name not in leave_out for v in flat(getattr(args, name, None))
            if isinstance(v, (str, Path))]


def cmd_targets(args) -> None:
    from .compiler.build import check_toolchain
    from .compiler.targets import list_presets

    rows = []
    for name, preset in list_presets().items():
        try:
            check_toolchain(preset)
            status = "ready"
        except MixerEdgeError as exc:
            status = f"unavailable: {exc}"
        rows.append((name, preset.kind, preset.description, status))
    width = max(len(r[0]) for r in rows)
    for name, kind, description, status in rows:
        print(f"{name:<{width}}  {kind:<6}  {description}\n{'':<{width}}          {status}")
    print("\n'host' picks the best x86 preset this machine runs; --target also takes a .toml path or a JSON TVM target.")


def cmd_export(args) -> None:
    from .plan import ExportRequest

    request = ExportRequest(_model(args), tuple(args.batch), args.dynamic_batch, not args.no_simplify)
    check_destination(args.output, inputs=_inputs(args))  # before the slow export
    report = request.write(args.output, progress=say)
    print(f"wrote {args.output}: opset {report['opset']}, max |onnxruntime - torch| = {report['max_abs_diff_vs_torch']:.2e}")


def cmd_compile(args) -> None:
    from .plan import build_all

    request = _builds(args, _tuning(args, args.tune, _rpc(args)))
    _, artifacts = build_all(request, _model(args), args.output, verify=not args.no_verify,
                             keep_unverified=args.keep_unverified, inputs=_inputs(args), progress=say)
    for artifact in artifacts:
        check = artifact.manifest.get("verification", {})
        status = check.get("status")
        detail = (f"top-1 agreement {check['top1_agreement']:.2%}, max |logit diff| {check['max_abs_logit_diff']:.1e}"
                  if status == "verified" else f"FAILED ({check['reason']}), kept by --keep-unverified"
                  if status == "failed" else "not run here (" + check.get("reason", "skipped") + ")")
        print(f"{artifact.path}: {artifact.build.preset.name} artifact; verification: {detail}")


def cmd_tune(args) -> None:
    from .compiler import tune_model

    request = _builds(args, _tuning(args, True, _rpc(args)))
    if len(request.builds) > 1:
        raise MixerEdgeError("tune takes one target, precision and batch: run it once for each")
    build = request.builds[0]
    if args.tuning_db:  # the database tune writes into (the cache's is checked where it is written)
        check_destination(args.tuning_db, TUNING_DB, inputs=_inputs(args, "tuning_db"))
    result = tune_model(_model(args).open(request.batches, progress=say), build.preset, build.batch,
                        build.variant.precision, request.tuning, request.calibration, progress=say)
    print(f"{result['path']}: {result['records']} records for {result['workloads']} workloads "
          f"({result['model']}, {build.preset.name}, {result['precision']}); later compiles apply it")


def cmd_tuning_db(args) -> None:
    from .compiler import tuning

    if args.action == "merge":
        result = tuning.merge([Path(d) for d in args.databases], Path(args.output), best_only=args.best_only)
        print(f"{result['path']}: {result['records']} records for {result['workloads']} workloads")
        return
    roots = [Path(d) for d in args.databases] or [tuning.cache_root(), tuning.shipped_root()]
    for root in roots:
        found = [p for p in sorted([root] if (root / tuning.KEY).exists() else root.glob("*/")) if (p / tuning.KEY).exists()]
        if not found and args.databases:
            raise MixerEdgeError(f"{root} holds no mixer-edge tuning database (no {tuning.KEY} in it or in its "
                                 "sub-directories): pass a directory `mixer-edge tune` wrote")
        for path in found:
            info = tuning.summary(path)
            print(f"{path}\n    {info.get('model', '?')}, {info['precision']}, {info['records']} records for "
                  f"{info['workloads']} workloads, target {info['target']}")


def cmd_calibrate(args) -> None:
    from .quant import calibrate, format_sensitivity, resolve_recipe

    recipe = resolve_recipe(args.calibration)  # before the slow export
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise MixerEdgeError(f"-o {out}: the QDQ model is written as an .onnx file (the table goes beside it)")
    table_path = out.with_suffix(".calibration.json")
    check_destination(out, inputs=_inputs(args))
    check_destination(table_path, inputs=_inputs(args))
    source = _model(args).open(tuple(args.batch), progress=say)
    qdq, table, summary = calibrate(source, recipe, args.calib_data, args.calib_samples, sensitivity=args.sensitivity,
                                    max_accuracy_drop=args.max_accuracy_drop, val_data=args.val_data, progress=say)
    with atomic_file(out, _inputs(args)) as tmp_onnx, atomic_file(table_path, _inputs(args)) as tmp_table:
        tmp_onnx.write_bytes(qdq.SerializeToString())
        tmp_table.write_text(json_text({"model": source.name, **summary, "tensors": table}))
    if "sensitivity" in summary:
        kept = summary.get("mixed_precision", {}).get("float_layers", [])
        print(format_sensitivity(summary["sensitivity"], kept))
    if "mixed_precision" in summary:
        m = summary["mixed_precision"]
        print(f"kept in float: {', '.join(m['float_layers']) or 'none'}; accuracy on {m['validation_data']} "
              f"{m['int8_accuracy']:.2%} vs float {m['float_accuracy']:.2%} (drop {m['drop_points']:.2f} points, "
              f"budget {m['max_accuracy_drop_points']}{'' if m['within_budget'] else ', NOT met with every layer float'})")
    print(f"wrote {out} (QDQ int8, runs in onnxruntime) and {table_path} ({len(table)} tensors)")
    if "evaluation" in summary:
        e = summary["evaluation"]
        print(f"onnxruntime on {e['data']} ({e['samples']} samples): float {e['float_accuracy']:.2%}, int8 "
              f"{e['int8_accuracy']:.2%}, top-1 agreement {e['top1_agreement']:.2%}, max |logit diff| "
              f"{e['max_abs_logit_diff']:.3f}")


def cmd_bench(args) -> None:
    from .bench import build_and_compare, format_rows

    board = _rpc(args)  # with --tune the build tunes on these boards; bench times on them either way
    request = _builds(args, _tuning(args, args.tune, board if args.tune else None))
    if args.json:
        check_destination(args.json, inputs=_inputs(args))  # before the builds and the timing
    rows = build_and_compare(request, _model(args), rounds=args.rounds, threads=args.threads,
                             torch_compile=not args.no_torch_compile, peers=not args.no_peers, board=board,
                             progress=say)
    print(format_rows(rows))
    if args.json:
        from .artifact import versions

        with atomic_file(args.json, _inputs(args)) as tmp_json:
            tmp_json.write_text(json_text({"versions": versions(), "rows": [row.to_json() for row in rows]}))


def cmd_report(args) -> None:
    from .plan import ReportRequest, Variant
    from .report import make_report, table

    variants = tuple(Variant.parse(v) for v in args.variants) if args.variants else None
    request = ReportRequest(_targets(args, ["host", "rpi5"]), variants, tuple(args.batch), _calibration(args),
                            _tuning(args, args.tune, _rpc(args)), args.eval_data, args.max_accuracy_drop, args.rounds,
                            args.threads, not args.no_torch_compile, not args.no_peers)
    check_destination(args.output, REPORT, inputs=_inputs(args))
    report = make_report(_model(args).open(request.batches, progress=say), request, args.output, progress=say)
    print("\n".join(table(report)))
    print(f"\n{args.output}/report.html: the table and the plot; report.json: every measurement")


def cmd_run(args) -> None:
    import numpy as np

    from . import runtime
    from .data import load_inputs

    if args.save:
        check_destination(args.save, inputs=_inputs(args))  # before the artifact runs
    if args.board:
        from . import emulator
        from .compiler.targets import resolve_target

        with runtime.artifact_dir(args.artifact) as root:
            record = runtime.verified_manifest(root)[1]
        x, y = load_inputs(args.input, record.preprocess.to_preprocess())
        cpu = resolve_target(args.board).emulator_cpu
        if not cpu:
            raise MixerEdgeError(f"--board {args.board} has no emulated CPU: use an ARM board preset such as rpi4 or rpi5")
        labels, predict = record.labels, lambda x: emulator.run_artifact(args.artifact, x, cpu)
    else:
        model = runtime.load(args.artifact)
        x, y = load_inputs(args.input, model.preprocess)
        labels, predict = model.labels, model
    if y is not None and y.max(initial=-1) >= len(labels):
        raise MixerEdgeError(f"{args.input} has label {y.max()}, but the model has {len(labels)} classes (0 to "
                             f"{len(labels) - 1}): pass data labelled for this model")
    logits = predict(x)
    labels = [safe_text(label, 80) for label in labels]  # from the artifact: printed, never interpreted
    top = np.argsort(-logits, axis=1)[:, : args.top]
    for i in range(min(len(x), args.show)):
        guesses = ", ".join(f"{labels[j]} ({logits[i, j]:.2f})" for j in top[i])
        truth = f"   label {labels[y[i]]}" if y is not None and y[i] >= 0 else ""
        print(f"#{i}: {guesses}{truth}")
    if y is not None and (y >= 0).all():
        print(f"top-1 accuracy on {args.input}: {(top[:, 0] == y).mean():.2%} ({len(y)} samples)")
    if args.save:
        with atomic_file(args.save, _inputs(args)) as tmp, open(tmp, "wb") as f:
            np.save(f, logits)


def cmd_inspect(args) -> None:
    from . import runtime

    with runtime.artifact_dir(args.artifact) as root:
        manifest, record = runtime.verified_manifest(root)  # as written, and as a validated runtime.Manifest
    print(json.dumps(manifest, indent=2) if args.json else "\n".join(runtime.describe(record, args.artifact)))


def cmd_package(args) -> None:
    from .bundle import package, read_bundle

    if args.threads is not None and args.bench is None:
        raise MixerEdgeError("--threads sets the threads --bench times with: add --bench N")
    if args.bench is not None and args.tar:
        raise MixerEdgeError("--bench times the bundle directory: leave out --tar (tar the directory afterwards)")
    path = package(args.artifact, args.output, say, arch=args.arch, tar=args.tar)
    bundle = read_bundle(path)
    print(f"wrote {path}: {bundle.arch}, {bundle.backend} backend, {len(bundle.files)} files, "
          f"{bundle.total_bytes / 1e6:.1f} MB")
    if args.bench is not None:
        from .bundle import compare_runtimes

        print("\n".join(_cost_table(compare_runtimes(path, args.bench, args.threads, progress=say))))


def _cost_table(costs) -> list[str]:
    """`mixer-edge package --bench`'s table of bundle.RuntimeCost rows, and the native/python ratios."""
    header = ("runtime", "open ms", "first inference ms", "median ms", "p90 ms", "peak RSS MiB",
              "spawn to first result ms")
    rows = [(c.runtime, f"{c.open_ms:.1f}", f"{c.first_inference_ms:.2f}", f"{c.median_ms:.3f}", f"{c.p90_ms:.3f}",
             f"{c.peak_rss_mib:.1f}", f"{c.start_to_first_result_ms:.0f}") for c in costs]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in (header, *rows)]
    by = {c.runtime: c for c in costs}
    native, python = by["native"], by["python"]
    ratios = ", ".join(f"{name} {getattr(native, field) / getattr(python, field):.2f}x" for name, field in
                       (("median", "median_ms"), ("peak RSS", "peak_rss_mib"),
                        ("spawn to first result", "start_to_first_result_ms")))
    return [lines[0], "-+-".join("-" * w for w in widths), *lines[1:], f"native/python: {ratios}"]


def cmd_train(args) -> None:
    from .train import save_checkpoint, train_digits

    check_destination(args.output)  # before the training
    result = train_digits(epochs=args.epochs, seed=args.seed)
    save_checkpoint(result, "mixer_digits", args.output)
    print(f"wrote {args.output}: mixer_digits, {args.epochs} epochs, test accuracy {result.test_accuracy:.2%}")


def _inside(args):
    """profile/compare: the artifact's manifest, the reference model (opened at the batch of the artifact's
    kernels: runtime.Manifest.kernel_batch) and inputs."""
    import numpy as np

    from . import runtime
    from .data import load_inputs

    with runtime.artifact_dir(args.artifact) as root:
        record = runtime.verified_manifest(root)[1]
    batch = record.input.shape[0]
    source = _model(args).open((record.kernel_batch,), progress=say)
    data = getattr(args, "data", None) or source.eval_data
    samples = max(getattr(args, "samples", None) or batch, batch)
    if data:
        x = load_inputs(data, record.preprocess.to_preprocess())[0]
        if len(x) < batch:
            raise MixerEdgeError(f"{data} has {len(x)} inputs, fewer than the artifact's batch {batch}")
        x = x[:samples]
    else:
        data = f"{samples} random inputs (seed 0)"
        x = np.random.default_rng(0).standard_normal((samples, *record.input.shape[1:])).astype(np.float32)
    return source, x, data


def cmd_profile(args) -> None:
    from .layers import format_profile, profile

    source, x, _ = _inside(args)
    result = profile(args.artifact, source, x, board=args.board, repeat=args.repeat, rpc=_rpc(args))
    print(result.model_dump_json(indent=1) if args.json else "\n".join(format_profile(result)))


def cmd_compare(args) -> None:
    from .layers import compare, format_comparison

    source, x, data = _inside(args)
    result = compare(args.artifact, source, x, board=args.board, data=data, rpc=_rpc(args))
    print(result.model_dump_json(indent=1) if args.json else "\n".join(format_comparison(result)))


def cmd_emulator(args) -> None:
    from . import emulator

    if args.action == "serve":
        from .compiler.targets import resolve_target
        from .compiler.tuning import RpcBoard

        rpc = RpcBoard.parse(args.tracker, args.key)
        cpu = resolve_target(args.board).emulator_cpu
        if not cpu:
            raise MixerEdgeError(f"--board {args.board} has no emulated CPU: use an ARM board preset such as rpi5")
        emulator.serve(cpu, rpc.host, rpc.port, rpc.key, root=args.dir, progress=say)
        return
    root = emulator.setup(args.dir, progress=say)
    print(root)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the same one-line form as every other refusal."""

    def error(self, message: str):
        self.exit(2, f"mixer-edge: error: {safe_text(' '.join(message.split()), 2000)}: see '{self.prog} --help'\n")


def _targets_parser(sub) -> None:
    p = sub.add_parser("targets", help="list the target presets and whether this machine can build them")
    p.set_defaults(func=cmd_targets)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (simplified, parity-checked against torch)")
    _model_args(p)
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--dynamic-batch", action="store_true", help="leave the batch dimension symbolic")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.set_defaults(func=cmd_export)


def _compile_parser(sub) -> None:
    p = sub.add_parser("compile", help="compile a model into a deployable artifact for one or more targets")
    _model_args(p)
    _build_args(p)
    p.add_argument("-o", "--output", help="artifact directory (or .tar); with several builds, their parent "
                   "(default artifacts/MODEL-TARGET[-fp16|-int8][-bBATCH])")
    p.add_argument("--no-verify", action="store_true", help="skip running the artifact against the reference")
    p.add_argument("--keep-unverified", action="store_true", help="write the artifact even when it fails its "
                   "verification, marked failed in its manifest (for a bug report)")
    _calibration_args(p, int8_only=True)
    _tuning_args(p, compile_=True)
    p.set_defaults(func=cmd_compile)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="build, then time against PyTorch eager, onnxruntime and the installed "
                       "peers (OpenVINO, ExecuTorch/XNNPACK) on this machine")
    _model_args(p)
    _build_args(p)
    p.add_argument("--rounds", type=options.positive, default=20,
                   help="interleaved rounds (each runs every candidate 5 times)")
    p.add_argument("--json", help="also write the measurements to this file")
    p.add_argument("--threads", type=options.threads, help="CPU threads for every candidate (default: the physical cores)")
    p.add_argument("--no-torch-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--no-peers", action="store_true", help=NO_PEERS)
    _calibration_args(p, int8_only=True)
    _tuning_args(p, compile_=True)
    p.set_defaults(func=cmd_bench)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="which variant to ship: accuracy beside latency for every variant on every "
                       "target, with the baselines (report.json, .md, .png, .html)")
    _model_args(p)
    p.add_argument("--target", action="append", type=options.targets,
                   help="presets to build for (default: host,rpi5); ARM boards run on "
                   "the emulator, their latency marked emulated")
    p.add_argument("--variants", type=options.comma_list(str, "variants"), help="comma-separated float32, float16, int8[:RECIPE], int8-mixed[:RECIPE] (default: "
                   "the target's float precisions, int8 with each shipped recipe, and int8-mixed)")
    p.add_argument("--eval-data", help="labelled data for accuracy: image folder, .npy/.npz, digits-test (default: "
                   "the model's; without any, random inputs and agreement with float only)")
    p.add_argument("--max-accuracy-drop", type=options.number(0, 100), default=0.25, metavar="POINTS",
                   help="int8-mixed: accuracy budget in percentage points on the evaluation data (default 0.25)")
    p.add_argument("--rounds", type=options.positive, default=20,
                   help="interleaved timing rounds (each runs every candidate 5 times)")
    p.add_argument("--threads", type=options.threads, help="CPU threads for every candidate (default: the physical cores)")
    p.add_argument("--no-torch-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--no-peers", action="store_true", help=NO_PEERS)
    p.add_argument("-o", "--output", default="report", help="report directory (default report/); an earlier "
                   "report there is replaced whole")
    g = p.add_argument_group("int8 calibration data (recipes come from --variants)")
    g.add_argument("--calib-data", help="calibration inputs: image folder, .npy/.npz, digits-train (default for the "
                   "demo model)")
    g.add_argument("--calib-samples", type=options.positive, help="how many samples to draw (default: the recipe's)")
    _tuning_args(p, compile_=True)
    p.set_defaults(func=cmd_report)


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="int8 post-training quantization: write a QDQ ONNX and its calibration table")
    _model_args(p)
    _calibration_args(p, int8_only=False)
    p.add_argument("--sensitivity", action="store_true", help="print each layer's SQNR with only it in int8")
    p.add_argument("--max-accuracy-drop", type=options.number(0, 100), metavar="POINTS", help="keep the most sensitive layers in "
                   "float until the accuracy drop on the validation data is at most this many percentage points")
    p.add_argument("--val-data", help="labelled validation data for --max-accuracy-drop (default: the model's "
                   "evaluation data, digits-test for the demo model)")
    p.add_argument("-o", "--output", required=True, help="the QDQ .onnx to write; the table goes to "
                   "NAME.calibration.json beside it")
    p.set_defaults(func=cmd_calibrate)


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="autotune a model for a target with MetaSchedule into its tuning database")
    _model_args(p)
    _build_args(p)
    _calibration_args(p, int8_only=True)
    _tuning_args(p, compile_=False)
    p.set_defaults(func=cmd_tune)


def _tuning_db_parser(sub) -> None:
    p = sub.add_parser("tuning-db", help="list tuning databases, or merge several of one model/target/precision")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("list", help="each database's model, precision, records and target")
    q.add_argument("databases", nargs="*", help="database directories (default: the cache and the shipped ones)")
    q = actions.add_parser("merge", help="combine databases of one key; the best record per workload wins")
    q.add_argument("databases", nargs="+", help="database directories (one, with --best-only, to prune it)")
    q.add_argument("-o", "--output", required=True, help="the database directory to write")
    q.add_argument("--best-only", action="store_true", help="keep only the best record per workload")
    p.set_defaults(func=cmd_tuning_db)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run an artifact on images, a .npy/.npz, or the digits test split")
    p.add_argument("artifact", help="artifact directory or .tar")
    p.add_argument("--input", default="digits-test", help="image, image folder, .npy/.npz, digits-test (default)")
    p.add_argument("--board", help="run on the emulated ARM board of this preset (rpi4, rpi5) instead of this machine")
    p.add_argument("--top", type=options.integer(1, options.MAX_CLASSES), default=3, help="classes to show per input")
    p.add_argument("--show", type=options.integer(0, options.MAX_COUNT), default=5, help="inputs to print")
    p.add_argument("--save", help="write all logits to this .npy file")
    p.set_defaults(func=cmd_run)


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="verify an artifact's hashes and print its manifest")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=cmd_inspect)


def _package_parser(sub) -> None:
    p = sub.add_parser("package", help="bundle an artifact with the native C/C++ runtime that runs it without "
                       "Python: bin/mixer-edge-run, lib/, include/mixer_edge.h, a C example")
    p.add_argument("artifact", help="a cpu, wgpu or cuda-driver (Jetson) artifact directory or .tar")
    p.add_argument("-o", "--output", required=True, help="the bundle directory to write (a .tar with --tar)")
    p.add_argument("--arch", choices=["x86_64", "aarch64"], help="the device's CPU, for a wgpu artifact (default: "
                   "this machine's) or a Jetson one (default: its board's); a cpu artifact is packaged for the arch "
                   "it was compiled for")
    p.add_argument("--tar", action="store_true", help="write BUNDLE.tar instead of a directory")
    p.add_argument("--bench", type=options.positive, metavar="N", help="then time the bundle's runner beside the "
                   "Python runtime on this machine: 3 rounds of a fresh process each, N runs of one batch")
    p.add_argument("--threads", type=options.threads, help="CPU threads for both with --bench (default: the "
                   "physical cores)")
    p.set_defaults(func=cmd_package)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train the demo Mixer on the bundled digits (about 30 s on 2 cores)")
    p.add_argument("-o", "--output", default="mixer_digits.safetensors")
    p.add_argument("--epochs", type=options.integer(1, 10_000), default=30)
    p.add_argument("--seed", type=options.integer(0, 2**32 - 1), default=0)
    p.set_defaults(func=cmd_train)


def _where_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs (default: this machine)")
    g.add_argument("--board", help="the emulated ARM board of this preset (rpi4, rpi5); its times are marked emulated")
    g.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: on a board registered there, which runs "
                   "python -m mixer_edge.rpc_server")
    g.add_argument("--rpc-key", help="the key the board registered under (e.g. rpi5)")


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="per-kernel latency of an artifact, each kernel named after the model's "
                       "layers, with its share, FLOPs, bytes and GFLOP/s (GOP/s for int8)")
    p.add_argument("artifact", help="artifact directory or .tar")
    _model_args(p)
    _where_args(p)
    p.add_argument("--repeat", type=options.positive, default=20, help="inferences timed; each kernel's median")
    p.add_argument("--json", action="store_true", help="print the record (layers.Profile) as JSON")
    p.set_defaults(func=cmd_profile)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="every layer's output of an artifact beside the float ONNX reference: "
                       "cosine, SQNR, max error, the first jump, and for int8 the suggested float_layers")
    p.add_argument("artifact", help="artifact directory or .tar")
    _model_args(p)
    p.add_argument("--data", help="inputs: image folder, .npy/.npz, digits-test (default: the model's evaluation "
                   "data, else random inputs)")
    p.add_argument("--samples", type=options.positive, default=32, help="inputs compared (default 32)")
    _where_args(p)
    p.add_argument("--json", action="store_true", help="print the record (layers.Comparison) as JSON")
    p.set_defaults(func=cmd_compare)


def _emulator_parser(sub) -> None:
    p = sub.add_parser("emulator", help="prepare the emulated aarch64 board (qemu-user + Python + TVM runtime)")
    p.add_argument("action", choices=["setup", "serve"], help="setup: build the board; serve: run a TVM RPC "
                   "server on it, registered with a tracker (for tuning)")
    p.add_argument("--board", default="rpi5", help="serve: the ARM preset whose CPU to emulate")
    p.add_argument("--tracker", help="serve: HOST:PORT of the TVM RPC tracker")
    p.add_argument("--key", help="serve: the key to register under (tune with the same --rpc-key)")
    p.add_argument("--dir", help="where to build it (default ~/.cache/mixer-edge/..., or $MIXER_EDGE_BOARD)")
    p.set_defaults(func=cmd_emulator)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mixer-edge", description="Compile MLP-Mixer classifiers with Apache TVM "
                    "for edge boards and GPUs, and run the artifacts.")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an internal error (for a bug report)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=lambda **kw: Parser(parents=[debug], **kw))
    for add in (_targets_parser, _export_parser, _compile_parser, _bench_parser, _report_parser, _calibrate_parser,
                _tune_parser, _tuning_db_parser, _run_parser, _inspect_parser, _profile_parser, _compare_parser,
                _package_parser, _train_parser, _emulator_parser):
        add(sub)  # each command's options, in the order --help lists them
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_as_progress  # a library's warning is a progress line, not a second error
        try:
            args.func(args)
        except MixerEdgeError as exc:
            print("mixer-edge: error: " + safe_text(" ".join(str(exc).split()), 2000), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # an object the signal left half-built (TVM's TempDirectory) would print its finalizer's error at exit
            sys.unraisablehook = lambda _: None
            print("mixer-edge: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 141
        except Exception as exc:  # a bug: the last line of defence, not a way to report user mistakes
            if args.debug:
                raise
            print(f"mixer-edge: internal error in '{args.command}' ({type(exc).__name__}: {safe_text(reason(exc))}): "
                  f"this is a bug in mixer-edge; please report it with the output of the same command run with "
                  f"--debug", file=sys.stderr)
            return 70
    return 0


def _warning_as_progress(message, category, *_):
    say(f"warning: {category.__name__}: {safe_text(' '.join(str(message).split()))}")


if __name__ == "__main__":
    sys.exit(main())

"""MetaSchedule tuning with databases keyed by (model graph, target, precision).

A database is a directory: TVM's JSON database (`database_workload.json`,
`database_tuning_record.json`, one JSON record per line, appended as tuning measures) plus
`key.json`, which says what it was tuned for. A build applies its own key's database first; then
any record of another database tuned for the same exact target (another model, another class count,
another precision) whose workload (a task's program, shapes included) matches one of its tasks. Records
measured on one board, or for another core count, never reach another (the target differs). A run killed mid-way leaves at most a torn last line,
which `open_database` drops (rewriting the file atomically); every complete record survives, and the
next run starts its search from them and spends only what is left of the trial budget. Every other line
must be a valid row (schemas `WorkloadRow`, `RecordRow`; `TuningKeyFile` for key.json): a malformed one
is refused, naming its file and line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from ..atomic import TUNING_DB, atomic_dir, atomic_file, check_destination
from ..errors import MixerEdgeError, reason
from ..formats import Schema, one_of, parse
from ..options import seconds
from .targets import PRECISIONS, TargetPreset

WORKLOADS, RECORDS, KEY = "database_workload.json", "database_tuning_record.json", "key.json"
FIX = "delete the line, or the database (`mixer-edge tune` writes a new one)"
MAX_DEPTH = 64  # arrays/objects in a row nested deeper than this (TVM's rows are ~8 deep) are refused


# ---- the database files' schemas ---------------------------------------------------------------------

class TuningKeyFile(Schema):
    """`key.json` of a tuning database directory: what it was tuned for. Its records are applied only to a build
    of the same model graph, target and precision."""

    graph: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the Relax program before "
                       "scheduling: weights excluded, shapes included")
    target: str = Field(min_length=1, description="the TVM target, as JSON with sorted keys")
    precision: Annotated[Literal[PRECISIONS], one_of("precision", PRECISIONS)] = Field(
        description="the precision the model was built in")
    model: str | None = Field(None, description="the model's name, for listings")


def _positional(row: Any, names: tuple[str, ...], shape: str, nested: int | None = None) -> Any:
    """A JSON-array row as a dict of `names` (the last `nested` of them from a nested array); else a shape error."""
    flat = row
    if nested is not None and isinstance(row, list) and len(row) == len(names) - nested + 1 \
            and isinstance(row[-1], list) and len(row[-1]) == nested:
        flat = [*row[:-1], *row[-1]]
    if nested is not None and flat is row or not isinstance(flat, list) or len(flat) != len(names):
        raise PydanticCustomError("row_shape", "a row is {shape}", {"shape": shape})
    return dict(zip(names, flat))


RunSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class WorkloadRow(Schema):
    """A line of `database_workload.json` (TVM's JSON database): the array [SHASH, MODULE], one tuning task's
    program per line; records name it by its line's index, from 0."""

    shash: str = Field(pattern=r"^[0-9]{1,20}$", description="position 0: TVM's structural hash of the program, "
                       "in decimal")
    module: str = Field(min_length=1, description="position 1: the program, serialized by TVM")

    @model_validator(mode="before")
    @classmethod
    def _from_array(cls, row: Any) -> Any:
        return _positional(row, ("shash", "module"), "[SHASH, MODULE]")


class RecordRow(Schema):
    """A line of `database_tuning_record.json` (TVM's JSON database): the array
    [WORKLOAD, [TRACE, RUN_SECS, TARGET, ARGS_INFO]], one measured schedule per line. mixer-edge reads the
    workload index and the run times (the best record per workload wins a merge); TVM reads the rest."""

    workload: int = Field(ge=0, description="position 0: the index of its workload's line in "
                          "database_workload.json, from 0")
    trace: list[Any] = Field(description="position 1.0: the schedule, as TVM's trace")
    run_secs: list[RunSeconds] | None = Field(description="position 1.1: measured run times in seconds "
                                              "(1e10: a failed run); null: not measured")
    target: dict[str, Any] = Field(description="position 1.2: the TVM target it was measured on")
    args_info: list[Any] = Field(description="position 1.3: the program's arguments (shapes, dtypes)")

    @model_validator(mode="before")
    @classmethod
    def _from_array(cls, row: Any) -> Any:
        return _positional(row, ("workload", "trace", "run_secs", "target", "args_info"),
                           "[WORKLOAD, [TRACE, RUN_SECS, TARGET, ARGS_INFO]]", nested=4)


@dataclass(frozen=True)
class TuningKey:
    """What a database was tuned for; records apply only where all three match."""

    graph: str  # sha256 of the Relax program before scheduling (weights excluded, shapes included)
    target: str  # the TVM target, canonical JSON
    precision: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def stored_at(cls, path: Path) -> TuningKey:
        """The key a database directory says it was tuned for."""
        have = read_key(path)
        return cls(*(have.get(f) for f in ("graph", "target", "precision")))

    def describe(self) -> str:
        return f"target {self.target}, precision {self.precision}, graph {self.graph[:12]}"


@dataclass(frozen=True)
class Budget:
    """How much tuning to do: total trials and wall-clock seconds (whichever runs out first)."""

    trials: int | None = None  # None: the preset's trials per task times the number of tasks
    seconds: float | None = None  # None: the preset's time budget


@dataclass(frozen=True)
class RpcBoard:
    """Boards registered under `key` with a TVM RPC tracker; measurements spread over all of them."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, tracker: str, key: str | None) -> RpcBoard:
        match = re.fullmatch(r"(.+):(\d+)", tracker or "")
        if not match:
            raise MixerEdgeError(f"--rpc-tracker '{tracker}' should be HOST:PORT, e.g. 127.0.0.1:9190")
        if not key:
            raise MixerEdgeError("--rpc-tracker needs --rpc-key, the key the boards registered under")
        return cls(match[1], int(match[2]), key)


@dataclass(frozen=True)
class Tuning:
    """How a build uses MetaSchedule: which database, and whether to tune into it first."""

    database: Path | None = None  # None: this key's database in the cache, else the shipped one, if any
    tune: bool = False
    budget: Budget = Budget()
    rpc: RpcBoard | None = None

    @property
    def wanted(self) -> bool:
        return self.tune or self.database is not None


def tune_into(key: TuningKey, preset: TargetPreset, tuning: Tuning, prepared, model: str, progress=print) -> dict:
    """Tune `prepared` (see `prepare`) into `tuning.database`, or into the cache's database for `key`
    (seeded from the shipped one when there is one); returns the database summary."""
    path = Path(tuning.database) if tuning.database else cache_root() / key.digest
    if tuning.database is None and not path.exists() and (shipped_root() / key.digest).is_dir():
        with atomic_dir(path, TUNING_DB) as stage:
            shutil.copytree(shipped_root() / key.digest, stage, dirs_exist_ok=True)
    return tune(prepared, preset, key, path, model, tuning.budget, tuning.rpc, progress)


@dataclass(frozen=True)
class AppliedTuning:
    """The records a build applied: its key's own database, the others of the same target that matched
    tasks by workload, and which tasks stayed untuned."""

    own: dict | None  # summary() of the key's database, None where it has none
    transferred_from: tuple[dict, ...]  # summary() of each other database that gave a record
    tasks: int  # tuning tasks of the build (hand-scheduled kernels left out)
    transferred: int  # tasks tuned by another database's record
    untuned: tuple[str, ...]  # tasks no record covers (they get the default schedules)

    @property
    def tuned(self) -> int:
        return self.tasks - len(self.untuned)

    def describe(self) -> str:
        own = f"{self.tuned - self.transferred} from this model's database" if self.own else "none of its own"
        line = f"tuning records cover {self.tuned} of {self.tasks} tasks ({own}"
        line += f", {self.transferred} matched in {len(self.transferred_from)} other database(s) of this target)" \
            if self.transferred else ")"
        if self.untuned:
            names = ", ".join(self.untuned[:4]) + (", ..." if len(self.untuned) > 4 else "")
            line += f"; untuned, on default schedules: {names} (`mixer-edge tune` tunes them)"
        return line


def database_for(key: TuningKey, preset: TargetPreset, tuning: Tuning, prepared, model: str, progress=print):
    """The database a build applies (None where no record fits) and what it covers (AppliedTuning): the key's own
    (tuned first if asked, or --tuning-db), then the records of every other database of this exact target."""
    from tvm.s_tir import meta_schedule as ms

    if tuning.tune:
        own = Path(tune_into(key, preset, tuning, prepared, model, progress)["path"])
    else:
        own = Path(tuning.database) if tuning.database else find_database(key)
    if own is not None and not own.is_dir():
        raise MixerEdgeError(f"tuning database {own} does not exist: pass a directory `mixer-edge tune` wrote")
    own_db = open_database(own, key) if own else None
    others = {path: db for path in same_target(key) if path != own and (db := _open_transferred(path, progress))}
    target = preset.tvm_target()
    tasks = [t for t in ms.relax_integration.extract_tasks(prepared, target) if not _scheduled(t.mod)]
    untuned, used, transferred = [], {}, 0
    for task in tasks:
        if own_db is not None and own_db.has_workload(task.mod):
            continue
        hits = [path for path, db in others.items()
                if db.query_tuning_record(task.mod, target, task.task_name) is not None]
        if not hits:
            untuned.append(task.task_name)
            continue
        transferred += 1
        used.update(dict.fromkeys(hits))
    applied = AppliedTuning(summary(own) if own else None, tuple(summary(p) for p in used), len(tasks), transferred,
                            tuple(untuned))
    if tasks:
        progress(applied.describe())
    if own is None and not used:
        return None, applied
    # Own records first; for the rest, the fastest record any other database measured for the workload
    fill = ms.database.UnionDatabase(*(others[p] for p in used)) if used else None
    parts = [db for db in (own_db, fill) if db is not None]
    return (parts[0] if len(parts) == 1 else ms.database.OrderedUnionDatabase(*parts)), applied


def same_target(key: TuningKey) -> list[Path]:
    """Every database in the cache, then shipped, tuned for `key`'s exact target (any model, any precision)."""
    found = []
    for root in (cache_root(), shipped_root()):
        for path in sorted(root.iterdir()) if root.is_dir() else ():
            try:
                if (path / KEY).is_file() and TuningKey.stored_at(path).target == key.target:
                    found.append(path)
            except MixerEdgeError:
                continue  # a broken database is refused where it is named, not where it is only passed by
    return found


def _open_transferred(path: Path, progress):
    """Another key's database, read for its records (no key check: they apply by workload); None, with a line
    saying so, where it is broken (it is refused in full where a build names it as its own)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        _repair(path)
        return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as exc:
        progress(f"not using the tuning database {path} for matching tasks ({reason(exc, last=True)})")
        return None


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h30m' or plain seconds -> seconds (options.seconds), refused in one line otherwise."""
    try:
        return seconds(str(text))
    except ValueError as exc:
        raise MixerEdgeError(f"--time-budget: {exc}") from None


def graph_key(mod, preset: TargetPreset, precision: str) -> TuningKey:
    """The key of `mod` (an imported Relax program with its weights detached) for `preset`."""
    graph = hashlib.sha256(mod.script(show_meta=True).encode()).hexdigest()
    return TuningKey(graph, json.dumps(preset.target, sort_keys=True), precision)


def cache_root() -> Path:
    # an empty MIXER_EDGE_CACHE is unset (not the current directory)
    return Path(os.environ.get("MIXER_EDGE_CACHE") or Path.home() / ".cache" / "mixer-edge") / "tuning"


def shipped_root() -> Path:
    """Databases that ship inside the package (mixer_edge/tuning_db/KEY_DIGEST/)."""
    return Path(__file__).resolve().parent.parent / "tuning_db"


def find_database(key: TuningKey) -> Path | None:
    """This key's database in the user's cache, else the one shipped with mixer-edge, else None."""
    for root in (cache_root(), shipped_root()):
        if (root / key.digest / KEY).is_file():
            return root / key.digest
    return None


def read_key(path: Path) -> dict:
    """The database's key.json, validated as a TuningKeyFile (as a dict: absent fields left out)."""
    try:
        data = json.loads((path / KEY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MixerEdgeError(f"{path} is not a mixer-edge tuning database (no readable {KEY}): pass the directory "
                             "`mixer-edge tune` wrote") from exc
    key = parse(TuningKeyFile, data, str(path / KEY), "pass the directory `mixer-edge tune` wrote, or fix the file")
    return key.model_dump(exclude_none=True)


def check_key(path: Path, key: TuningKey) -> None:
    """Refuse a database tuned for another target, precision or model graph."""
    have = TuningKey.stored_at(path)
    for field, label in (("target", "target"), ("precision", "precision"), ("graph", "model graph")):
        if getattr(have, field) != getattr(key, field):
            raise MixerEdgeError(f"tuning database {path} was tuned for another {label} ({getattr(have, field)}, not "
                                 f"{getattr(key, field)}): tune this target with `mixer-edge tune`, or pass its own "
                                 "--tuning-db")


def _repair(path: Path) -> None:
    """Check every row of the database at `path`; drop a torn last line (a run killed mid-append) and blank
    lines, rewriting the files atomically. Any other malformed row is refused, naming its file and line."""
    workloads = _rows(path / WORKLOADS, WorkloadRow)
    records = _rows(path / RECORDS, RecordRow)
    for n, _, row in records[1]:
        if row.workload >= len(workloads[1]):
            raise MixerEdgeError(f"{path / RECORDS} line {n}: workload {row.workload} is out of range "
                                 f"({WORKLOADS} has {len(workloads[1])}): {FIX}")
    for file, (text, rows) in ((path / WORKLOADS, workloads), (path / RECORDS, records)):
        clean = "".join(line + "\n" for _, line, _ in rows)
        if clean != text:
            with atomic_file(file) as tmp:
                tmp.write_text(clean, encoding="utf-8")


def _rows(file: Path, schema: type[Schema]) -> tuple[str, list[tuple[int, str, Schema]]]:
    """The text of `file` and its rows as (line number, line, `schema` record), blank lines and a torn last line
    left out; any other line that is not a valid row is refused."""
    try:
        text = file.read_text(encoding="utf-8") if file.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise MixerEdgeError(f"{file} could not be read ({reason(exc)}): {FIX}") from exc
    lines = text.split("\n")
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == last:
                continue  # torn: the writer was killed mid-line
            raise MixerEdgeError(f"{file} line {n}: not JSON ({exc.msg} at column {exc.colno}): {FIX}") from None
        except RecursionError:
            raise MixerEdgeError(f"{file} line {n}: nested too deeply to be a {schema.__name__}: {FIX}") from None
        if _depth(row) > MAX_DEPTH:
            raise MixerEdgeError(f"{file} line {n}: nested more than {MAX_DEPTH} deep, too deeply to be a "
                                 f"{schema.__name__}: {FIX}")
        rows.append((n, line, parse(schema, row, f"{file} line {n}", FIX)))
    return text, rows


def _depth(value: Any) -> int:
    """How deeply `value`'s arrays and objects nest (no recursion: a row can be arbitrarily deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH and isinstance(item, (list, dict)):
            todo += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _json_lines(file: Path) -> list:
    """The rows of a database file `_repair` has checked."""
    return [json.loads(line) for line in file.read_text(encoding="utf-8").split("\n") if line.strip()] \
        if file.exists() else []


def open_database(path: Path, key: TuningKey):
    """TVM's JSON database at `path`, checked against `key` and repaired after a kill."""
    from tvm.s_tir import meta_schedule as ms

    check_key(path, key)
    _repair(path)
    try:
        return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as exc:
        raise MixerEdgeError(f"tuning database {path} could not be loaded by TVM ({reason(exc)}): delete it, or "
                             "tune again into a new directory") from exc


def create_database(path: Path, key: TuningKey, model: str) -> None:
    """An empty database for `key` at `path` (kept as is when one for the same key is there)."""
    check_destination(path, TUNING_DB)  # a directory mixer-edge did not write is never filled
    if (path / KEY).exists():
        check_key(path, key)
        return
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / KEY) as tmp:
        tmp.write_text(json.dumps({**key.__dict__, "model": model}, indent=1) + "\n")


def summary(path: Path) -> dict:
    """What a database holds: its key, how many workloads and records, and their digest."""
    _repair(path)
    records = (path / RECORDS).read_bytes() if (path / RECORDS).exists() else b""
    return {**read_key(path), "path": str(path), "workloads": len(_json_lines(path / WORKLOADS)),
            "records": records.count(b"\n"), "sha256": hashlib.sha256(records).hexdigest()}


def merge(sources: list[Path], out: Path, best_only: bool = False) -> dict:
    """Combine databases of one key into `out` (written atomically); the best record per workload wins.

    `best_only` keeps just that best record per workload (smallest, for shipping).
    """
    check_destination(out, TUNING_DB, inputs=sources)  # not a source, nor a directory mixer-edge did not write
    first = TuningKey.stored_at(Path(sources[0]))
    if (Path(out) / KEY).is_file() and (have := TuningKey.stored_at(Path(out))) != first:
        raise MixerEdgeError(f"{out} is a tuning database for another key ({have.describe()}), and the merge is for "
                             f"{first.describe()}: write the merge to a new path, or over a database of the same "
                             "model, target and precision")
    for src in sources[1:]:
        if (other := TuningKey.stored_at(Path(src))) != first:
            raise MixerEdgeError(f"tuning databases {sources[0]} and {src} were tuned for different keys "
                                 f"({first.describe()} vs {other.describe()}): merge only databases of one "
                                 "model, target and precision")
    workloads: dict[str, int] = {}  # workload line -> index in the merged file
    records: dict[int, list] = {}  # merged workload index -> its records, best first
    for src in map(Path, sources):
        _repair(src)
        index = [workloads.setdefault(json.dumps(w), len(workloads)) for w in _json_lines(src / WORKLOADS)]
        for wid, record in _json_lines(src / RECORDS):
            if record not in records.setdefault(index[wid], []):
                records[index[wid]].append(record)
    with atomic_dir(out, TUNING_DB, inputs=sources) as stage:
        (stage / KEY).write_text(json.dumps(read_key(Path(sources[0])), indent=1) + "\n")
        (stage / WORKLOADS).write_text("".join(w + "\n" for w in workloads))
        lines = []
        for wid, recs in sorted(records.items()):
            recs.sort(key=_mean_seconds)
            lines += [json.dumps([wid, r]) + "\n" for r in recs[: 1 if best_only else None]]
        (stage / RECORDS).write_text("".join(lines))
    return summary(out)


def _mean_seconds(record: list) -> float:
    secs = [s for s in record[1] or [] if s is not None and s < 1e9]  # TVM marks failed runs 1e10
    return sum(secs) / len(secs) if secs else math.inf


def prepare(mod, preset: TargetPreset):
    """The program as MetaSchedule sees it: fused TIR functions; on CPUs, GELU's erf in its fast form, the int8
    kernels scheduled with their fused epilogues, and the weights marked free for layout rewriting (prepacked
    once at build time)."""
    import tvm
    from tvm import relax

    from . import int8

    cpu = preset.backend.runs_on_cpu
    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
              *([relax.transform.FastMathTransform()] if cpu else []), relax.get_pipeline("zero"),
              *([int8.schedule_fused(preset), relax.transform.AttachAttrLayoutFreeBuffers()] if cpu else [])]
    with preset.tvm_target():
        return tvm.transform.Sequential(passes)(mod)


def apply(mod, preset: TargetPreset, database):
    """`prepare`d program with the database's best schedules (`database` None: none). On CPUs every task no
    record covers gets a default schedule (cpu_schedules), and the weight-only work (layout rewrites,
    transposes) splits off into `main_transform_params`, for the caller to run once."""
    import tvm
    from tvm import relax

    from .cpu_schedules import schedule_untuned

    target = preset.tvm_target()
    with target, database if database is not None else contextlib.nullcontext():  # read when the pass is made
        passes = [relax.transform.MetaScheduleApplyDatabase()] if database is not None else []
        if preset.backend.runs_on_cpu:
            passes += [relax.transform.SplitLayoutRewritePreproc(), relax.transform.LiftTransformParams(),
                       relax.transform.FoldConstant()]
        mod = tvm.transform.Sequential(passes)(mod)
    return schedule_untuned(mod, target) if preset.backend.runs_on_cpu else mod


def _build_for_measure(mod, target, _params):
    """MetaSchedule's default build minus its import of tvm.s_tir.tensor_intrin (up to 100 s per worker)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_cross(cross_compiler: str, mod) -> str:
    """A measured candidate as a shared library the board can load (RPC upload)."""
    from tvm.support.cc import cross_compiler as cc

    path = os.path.join(tempfile.mkdtemp(prefix="mixer-edge-ms-"), "candidate.so")
    mod.export_library(path, fcompile=cc(cross_compiler))
    return path


def _runner(preset: TargetPreset, rpc: RpcBoard | None):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    if rpc is not None:
        config = ms.runner.RPCConfig(rpc.host, rpc.port, rpc.key, session_timeout_sec=120)
        try:
            servers = config.count_num_servers(allow_missing=False)
        except Exception as exc:
            raise MixerEdgeError(f"RPC tracker {rpc.host}:{rpc.port} has no board under key '{rpc.key}' "
                                 f"({reason(exc, last=True)}): start the board's server with "
                                 "`python -m mixer_edge.rpc_server` (or `mixer-edge emulator serve`)") from exc
        return ms.runner.RPCRunner(config, ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50),
                                   max_workers=servers)
    if preset.cross_compiler:
        raise MixerEdgeError(f"target {preset.name} is measured on the board itself: pass --rpc-tracker and "
                             "--rpc-key of a tracker its RPC server registered with")
    if not preset.backend.runs_on_cpu and not tvm.device(preset.target["kind"]).exist:
        raise MixerEdgeError(f"tuning for {preset.name} measures on a {preset.kind} device and this machine has "
                             "none: tune on a machine that has one, or over RPC (--rpc-tracker, --rpc-key)")
    return ms.runner.LocalRunner(timeout_sec=60)


def _scheduled(mod) -> bool:
    """True for a task whose function came scheduled (the int8 kernels): nothing to tune."""
    return any(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False) for func in mod.functions.values())


def tune(mod, preset: TargetPreset, key: TuningKey, path: Path, model: str, budget: Budget = Budget(),
         rpc: RpcBoard | None = None, progress=print) -> dict:
    """Tune `prepare`d `mod` into the database at `path`, resuming whatever it already holds."""
    from tvm.s_tir import meta_schedule as ms

    _quiet_meta_schedule_logs()
    target = preset.tvm_target()
    runner = _runner(preset, rpc)  # refuses before anything is written
    create_database(path, key, model)
    database = open_database(path, key)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not _scheduled(t.mod)]
    total = budget.trials or preset.tuning["trials_per_task"] * len(tasks)
    seconds = budget.seconds if budget.seconds is not None else parse_duration(preset.tuning["time_budget"])
    already = len(database.get_all_tuning_records())
    todo = total - already  # a resumed run spends only what the killed one had left
    progress(f"tuning {len(tasks)} tasks for {preset.name}: {total} trials, at most {seconds / 60:.0f} min; "
             f"database {path}" + (f" (resuming: {already} records there)" if already else ""))
    start = time.perf_counter()
    builder = ms.builder.LocalBuilder(
        f_build=_build_for_measure, timeout_sec=120 if rpc else 30,
        f_export=functools.partial(_export_cross, preset.cross_compiler) if preset.cross_compiler else None)
    if preset.backend.runs_on_cpu and not already:
        _commit_default_schedules(tasks, target, builder, runner, database, progress)
    if todo <= 0:
        progress(f"the database already holds {already} records, the whole budget: pass a larger --trials to go on")
    else:
        with tempfile.TemporaryDirectory(prefix="mixer-edge-tune-") as work:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, work, num_threads=os.cpu_count() or 1)
            watch = _progress_callback([t.task_name for t in tasks], weights, todo, start + seconds, progress)
            # No per-task cap: after one round over every task the gradient scheduler spends the trials
            # where the model's latency is (the big GEMMs), and spatial-only tasks stop after one trial.
            try:
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work, max_trials_global=todo,
                              max_trials_per_task=todo, num_trials_per_iter=min(32, max(1, todo // len(tasks))),
                              builder=builder, runner=runner, database=database, cost_model="xgb",
                              measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), watch])
            except Exception as exc:  # the budget's stop arrives wrapped by TVM's FFI
                if TimeBudgetSpent.message not in str(exc):
                    raise
                progress(f"time budget of {seconds / 60:.1f} min spent: tuning stopped")
    result = {**summary(path), "tasks": len(tasks), "seconds": round(time.perf_counter() - start, 1)}
    progress(f"tuning done in {result['seconds']:.0f}s: {result['records']} records in {path}")
    return result


def _commit_default_schedules(tasks, target, builder, runner, database, progress) -> None:
    """Each task's default schedule (the one a build gives a task no record covers: cpu_schedules), measured
    and committed as one more record, so a tuned schedule is applied only where it beats it. (A spatial task
    gets one random trial, often slower: S/16's token-mixing transpose ran 4x slower tuned than default.)"""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    from .cpu_schedules import default_schedule

    scheduled = [(task.dispatched[0], sch) for task in tasks
                 if (sch := default_schedule(task.dispatched[0]["main"], target)) is not None]
    progress(f"measuring the default schedules of {len(scheduled)} tasks")
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in scheduled])
    args = [ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]) for _, sch in scheduled]
    ok = [(mod, sch, b, a) for (mod, sch), b, a in zip(scheduled, built, args) if b.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", a) for *_, b, a in ok])
    for (mod, sch, b, a), future in zip(ok, futures):
        result = future.result()
        remove_build_dir(b.artifact_path)
        if result.error_msg is None and result.run_secs:
            database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, database.commit_workload(mod), result.run_secs, target, a))


def _quiet_meta_schedule_logs() -> None:
    """MetaSchedule's console logs off (we print progress lines), and its handlers from an earlier run in this
    process dropped: TVM lists them by name in its next logging config, and some have none (a crash there)."""
    meta = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(meta.handlers):
        meta.removeHandler(handler)
        handler.close()
    meta.setLevel(logging.WARNING)


def _progress_callback(names, weights, trials, deadline, progress):
    """A measure callback that prints a line per batch (trials, the task's best time, the model's
    estimate) and stops the tuning once the wall-clock budget is spent."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    best = [math.inf] * len(names)
    done = [0]
    stopping = []
    start = time.perf_counter()

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, scheduler, task_id, candidates, builder_results, runner_results):
            done[0] += len(candidates)
            for result in runner_results:
                if result.error_msg is None and result.run_secs:
                    best[task_id] = min(best[task_id], sum(map(float, result.run_secs)) / len(result.run_secs))
            measured = [b * w for b, w in zip(best, weights) if b < math.inf]
            minutes, seconds = divmod(int(time.perf_counter() - start), 60)
            progress(f"  [{minutes:3d}:{seconds:02d}] {done[0]}/{trials} trials  "
                     f"task {task_id + 1}/{len(names)} {names[task_id][:40]}: best {best[task_id] * 1e3:.3f} ms  "
                     f"model estimate {sum(measured) * 1e3:.2f} ms ({len(measured)}/{len(names)} tasks measured)")
            if time.perf_counter() > deadline and not stopping:
                # Ending tasks from here is unsafe: TVM may be joining this very task on its way to running it
                # again (its scheduler then aborts on a finished task). So collect the batches other tasks
                # have in flight (their records go to the database too), then stop the tuning by raising.
                stopping.append(task_id)
                for other, task in enumerate(scheduler.tasks_):
                    if other != task_id and task.runner_futures is not None:
                        scheduler.join_running_task(other)
                raise TimeBudgetSpent(TimeBudgetSpent.message)

    return Progress()


class TimeBudgetSpent(Exception):
    """Raised by the progress callback to stop MetaSchedule when the wall-clock budget is spent."""

    message = "mixer-edge: the tuning time budget is spent"

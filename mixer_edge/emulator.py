"""An emulated 64-bit ARM board: qemu-user + an arm64 Debian sysroot with Python 3.11 and the TVM runtime.

`setup()` builds it from the machine's own package registries (Debian's arm64 packages through
apt, the aarch64 TVM/numpy wheels through pip), atomically, once; `run_artifact()` runs an
artifact there under a chosen CPU model (cortex-a72 = Raspberry Pi 4, cortex-a76 = Pi 5).
Emulated times say nothing about a real board's speed; emulated outputs are real aarch64 results.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .atomic import BOARD, atomic_dir, check_destination
from .bench import Latency
from .errors import MixerEdgeError
from .formats import json_text

QEMU = "qemu-aarch64-static"
PYTHON = "python3.11"
DEBIAN_ROOTS = [f"{PYTHON}-minimal:arm64", f"lib{PYTHON}-stdlib:arm64", "libstdc++6:arm64"]
WHEELS = ["apache-tvm", "apache-tvm-ffi", "numpy", "pydantic"]  # at the host's versions (pip adds their deps)
SKIP_DEBS = {"dpkg", "tar", "install-info"}  # tools apt pulls in that the board never runs
PACKAGE = Path(__file__).resolve().parent  # this mixer_edge, imported on the board through a link


def board_dir(root: str | Path | None = None) -> Path:
    if root:
        return Path(root)
    if os.environ.get("MIXER_EDGE_BOARD"):
        return Path(os.environ["MIXER_EDGE_BOARD"])
    tag = "-".join(f"{w}{metadata.version(w)}" for w in WHEELS)
    return Path.home() / ".cache" / "mixer-edge" / f"arm64-board-{tag}"


def run_tool(cmd: list[str], what: str, **kw) -> str:
    """The stdout of a command; a failure is one line naming `what` and the command's last words."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MixerEdgeError(f"{what} failed ({tail[0]})")
    return proc.stdout


def require_arm64(what: str) -> None:
    """Debian's arm64 packages are known to apt, or made so (as root), or `what` is refused with the fix."""
    if "arm64" in run_tool(["dpkg", "--print-foreign-architectures"], "dpkg").split():
        return
    if os.geteuid() != 0:
        raise MixerEdgeError(f"{what} needs arm64 packages: run as root, or first run "
                             "'sudo dpkg --add-architecture arm64 && sudo apt-get update'")
    run_tool(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64")
    run_tool(["apt-get", "update"], "apt-get update")


def _arm64_packages() -> list[str]:
    """Python 3.11 and libstdc++ for arm64 with every library they depend on."""
    require_arm64("the board")
    out = run_tool(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends", *DEBIAN_ROOTS], "apt-cache depends")
    names = {line.strip() for line in out.splitlines() if line and not line[0].isspace()}
    return sorted(n for n in names if n.endswith(":arm64") and n.split(":")[0] not in SKIP_DEBS)


def setup(root: str | Path | None = None, progress=print) -> Path:
    """Build the board in `root` (default: ~/.cache/mixer-edge/...) unless it is already there."""
    root = board_dir(root)
    if BOARD.proves(root):
        return root
    check_destination(root, BOARD)  # before the downloads
    for tool in (QEMU, "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise MixerEdgeError(f"the emulated board needs {tool}: apt-get install qemu-user-static")
    packages = _arm64_packages()
    with atomic_dir(root, BOARD) as stage:
        debs = stage / "debs"
        debs.mkdir()
        progress(f"downloading {len(packages)} arm64 Debian packages (Python 3.11 and its libraries)")
        run_tool(["apt-get", "download", *packages], "apt-get download", cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            run_tool(["dpkg", "-x", str(deb), str(stage / "sysroot")], f"dpkg -x {deb.name}")
        shutil.rmtree(debs)
        pins = [f"{w}=={metadata.version(w)}" for w in WHEELS]
        progress(f"installing aarch64 wheels: {' '.join(pins)}")
        run_tool([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(stage / "site"),
              "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",  # pydantic-core: 2_17
              "--python-version", "3.11", "--implementation", "cp",
              "--only-binary=:all:", *pins], "pip install of the aarch64 wheels")
        (stage / BOARD.file).write_text(json_text({"python": PYTHON, "debs": packages, "wheels": pins}))
    progress(f"board ready in {root}")
    return root


def require_board(root: str | Path | None = None) -> Path:
    """The emulated board's directory; refused with the fix if it was never set up."""
    root = board_dir(root)
    if not BOARD.proves(root):
        raise MixerEdgeError(f"no emulated board in {root}: run 'mixer-edge emulator setup' first")
    return root


@contextlib.contextmanager
def _board(cpu: str, root: str | Path | None):
    """The command prefix and environment that run the board's Python as CPU model `cpu` (a qemu -cpu name)."""
    root = require_board(root)
    sysroot = root / "sysroot"
    with tempfile.TemporaryDirectory() as code:  # only mixer_edge, not the host's other packages
        (Path(code) / "mixer_edge").symlink_to(PACKAGE)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{root / 'site'}:{code}",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": str(root)}
        yield [QEMU, "-cpu", cpu, "-L", str(sysroot), str(sysroot / "usr" / "bin" / PYTHON)], env


def python(script: str, cpu: str, root: str | Path | None = None, timeout: float = 600,
           args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a Python script on the board as CPU model `cpu`, with `args` as its sys.argv[1:]."""
    with _board(cpu, root) as (cmd, env):
        try:
            return subprocess.run([*cmd, "-c", script, *args], capture_output=True, text=True, env=env,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise MixerEdgeError(f"the emulated {cpu} board did not finish within {timeout:.0f}s") from exc


def serve(cpu: str, tracker_host: str, tracker_port: int, key: str, root: str | Path | None = None,
          progress=print) -> None:
    """Run the board's TVM RPC server (mixer_edge.rpc_server) until interrupted, registered with the tracker."""
    with _board(cpu, root) as (cmd, env):
        progress(f"emulated {cpu} board serving TVM RPC for tracker {tracker_host}:{tracker_port}, key '{key}'")
        proc = subprocess.Popen([*cmd, "-m", "mixer_edge.rpc_server", "--tracker", f"{tracker_host}:{tracker_port}",
                                 "--key", key, "--host", "127.0.0.1"], env=env)
        try:
            proc.wait()
        finally:
            proc.terminate()


# The board-side script is constant: its data (paths, rounds) comes as one JSON argument, never as source text.
_RUN_ARTIFACTS = """
import json, sys, numpy as np
from pathlib import Path
from mixer_edge import runtime
from mixer_edge.bench import artifact_candidate, interleaved
from mixer_edge.errors import MixerEdgeError
job = json.loads(sys.argv[1])
try:
    models = [runtime.load(path) for path in job["artifacts"]]
except MixerEdgeError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
x = np.load(job["inputs"])
output = Path(job["output"])
for i, model in enumerate(models):
    np.save(output / f"logits{i}.npy", model(x))
if job["rounds"]:
    cands = [artifact_candidate(str(i), model, x[:model.batch]) for i, model in enumerate(models)]
    (output / "latency.json").write_text(json.dumps([t.to_json() for t in interleaved(cands, rounds=job["rounds"])]))
"""


def run_artifacts(artifacts: list[str | Path], x: np.ndarray, cpu: str, rounds: int = 0,
                  root: str | Path | None = None) -> tuple[list[np.ndarray], list[Latency] | None]:
    """Logits of each artifact on inputs `x`, computed on the emulated board with CPU model `cpu`, and with
    `rounds`, their latencies there (bench.interleaved over the artifacts, on the first batch of `x`).
    Emulated latency ranks builds for one board against each other; it is not the board's speed."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "x.npy"
        np.save(inputs, np.ascontiguousarray(x, np.float32))
        paths = [str(Path(a).resolve()) for a in artifacts]
        job = json.dumps({"artifacts": paths, "inputs": str(inputs), "output": tmp, "rounds": int(rounds)})
        proc = python(_RUN_ARTIFACTS, cpu, root, timeout=600 + 60 * len(paths), args=(job,))
        if proc.returncode == 3:
            raise MixerEdgeError(proc.stderr.strip().splitlines()[-1])
        if proc.returncode:
            signal = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            last = proc.stderr.strip().splitlines()[-1:] or [""]
            names = ", ".join(Path(a).name for a in artifacts)
            raise MixerEdgeError(f"the emulated {cpu} board failed running {names} ({signal}) {last[0]}".strip())
        logits = [np.load(Path(tmp) / f"logits{i}.npy") for i in range(len(paths))]
        if not rounds:
            return logits, None
        return logits, [Latency(**t) for t in json.loads((Path(tmp) / "latency.json").read_text())]


def run_artifact(artifact: str | Path, x: np.ndarray, cpu: str, root: str | Path | None = None) -> np.ndarray:
    """Logits of `artifact` on inputs `x`, computed on the emulated board with CPU model `cpu`."""
    return run_artifacts([artifact], x, cpu, root=root)[0][0]

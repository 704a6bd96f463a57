"""An emulated 64-bit ARM root with a software Vulkan device: qemu-user + Debian's arm64 Mesa lavapipe.

`setup()` builds it from Debian's arm64 packages through apt (mesa-vulkan-drivers, libvulkan1 and every library
they load; no Python), atomically, once; `run()` runs an aarch64 bundle's mixer-edge-run there under a chosen
CPU model (cortex-a76 = Pi 5), with lavapipe as its only Vulkan driver. The ICD manifest names its driver by an
absolute path (/usr/lib/aarch64-linux-gnu/libvulkan_lvp.so), which qemu's -L maps into the root. lavapipe
compiles the WGSL kernels with the root's LLVM, so outputs are real aarch64 results; emulated times say nothing
about a real board's speed, nor lavapipe's about its GPU's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from .atomic import VULKAN_ROOT, atomic_dir, check_destination
from .bundle import read_bundle
from .emulator import QEMU, SKIP_DEBS, require_arm64, run_tool
from .errors import MixerEdgeError, reason
from .formats import json_text

DRIVER = "mesa-vulkan-drivers:arm64"  # lavapipe (libvulkan_lvp.so) and its ICD manifest
LOADER = "libvulkan1:arm64"  # the Vulkan loader wgpu-native opens
ICD = Path("usr/share/vulkan/icd.d/lvp_icd.aarch64.json")  # inside the sysroot
# mesa-vulkan-drivers depends on python3 | python3-minimal for a layer's control script that no bundle runs:
# its other dependencies are followed, that one is not, and a root that would hold Python is refused.
NO_PYTHON = re.compile(r"python", re.IGNORECASE)
APT_FLAGS = ("--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
             "--no-pre-depends")


def mesa_version() -> str:
    """The version of Debian's arm64 Mesa that apt would download now (its candidate)."""
    require_arm64("the Vulkan root")
    out = run_tool(["apt-cache", "show", "--no-all-versions", DRIVER], f"apt-cache show {DRIVER}")
    version = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")), "")
    if not version:
        raise MixerEdgeError(f"apt knows no version of {DRIVER}: run 'apt-get update'")
    return version


def root_dir(root: str | Path | None = None) -> Path:
    """The Vulkan root's directory: `root`, else $MIXER_EDGE_VULKAN_ROOT, else one per Mesa version in the cache."""
    if root:
        return Path(root)
    if os.environ.get("MIXER_EDGE_VULKAN_ROOT"):
        return Path(os.environ["MIXER_EDGE_VULKAN_ROOT"])
    tag = re.sub(r"[^A-Za-z0-9.+~-]", "_", mesa_version())  # an epoch's ':' is no file name character
    return Path.home() / ".cache" / "mixer-edge" / f"arm64-vulkan-root-{tag}"


def _packages() -> list[str]:
    """lavapipe and the Vulkan loader for arm64 with every library they depend on, and no Python."""
    out = run_tool(["apt-cache", "depends", *APT_FLAGS, DRIVER], f"apt-cache depends {DRIVER}")
    direct = [m.group(1) for m in re.finditer(r"^\s+\|?Depends: ([^<\s]+)$", out, re.MULTILINE)]
    roots = sorted({LOADER, *(name for name in direct if not NO_PYTHON.search(name))})
    out = run_tool(["apt-cache", "depends", "--recurse", *APT_FLAGS, *roots], "apt-cache depends")
    names = {line.strip() for line in out.splitlines() if line and not line[0].isspace()} | {DRIVER}
    packages = sorted(n for n in names if n.endswith(":arm64") and n.split(":")[0] not in SKIP_DEBS)
    if python := [n for n in packages if NO_PYTHON.search(n)]:
        raise MixerEdgeError(f"the Vulkan root would hold Python ({', '.join(python)} through {DRIVER}'s "
                             "dependencies): report this")
    return packages


def setup(root: str | Path | None = None, progress=print) -> Path:
    """Build the Vulkan root in `root` (default: ~/.cache/mixer-edge/...) unless it is already there."""
    for tool in (QEMU, "apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise MixerEdgeError(f"the emulated Vulkan root needs {tool}: apt-get install qemu-user-static")
    root = root_dir(root)
    if VULKAN_ROOT.proves(root):
        return root
    check_destination(root, VULKAN_ROOT)  # before the downloads
    version, packages = mesa_version(), _packages()
    with atomic_dir(root, VULKAN_ROOT) as stage:
        debs, sysroot = stage / "debs", stage / "sysroot"
        debs.mkdir()
        progress(f"downloading {len(packages)} arm64 Debian packages (Mesa {version} lavapipe and its libraries)")
        run_tool(["apt-get", "download", *packages], "apt-get download", cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            run_tool(["dpkg", "-x", str(deb), str(sysroot)], f"dpkg -x {deb.name}")
        shutil.rmtree(debs)
        _check_driver(sysroot)
        (stage / VULKAN_ROOT.file).write_text(json_text({"mesa": version, "debs": packages, "icd": str(ICD)}))
    progress(f"Vulkan root ready in {root}")
    return root


def _check_driver(sysroot: Path) -> None:
    """The ICD manifest is there and names a driver inside the root."""
    try:
        library = json.loads((sysroot / ICD).read_text())["ICD"]["library_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MixerEdgeError(f"{DRIVER} installed no readable {ICD} ({reason(exc)}): report this") from exc
    if not (isinstance(library, str) and library.startswith("/") and (sysroot / library.lstrip("/")).is_file()):
        raise MixerEdgeError(f"{ICD} names {library!r}, which is not in the Vulkan root: report this")


def require_root(root: str | Path | None = None) -> Path:
    """The Vulkan root's directory; refused with the fix if it was never set up."""
    root = root_dir(root)
    if not VULKAN_ROOT.proves(root):
        raise MixerEdgeError(f"no emulated Vulkan root in {root}: run mixer_edge.vulkan_root.setup() first")
    return root


def run(bundle_dir: str | Path, args: Sequence[str | Path | int], cpu: str, root: str | Path | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the aarch64 bundle's mixer-edge-run with `args` in the Vulkan root as CPU model `cpu` (a qemu -cpu
    name); its exit status, stdout and stderr are the caller's to read."""
    bundle_dir = Path(bundle_dir).resolve()
    if (arch := read_bundle(bundle_dir).arch) != "aarch64":
        raise MixerEdgeError(f"{bundle_dir} is an {arch} bundle: the emulated Vulkan root runs aarch64 bundles "
                             "(mixer-edge package --arch aarch64)")
    root = require_root(root).resolve()
    sysroot = root / "sysroot"
    cmd = [QEMU, "-cpu", cpu, "-L", str(sysroot), str(bundle_dir / "bin" / "mixer-edge-run"), *map(str, args)]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(root),  # nothing from the user's home
           "VK_ICD_FILENAMES": str(sysroot / ICD)}  # lavapipe, and no driver of the host's
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise MixerEdgeError(f"the emulated {cpu} Vulkan root did not finish within {timeout:.0f}s") from exc

"""Native bundles: an artifact with the C/C++ runtime that runs it, for a device without Python.

`package` verifies an artifact and writes a bundle, a directory (or .tar) written atomically:

    artifact/             the artifact's files, as verified
    bin/mixer-edge-run    the runner (mixer_edge/native/runner)
    lib/                  libmixer_edge.so and the runtime libraries it loads, nothing else
    include/mixer_edge.h  the C API
    example/              classify.c, and the CMakeLists.txt that builds it against include/ and lib/
    bundle.json           what the bundle is and holds (`Bundle`)

The runtime is compiled from mixer_edge/native/ by plain compiler calls (`build_native`), natively or
cross-compiled, once per digest of its sources, flags and link inputs (kept under $MIXER_EDGE_CACHE/native,
default ~/.cache/mixer-edge/native). It links TVM's and wgpu's libraries from the installed wheels, or from the
same versions' wheels for the other arch, which pip fetches once into that cache (`runtime_libraries`), and
mbedcrypto (SHA-256) statically from Debian's libmbedtls-dev. The device needs a glibc and libstdc++ as new as
the compiler's (Debian 12's g++: glibc 2.34, GLIBCXX_3.4.29) and, for wgpu artifacts, a Vulkan driver.

`compare_runtimes` times a bundle's runner beside the Python runtime on its artifact, on this machine (`mixer-edge
package --bench`): start-up, latency and peak memory, for the README's figures.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import Field

from . import __version__, runtime
from .atomic import BUNDLE, NATIVE_BUILD, RUNTIME_LIBS, atomic_dir, atomic_file, check_destination
from .errors import MixerEdgeError, reason
from .formats import Schema, json_text, parse, safe_text
from .runtime import Sha256

NATIVE = Path(__file__).resolve().parent / "native"
ARCHES = ("x86_64", "aarch64")
TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
DEBIAN_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
LIBRARY, RUNNER, HEADER = "libmixer_edge.so", "mixer-edge-run", "mixer_edge.h"
EXAMPLE = ("classify.c", "CMakeLists.txt")
CORE = ("src/artifact.cc", "src/capi.cc")
RUNNER_SOURCE = "runner/mixer_edge_run.cc"
# the Debian header packages the sources include from /usr/include (arch-independent: also for cross builds)
HEADERS = {"nlohmann/json.hpp": "nlohmann-json3-dev", "mbedtls/sha256.h": "libmbedtls-dev",
           "stb/stb_image.h": "libstb-dev"}
CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall")
WHEELS = {"apache-tvm": "tvm", "apache-tvm-ffi": "tvm_ffi", "wgpu": "wgpu"}  # distribution -> its package
# a runtime library's name in a bundle's lib/ -> where its wheel installs it
WHEEL_FILES = {"libtvm_runtime.so": "tvm/lib/libtvm_runtime.so", "libtvm_ffi.so": "tvm_ffi/lib/libtvm_ffi.so",
               "libwgpu_native.so": "wgpu/resources/libwgpu_native-release.so"}
# what every Linux device has: glibc's libraries and loader, and GCC's C++ runtime
SYSTEM_LIBRARY = re.compile(r"(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s)\.so\.\d+"
                            r"|ld-linux-[\w-]+\.so\.\d+")
NOT_YET = {"cuda": "CUDA artifacts for TVM's CUDA runtime need the Python runtime (mixer-edge run); a preset with [build] cuda_runtime = \"driver\" (the Jetsons) builds ones that bundles run",
           "tvm-vulkan": "tvm-vulkan artifacts need TVM's Vulkan runtime, which bundles do not ship: use the Python "
                         "runtime, or compile for a wgpu target such as rpi5-vulkan"}


@dataclass(frozen=True)
class Engine:
    """One backend of the native runtime: its source, the macro that compiles it in, the libraries it loads."""

    source: str
    define: str
    libraries: tuple[str, ...]  # names in lib/ (WHEEL_FILES)
    wheels: tuple[str, ...]  # the distributions whose headers and libraries it uses
    host_code: bool = False  # the artifact holds CPU code (model.so): the bundle's arch is the one it was built for


ENGINES = {"cpu": Engine("src/tvm_engine.cc", "MIXER_EDGE_WITH_TVM", ("libtvm_runtime.so", "libtvm_ffi.so"),
                         ("apache-tvm", "apache-tvm-ffi"), host_code=True),
           "wgpu": Engine("src/wgpu_engine.cc", "MIXER_EDGE_WITH_WGPU", ("libwgpu_native.so",), ("wgpu",)),
           "cuda-driver": Engine("src/cuda_engine.cc", "MIXER_EDGE_WITH_CUDA", (), ())}  # libcuda.so.1: the board's


# ---- bundle.json -------------------------------------------------------------------------------------

class BundleArtifact(Schema):
    """The artifact a bundle runs; its files are under `artifact/`."""

    model: str = Field(description="the model's name (the manifest's model.name)")
    manifest_sha256: Sha256 = Field(description="the manifest's own digest: which build of the model this is")


class BundleVersions(Schema):
    """What the runtime was built from: mixer-edge's native sources and the wheels whose headers and libraries it
    uses (the versions of the libraries in lib/)."""

    mixer_edge: str = Field(alias="mixer-edge", description="mixer-edge, whose native/ sources were compiled")
    apache_tvm: str | None = Field(None, alias="apache-tvm", description="cpu bundles: TVM (lib/libtvm_runtime.so)")
    apache_tvm_ffi: str | None = Field(None, alias="apache-tvm-ffi", description="cpu bundles: TVM FFI "
                                       "(lib/libtvm_ffi.so)")
    wgpu: str | None = Field(None, description="wgpu bundles: the wgpu wheel (lib/libwgpu_native.so)")


class Bundle(Schema):
    """A native bundle's `bundle.json`: an artifact with the C/C++ runtime that runs it without Python
    (`mixer-edge package`)."""

    format: Literal[1] = Field(description="the bundle format")
    arch: Literal["x86_64", "aarch64"] = Field(description="the CPU architecture its binaries are built for, as "
                                               "`uname -m` names it")
    backend: Literal["cpu", "wgpu", "cuda-driver"] = Field(description="the engine that runs the artifact: `cpu` (model.so through "
                                            "TVM's runtime) or `wgpu` (program.json through wgpu-native, Vulkan)")
    artifact: BundleArtifact = Field(description="the artifact under artifact/")
    files: dict[str, Sha256] = Field(description="every file of the bundle but this one (its path inside the "
                                     "bundle, with / separators) -> its sha256")
    total_bytes: int = Field(ge=0, description="the size of those files together")
    versions: BundleVersions = Field(description="what the runtime was built from")


@dataclass(frozen=True)
class NativeBuild:
    """The native runtime built for one arch, in a directory's bin/ and lib/."""

    arch: str
    backends: tuple[str, ...]
    library: Path  # lib/libmixer_edge.so
    runner: Path  # bin/mixer-edge-run
    libraries: tuple[Path, ...]  # the runtime libraries it loads, beside it in lib/


@dataclass(frozen=True)
class Toolchain:
    """What compiles the runtime for one arch: the C++ compiler and mbedcrypto's libraries."""

    arch: str
    compiler: str  # its path
    mbedcrypto: Path  # the static archive
    mbedcrypto_shared: Path  # the shared library, linked (and shipped) only if the archive is not PIC


# ---- the toolchain and the runtime libraries -----------------------------------------------------------

def host_arch() -> str:
    """This machine's CPU architecture, as `uname -m` names it."""
    return platform.machine()


def cache_root() -> Path:
    """Where compiled runtimes and other archs' runtime libraries are kept: $MIXER_EDGE_CACHE/native (an empty
    MIXER_EDGE_CACHE is unset), else ~/.cache/mixer-edge/native."""
    return Path(os.environ.get("MIXER_EDGE_CACHE") or Path.home() / ".cache" / "mixer-edge") / "native"


def check_toolchain(arch: str, backends: tuple[str, ...]) -> Toolchain:
    """The compiler and libraries a build of `backends` for `arch` needs; what is missing is refused in one line
    with the command that installs it. Call it before any output exists."""
    _check_arch(arch)
    for backend in backends:
        if backend not in ENGINES:
            raise MixerEdgeError(f"the native runtime has no {backend} backend: choose from {', '.join(ENGINES)}")
    native = arch == host_arch()
    name = "g++" if native else f"{TRIPLES[arch]}-g++"
    compiler = shutil.which(name)
    if compiler is None:
        package = "g++" if native else f"g++-{TRIPLES[arch].replace('_', '-')}"
        raise MixerEdgeError(f"building the native runtime for {arch} needs {name}, which is not on PATH: "
                             f"apt-get install {package}")
    if shutil.which("readelf") is None:
        raise MixerEdgeError("checking the native runtime's libraries needs readelf: apt-get install binutils")
    for header, package in HEADERS.items():
        if not (Path("/usr/include") / header).is_file():
            raise MixerEdgeError(f"the native runtime includes /usr/include/{header}, which is missing: "
                                 f"apt-get install {package}")
    libdir = Path("/usr/lib") / TRIPLES[arch]
    if not (libdir / "libmbedcrypto.a").is_file():
        dev = "libmbedtls-dev" if native else f"libmbedtls-dev:{DEBIAN_ARCHES[arch]}"
        first = "" if native else f" (after dpkg --add-architecture {DEBIAN_ARCHES[arch]} && apt-get update)"
        raise MixerEdgeError(f"the native runtime for {arch} needs {libdir}/libmbedcrypto.a (SHA-256), which is "
                             f"missing: apt-get install {dev}{first}")
    for backend in backends:
        for dist in ENGINES[backend].wheels:
            _package_dir(dist)
    return Toolchain(arch, compiler, libdir / "libmbedcrypto.a", libdir / "libmbedcrypto.so")


def runtime_libraries(arch: str, progress=print) -> Path:
    """A directory holding TVM's and wgpu's runtime libraries for `arch` where their wheels put them (WHEEL_FILES):
    the installed wheels' own on this machine's arch, else the same versions' `arch` wheels, fetched once by pip
    into the cache."""
    _check_arch(arch)
    if arch == host_arch():
        site = _package_dir("apache-tvm").parent
        for path in WHEEL_FILES.values():
            if not (site / path).is_file():
                raise MixerEdgeError(f"{site / path} is missing: the native runtime links the libraries of the "
                                     f"wheels installed in one environment; pip install --force-reinstall "
                                     f"{' '.join(WHEELS)}")
        return site
    pins = [f"{dist}=={_version(dist)}" for dist in WHEELS]
    root = cache_root() / f"runtime-{arch}-{'-'.join(pin.replace('==', '') for pin in pins)}"
    if RUNTIME_LIBS.proves(root) and all((root / path).is_file() for path in WHEEL_FILES.values()):
        return root
    with atomic_dir(root, RUNTIME_LIBS) as stage:
        progress(f"fetching the {arch} runtime libraries: {' '.join(pins)}")
        site = stage / "site"
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--no-deps", "--target", str(site),
              "--platform", f"manylinux_2_28_{arch}", "--platform", f"manylinux_2_17_{arch}",
              "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:", *pins],
             f"pip install of the {arch} wheels {' '.join(pins)} (check the network or the package index)")
        for path in WHEEL_FILES.values():
            (stage / path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(site / path, stage / path)
        shutil.rmtree(site)
        (stage / RUNTIME_LIBS.file).write_text(json_text({"arch": arch, "wheels": pins}))
    return root


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise MixerEdgeError(f"--arch {safe_text(arch, 40)}: the native runtime is built for {' or '.join(ARCHES)}; "
                             "pass one of them")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise MixerEdgeError(f"the native runtime is built against the {dist} wheel, which is not installed here: "
                             f"pip install {dist}") from None


def _package_dir(dist: str) -> Path:
    """The directory of an installed wheel's package, found without importing it."""
    _version(dist)
    spec = importlib.util.find_spec(WHEELS[dist])
    if spec is None or spec.origin is None:
        raise MixerEdgeError(f"the {dist} wheel is installed without its {WHEELS[dist]} package: "
                             f"pip install --force-reinstall {dist}")
    return Path(spec.origin).parent


def _dlpack(ffi: Path) -> Path:
    """The include directory of dlpack/dlpack.h inside the apache-tvm-ffi wheel."""
    for include in (ffi / "include", ffi / "3rdparty" / "dlpack" / "include"):
        if (include / "dlpack" / "dlpack.h").is_file():
            return include
    raise MixerEdgeError(f"{ffi} holds no dlpack/dlpack.h: pip install --force-reinstall apache-tvm-ffi")


# ---- compiling ----------------------------------------------------------------------------------------

def build_native(arch: str, backends: tuple[str, ...], out: Path, progress=print) -> NativeBuild:
    """libmixer_edge.so (with the engines of `backends`) and mixer-edge-run for `arch`, in `out`/lib and `out`/bin
    beside the runtime libraries they load. `out` is a directory being staged (package's); the compiled files come
    from the cache when its sources, flags and link inputs were built before."""
    backends = tuple(sorted(set(backends)))
    tools = check_toolchain(arch, backends)
    site = runtime_libraries(arch, progress)
    linked = {name: site / WHEEL_FILES[name] for backend in backends for name in ENGINES[backend].libraries}
    flags = _compile_flags(backends)
    library_sources = [*CORE, *(ENGINES[b].source for b in backends)]
    sources = [*library_sources, RUNNER_SOURCE]
    for source in sources:
        if not (NATIVE / source).is_file():
            raise MixerEdgeError(f"{NATIVE / source} is missing: this mixer-edge's native runtime is incomplete; "
                                 "reinstall mixer-edge")
    key = _digest({"compiler": _run([tools.compiler, "--version"], tools.compiler).splitlines()[0],
                   "flags": flags, "sources": {s: runtime.sha256(NATIVE / s) for s in sources},
                   "headers": {str(h.relative_to(NATIVE)): runtime.sha256(h) for h in sorted(NATIVE.rglob("*.h"))},
                   "linked": {name: runtime.sha256(path) for name, path in linked.items()},
                   "mbedcrypto": runtime.sha256(tools.mbedcrypto)})
    entry = cache_root() / f"{arch}-{'+'.join(backends)}-{key[:16]}"
    if not (NATIVE_BUILD.proves(entry) and (entry / "lib" / LIBRARY).is_file() and (entry / "bin" / RUNNER).is_file()):
        with atomic_dir(entry, NATIVE_BUILD) as stage:
            progress(f"compiling the native runtime for {arch} ({' '.join(backends)}) with {Path(tools.compiler).name}")
            mbedcrypto = _compile(tools, flags, library_sources, linked, stage, progress)
            (stage / NATIVE_BUILD.file).write_text(json_text({"arch": arch, "backends": list(backends), "key": key,
                                                              "mbedcrypto": mbedcrypto}))
    shipped = dict(linked)
    mbedcrypto = json.loads((entry / NATIVE_BUILD.file).read_text())["mbedcrypto"]
    if mbedcrypto != "static":
        shipped[mbedcrypto] = tools.mbedcrypto_shared.resolve()
    (out / "lib").mkdir(parents=True, exist_ok=True)
    (out / "bin").mkdir(exist_ok=True)
    for name, path in {LIBRARY: entry / "lib" / LIBRARY, **shipped}.items():
        shutil.copyfile(path, out / "lib" / name)
    shutil.copyfile(entry / "bin" / RUNNER, out / "bin" / RUNNER)
    build = NativeBuild(arch, backends, out / "lib" / LIBRARY, out / "bin" / RUNNER,
                        tuple(out / "lib" / name for name in shipped))
    _check_closure(build)
    return build


def _compile_flags(backends: tuple[str, ...]) -> list[str]:
    flags = [*CXXFLAGS, *(f"-D{ENGINES[b].define}" for b in backends), f"-I{NATIVE / 'include'}", f"-I{NATIVE / 'src'}"]
    if "cpu" in backends:
        ffi = _package_dir("apache-tvm-ffi")
        includes = [_package_dir("apache-tvm") / "include", ffi / "include", _dlpack(ffi)]
        flags += [f"-I{d}" for d in dict.fromkeys(includes)]
    if "wgpu" in backends:
        flags.append(f"-I{_package_dir('wgpu') / 'resources'}")
    return [*flags, "-idirafter", "/usr/include"]  # HEADERS, after the (cross) compiler's own


def _compile(tools: Toolchain, flags: list[str], library_sources: list[str], linked: dict[str, Path], stage: Path,
             progress) -> str:
    """Compile libmixer_edge.so from `library_sources` into `stage`/lib and the runner into `stage`/bin; returns
    how mbedcrypto was linked: "static", or the name of the shared library that must ship beside the library."""
    (stage / "lib").mkdir()
    (stage / "bin").mkdir()
    library, runner = stage / "lib" / LIBRARY, stage / "bin" / RUNNER
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, path in linked.items():  # linked under the names they have in lib/ (wgpu's has no SONAME)
            (work / name).symlink_to(path)
        objects = {source: work / (Path(source).stem + ".o") for source in [*library_sources, RUNNER_SOURCE]}
        with concurrent.futures.ThreadPoolExecutor(len(objects)) as pool:
            jobs = [pool.submit(_tool, [tools.compiler, *flags, "-c", str(NATIVE / source), "-o", str(obj)],
                                f"compiling {source} for {tools.arch}", progress) for source, obj in objects.items()]
            for job in jobs:
                job.result()
        link = [tools.compiler, "-shared", "-o", str(library), *(str(objects[s]) for s in library_sources),
                f"-Wl,-soname,{LIBRARY}", f"-L{work}", *(f"-l:{name}" for name in linked), "-Wl,--no-undefined",
                "-Wl,-rpath,$ORIGIN"]
        mbedcrypto = "static"
        if not _tool([*link, str(tools.mbedcrypto)], f"linking {LIBRARY} for {tools.arch}", progress,
                     fallback="recompile with -fPIC"):
            if not tools.mbedcrypto_shared.is_file():
                raise MixerEdgeError(f"{tools.mbedcrypto} is not position-independent and there is no "
                                     f"{tools.mbedcrypto_shared} to link instead: reinstall libmbedtls-dev")
            mbedcrypto = _soname(tools.mbedcrypto_shared)
            progress(f"{tools.mbedcrypto} is not position-independent: linking {mbedcrypto} (shipped in lib/)")
            (work / mbedcrypto).symlink_to(tools.mbedcrypto_shared.resolve())
            _tool([*link, f"-l:{mbedcrypto}"], f"linking {LIBRARY} for {tools.arch}", progress)
        _tool([tools.compiler, "-o", str(runner), str(objects[RUNNER_SOURCE]), f"-L{library.parent}", "-lmixer_edge",
               f"-Wl,-rpath-link,{work}", "-Wl,-rpath,$ORIGIN/../lib"], f"linking {RUNNER} for {tools.arch}", progress)
    return mbedcrypto


def _tool(cmd: list[str], what: str, progress, fallback: str | None = None) -> bool:
    """Run a compiler step: True once it succeeded. Its diagnostics go to `progress`, and a failure is one line
    with the first error, except one whose output mentions `fallback`: False (the caller has another way)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    if proc.returncode and fallback is not None and any(fallback in line for line in lines):
        return False
    for line in lines:
        progress(line)
    if proc.returncode:
        first = next((line for line in lines if "error" in line), lines[-1] if lines else f"exit {proc.returncode}")
        raise MixerEdgeError(f"{what} failed ({safe_text(first, 300)}): the compiler's output is above; report it "
                             "with that output")
    return True


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise MixerEdgeError(f"{what} failed ({safe_text(tail[0], 300)})")
    return proc.stdout


def _digest(document: dict) -> str:
    return hashlib.sha256(json_text(document, indent=None).encode()).hexdigest()


def _dynamic(path: Path) -> tuple[list[str], str | None]:
    """(the NEEDED entries, the SONAME or None) of an ELF file."""
    out = _run(["readelf", "-d", str(path)], f"readelf -d {path}")
    soname = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", out)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out), soname and soname[1]


def _soname(path: Path) -> str:
    return _dynamic(path)[1] or path.resolve().name


def _check_closure(build: NativeBuild) -> None:
    """Refuse a build whose binaries are for another arch or load a library that is neither beside them in lib/
    nor on every Linux device (glibc, libstdc++)."""
    lib = build.library.parent
    shipped = {path.name for path in lib.iterdir()}
    for path in (build.runner, *sorted(lib.iterdir())):
        found = runtime.library_arch(path)
        if found != build.arch:
            raise MixerEdgeError(f"{path} is built for {found}, not {build.arch}: report this")
        missing = [name for name in _dynamic(path)[0] if name not in shipped and not SYSTEM_LIBRARY.fullmatch(name)]
        if missing:
            raise MixerEdgeError(f"{path} loads {missing[0]}, which the bundle does not ship (lib/ holds "
                                 f"{', '.join(sorted(shipped))}): report this")


# ---- packaging ----------------------------------------------------------------------------------------

def package(artifact: str | Path, output: str | Path, progress=print, *, arch: str | None = None,
            tar: bool = False) -> Path:
    """Write a bundle of `artifact` (a cpu or wgpu artifact directory or .tar) at `output`, a directory or, with
    `tar` (or a name ending in .tar), a .tar file (`.tar` is added to the name if missing); returns its path.
    `arch`: the device's, for a wgpu artifact (default: this machine's); a cpu artifact's is the one it was built
    for."""
    output = Path(output)
    tar = tar or output.suffix == ".tar"
    if tar and output.suffix != ".tar":
        output = output.with_name(output.name + ".tar")
    if arch is not None:
        _check_arch(arch)
    with runtime.artifact_dir(artifact) as root:
        manifest, record = runtime.verified_manifest(root)
        backend, arch = _target(record, root, Path(artifact), arch)
        check_destination(output, None if tar else BUNDLE, [artifact])
        check_toolchain(arch, (backend,))
        runtime_libraries(arch, progress)  # fetched (once) before anything is written at `output`
        if not tar:
            with atomic_dir(output, BUNDLE, [artifact]) as stage:
                _fill(stage, root, manifest, record, arch, backend, progress)
            return output
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp) / output.stem
            stage.mkdir()
            _fill(stage, root, manifest, record, arch, backend, progress)
            with atomic_file(output, [artifact]) as tmp_tar, tarfile.open(tmp_tar, "w") as archive:
                archive.add(stage, arcname=output.stem)
        return output


def read_bundle(path: str | Path) -> Bundle:
    """The bundle.json of the bundle directory or .tar at `path`, validated."""
    path = Path(path)
    fix = "pass a bundle that `mixer-edge package` wrote"
    try:
        if path.is_dir():
            text = (path / BUNDLE.file).read_bytes()
        else:
            with tarfile.open(path) as archive:
                member = next((m for m in archive.getmembers() if m.isfile() and len(Path(m.name).parts) == 2
                               and Path(m.name).name == BUNDLE.file), None)
                if member is None:
                    raise MixerEdgeError(f"{path} holds no NAME/{BUNDLE.file}: {fix}")
                text = archive.extractfile(member).read()
        document = json.loads(text)
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise MixerEdgeError(f"{path}: its {BUNDLE.file} cannot be read ({reason(exc)}): {fix}") from exc
    return parse(Bundle, document, f"{path}: {BUNDLE.file}", fix)


def _target(record: runtime.Manifest, root: Path, artifact: Path, arch: str | None) -> tuple[str, str]:
    """(backend, arch) of the bundle for `artifact`: refused where the native runtime cannot run it."""
    device = record.target.device
    backend = device.runner.name
    if backend not in ENGINES:
        raise MixerEdgeError(f"{artifact} is a {backend} artifact, but the native runtime runs "
                             f"{', '.join(ENGINES)} artifacts; {NOT_YET.get(backend, 'use the Python runtime (mixer-edge run)')}")
    if not ENGINES[backend].host_code:  # a program or a plan, no CPU code: the board's arch, or --arch, or this one
        arch = arch or device.arch or host_arch()
        if arch not in ARCHES:
            raise MixerEdgeError(f"this machine is {arch}, for which there is no native runtime: pass --arch "
                                 f"{' or '.join(ARCHES)} (the device's)")
        return backend, arch
    if arch is not None and arch != device.arch:
        raise MixerEdgeError(f"--arch {arch}: {artifact} is built for {device.arch}; leave --arch out (a cpu "
                             f"artifact runs on the arch it was compiled for), or compile it for an {arch} target")
    if device.arch not in ARCHES:
        raise MixerEdgeError(f"{artifact} is built for {device.arch}, for which there is no native runtime "
                             f"({' or '.join(ARCHES)}): use the Python runtime")
    found = runtime.library_arch(root / runtime.LIBRARY)
    if found != device.arch:
        raise MixerEdgeError(f"{root / runtime.LIBRARY} is built for {found}, but its manifest says {device.arch}: "
                             "rebuild the artifact")
    return backend, device.arch


def _fill(stage: Path, root: Path, manifest: dict, record: runtime.Manifest, arch: str, backend: str,
          progress) -> None:
    """Write the bundle's files and bundle.json into `stage`."""
    (stage / "artifact").mkdir()
    for name in (runtime.MANIFEST, *record.files):
        shutil.copyfile(root / name, stage / "artifact" / name)
    build_native(arch, (backend,), stage, progress)
    (stage / "include").mkdir()
    shutil.copyfile(NATIVE / "include" / HEADER, stage / "include" / HEADER)
    (stage / "example").mkdir()
    for name in EXAMPLE:
        shutil.copyfile(NATIVE / "example" / name, stage / "example" / name)
    files = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        path.chmod(0o755 if path.parent.name in ("bin", "lib") and path.parent.parent == stage else 0o644)
        files[path.relative_to(stage).as_posix()] = runtime.sha256(path)
    for name, digest in record.files.items():  # what was copied is what was verified
        if files[f"artifact/{name}"] != digest:
            raise MixerEdgeError(f"{root / name} changed while it was copied into the bundle: package it again")
    wheels = {dist: _version(dist) for dist in ENGINES[backend].wheels}
    document = {"format": 1, "arch": arch, "backend": backend,
                "artifact": {"model": record.model.name, "manifest_sha256": manifest["manifest_sha256"]},
                "files": files, "total_bytes": sum((stage / name).stat().st_size for name in files),
                "versions": {"mixer-edge": __version__, **wheels}}
    parse(Bundle, document, f"the {BUNDLE.file} being written", "report this: mixer-edge wrote a bundle description "
          "its own schema refuses")
    (stage / BUNDLE.file).write_text(json_text(document, name=BUNDLE.file))


# ---- the native runner beside the Python runtime -------------------------------------------------------

COST_FIELDS = ("open_ms", "first_inference_ms", "median_ms", "p90_ms", "peak_rss_mib")


class RuntimeCost(Schema):
    """What one runtime costs to run a bundle's artifact on this machine, each field the median over the rounds of
    `compare_runtimes`: a fresh process each round, the input one batch of zeros."""

    runtime: Literal["native", "python"] = Field(description="native: the bundle's bin/mixer-edge-run; python: "
                                                 "mixer_edge.runtime in a fresh interpreter, without torch "
                                                 "(PYTHON_BENCH)")
    open_ms: float = Field(description="loading the artifact: mixer_edge_open, or runtime.load (which imports TVM)")
    first_inference_ms: float = Field(description="the first call on one batch")
    median_ms: float = Field(description="the median of the timed calls after it, each one batch")
    p90_ms: float = Field(description="their 90th percentile")
    peak_rss_mib: float = Field(description="the process's peak resident memory at the end (VmHWM in "
                                "/proc/self/status, which starts afresh at exec)")
    start_to_first_result_ms: float = Field(description="from spawning the process to the first call's logits: "
                                            "start-up, loading and the first inference together")


class _Measured(Schema):
    """The JSON line a timed child process prints (mixer-edge-run --bench N --json, or PYTHON_BENCH)."""

    backend: str
    device: str
    batch: int
    open_ms: float
    first_inference_ms: float
    runs: int
    median_ms: float
    p90_ms: float
    peak_rss_mib: float
    first_result_unix_ms: float


# The Python side, run as `python -c PYTHON_BENCH '{"artifact": ..., "runs": N}'`: load the artifact, time the first
# call and `runs` more of model(x) -- the whole public call, as mixer_edge_run is: the input copied in, the logits
# copied out and checked finite -- on one batch of zeros; print the same JSON line as mixer-edge-run --json.
# torch is kept out, as on a device: the runtime needs only TVM, numpy and pydantic, but tvm_ffi imports torch
# whenever it is installed (as it is beside the compiler), which would double the process's memory and start-up.
PYTHON_BENCH = """\
import json, math, sys, time
sys.modules["torch"] = None  # `import torch` raises ImportError, as where it is not installed
request = json.loads(sys.argv[1])
import numpy as np
from mixer_edge import runtime
from mixer_edge.errors import MixerEdgeError
def percentile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, math.ceil(q * len(v)) - (1 if q > 0 else 0))]
try:
    start = time.perf_counter()
    model = runtime.load(request["artifact"])
    open_ms = (time.perf_counter() - start) * 1e3
    x = np.zeros(model.input_shape, np.float32)
    start = time.perf_counter()
    model(x)
    first_ms = (time.perf_counter() - start) * 1e3
    first_result_unix_ms = time.time() * 1e3
    times = []
    for _ in range(request["runs"]):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
except MixerEdgeError as exc:
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    sys.exit(2)
print(json.dumps({"backend": model.backend.name, "device": str(model.device), "batch": model.batch,
                  "open_ms": open_ms, "first_inference_ms": first_ms, "runs": request["runs"],
                  "median_ms": percentile(times, 0.5), "p90_ms": percentile(times, 0.9),
                  "peak_rss_mib": next(int(line.split()[1]) for line in open("/proc/self/status")
                                       if line.startswith("VmHWM:")) / 1024,
                  "first_result_unix_ms": first_result_unix_ms}))
"""


def compare_runtimes(bundle_dir: Path, runs: int, threads: int | None, repeats: int = 3,
                     progress=print) -> list[RuntimeCost]:
    """The bundle's native runner beside the Python runtime on the bundle's artifact, on this machine: `repeats`
    rounds, each spawning the runner (`--bench runs --json`) and a fresh Python process (PYTHON_BENCH), in turns,
    with the same `threads` (default: the physical cores); [native, python], each field the median over the
    rounds. Measurements for a README, not for an assert on time."""
    bundle_dir = Path(bundle_dir)
    record = read_bundle(bundle_dir)
    if not bundle_dir.is_dir():
        raise MixerEdgeError(f"{bundle_dir} is a .tar: unpack it and pass its directory")
    if record.arch != host_arch():
        raise MixerEdgeError(f"{bundle_dir} is built for {record.arch}, not this machine ({host_arch()}): its "
                             f"runtimes cannot be timed here; run bin/mixer-edge-run --bench N on the device")
    threads = threads or runtime.physical_cores()
    artifact = bundle_dir / "artifact"
    env = {**os.environ, "TVM_NUM_THREADS": str(threads),  # the Python runtime's pool; the runner's --threads
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    commands = {"native": [str(bundle_dir / "bin" / RUNNER), str(artifact), "--bench", str(runs), "--json",
                           "--threads", str(threads)],
                "python": [sys.executable, "-c", PYTHON_BENCH, json.dumps({"artifact": str(artifact), "runs": runs})]}
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    for round_ in range(repeats):
        order = list(commands) if round_ % 2 == 0 else list(reversed(commands))  # neither always goes first
        for name in order:
            cost = _spawn_timed(name, commands[name], env)
            measured[name].append(cost)
            progress(f"round {round_ + 1}/{repeats}, {name}: open {cost['open_ms']:.1f} ms, first inference "
                     f"{cost['first_inference_ms']:.2f} ms, median {cost['median_ms']:.3f} ms of {runs}, peak RSS "
                     f"{cost['peak_rss_mib']:.1f} MiB, spawn to first result "
                     f"{cost['start_to_first_result_ms']:.0f} ms")
    return [RuntimeCost(runtime=name, **{field: statistics.median(cost[field] for cost in costs)
                                         for field in [*COST_FIELDS, "start_to_first_result_ms"]})
            for name, costs in measured.items()]


def _spawn_timed(name: str, cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """The costs one child process reports on its last stdout line, with the time from its spawn to its first
    result."""
    spawned = time.time() * 1e3
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    what = "the native runner" if name == "native" else "the Python runtime"
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise MixerEdgeError(f"{what} failed timing the artifact ({safe_text(tail[0], 300)})")
    try:
        document = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MixerEdgeError(f"{what} printed no JSON line ({safe_text(proc.stdout.strip(), 200)}): report "
                             "this") from None
    line = parse(_Measured, document, f"{what}'s --json line", "report this")
    return {**line.model_dump(include=set(COST_FIELDS)),
            "start_to_first_result_ms": line.first_result_unix_ms - spawned}

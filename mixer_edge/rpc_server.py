"""The board side of remote tuning, profiling and comparing: a TVM RPC server registered with a tracker.

On the board: `python -m mixer_edge.rpc_server --tracker HOST:PORT --key rpi5` (needs only the TVM
runtime wheels and numpy). TVM's stock `python -m tvm.exec.rpc_server` re-executes
`sys.executable` in a worker, which fails under qemu-user and some embedded Pythons; this runs the
server in process. It also loads `libtvm_runtime_extra.so`, without which every MetaSchedule
measurement fails (`random_fill_for_measure` is missing from the plain runtime), and serves `profile` and
`compare` (`mixer_edge.inside`: runs the uploaded artifact with mixer_edge.runtime, which needs pydantic too).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path


def serve(tracker_host: str, tracker_port: int, key: str, host: str = "0.0.0.0", port: int = 9090,
          port_end: int = 9199) -> None:
    """Serve until killed."""
    import tvm
    from tvm.rpc import server

    extra = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_extra.so"
    if extra.exists():
        ctypes.CDLL(str(extra), ctypes.RTLD_GLOBAL)
    tvm.register_global_func(INSIDE_FUNCTION, inside, override=True)
    server._popen_start_rpc_server(host, port, port_end, tracker_addr=(tracker_host, tracker_port), key=key)
    state = server.PopenRPCServerState.current
    print(f"rpc server on {host}:{state.port}, registered as '{key}' with {tracker_host}:{tracker_port}", flush=True)
    state.thread.join()


INSIDE_FUNCTION = "mixer_edge.inside"  # what `profile` and `compare` call over RPC


def inside(job_json: str) -> str:
    """`profile`/`compare` over RPC: the uploaded artifact files gathered into one directory, then
    layers.board_job; returns the refusal of a MixerEdgeError ('' when it ran)."""
    import json
    import os

    from mixer_edge.errors import MixerEdgeError
    from mixer_edge.layers import board_job

    job = json.loads(job_json)
    root = Path(job["artifact"])
    root.mkdir(exist_ok=True)
    for name, path in job.pop("files").items():
        os.replace(path, root / Path(name).name)
    try:
        board_job(job)
    except MixerEdgeError as exc:
        return str(exc)
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixer_edge.rpc_server", description=__doc__.splitlines()[0])
    p.add_argument("--tracker", required=True, help="HOST:PORT of the TVM RPC tracker")
    p.add_argument("--key", required=True, help="the key to register under (tuning passes the same --rpc-key)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=9090, help="first port to try")
    p.add_argument("--port-end", type=int, default=9199, help="last port to try")
    args = p.parse_args(argv)
    host, _, port = args.tracker.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--tracker '{args.tracker}' should be HOST:PORT")
    serve(host, int(port), args.key, args.host, args.port, args.port_end)
    return 0


if __name__ == "__main__":
    sys.exit(main())

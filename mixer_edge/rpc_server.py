"""The board side of remote tuning: a TVM RPC server registered with a tracker.

On the board: `python -m mixer_edge.rpc_server --tracker HOST:PORT --key rpi5` (needs only the TVM
runtime wheels and numpy). TVM's stock `python -m tvm.exec.rpc_server` re-executes
`sys.executable` in a worker, which fails under qemu-user and some embedded Pythons; this runs the
server in process. It also loads `libtvm_runtime_extra.so`, without which every MetaSchedule
measurement fails (`random_fill_for_measure` is missing from the plain runtime).
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
    server._popen_start_rpc_server(host, port, port_end, tracker_addr=(tracker_host, tracker_port), key=key)
    state = server.PopenRPCServerState.current
    print(f"rpc server on {host}:{state.port}, registered as '{key}' with {tracker_host}:{tracker_port}", flush=True)
    state.thread.join()


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

"""Command line: `python -m lab.pvesim serve --state FILE [--config FILE] [--backend memory|docker] [--host H --port P] [--daemon --pidfile F]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from .backend import MemoryBackend
from .config import load_config
from .docker_backend import DockerBackend
from .server import Simulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.pvesim", description="Proxmox VE API simulator")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the Proxmox API over HTTPS")
    serve.add_argument("--config", type=Path, help="YAML or JSON configuration (default: the built-in lab cluster)")
    serve.add_argument("--state", type=Path, required=True, help="state file; VMs persist in it across restarts")
    serve.add_argument("--state-dir", type=Path, help="where ca.pem, the server certificate and admin-token go (default: the state file's directory)")
    serve.add_argument(
        "--backend",
        choices=("memory", "docker"),
        default="memory",
        help="memory: VMs are state only; docker: a started VM is a lab node container (needs the lab network from lab/up.sh)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8006)
    serve.add_argument("--daemon", action="store_true", help="detach and run in the background")
    serve.add_argument("--pidfile", type=Path, help="write the server's process id here")
    serve.add_argument("--log", type=Path, help="with --daemon: where output goes (default: /dev/null)")
    return parser


def _daemonize(log: Path | None) -> None:
    """Classic double fork: the caller returns once the server process is detached."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    output = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    source = os.open(os.devnull, os.O_RDONLY)
    os.dup2(source, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)


async def _serve(simulator: Simulator, host: str, port: int) -> None:
    runner, bound_port = await simulator.serve(host, port)
    print(f"pvesim listening on https://{host}:{bound_port}/api2/json (CA file: {simulator.certificates.ca_file})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = load_config(args.config)
    state_file = args.state.resolve()
    state_dir = (args.state_dir or state_file.parent).resolve()
    backend = asyncio.run(DockerBackend.from_lab_settings()) if args.backend == "docker" else MemoryBackend()
    simulator = Simulator(config, state_dir, state_file=state_file, backend=backend)
    if args.daemon:
        _daemonize(args.log)
    if args.pidfile:
        args.pidfile.write_text(f"{os.getpid()}\n", encoding="utf-8")
    try:
        asyncio.run(_serve(simulator, args.host, args.port))
    finally:
        if args.pidfile:
            with contextlib.suppress(FileNotFoundError):
                args.pidfile.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torpord: configure → start (listen, then READY) → serve → drain → exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import structlog
import uvloop
from torpor.socketpath import UnsafeSocketDir

from torpord import __version__, systemd
from torpord.backends.base import Backend
from torpord.backends.factory import BackendUnavailable, build_backend
from torpord.config import Config, ConfigError, Overrides, default_config_toml, load_config
from torpord.core.activityfile import HistoryFile, HistoryKeeper
from torpord.core.attachments.registry import AgentRegistry
from torpord.core.catalogue import Entry
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.errors import InvalidArgument
from torpord.logs import configure_logging
from torpord.metrics import MetricsServer, serve_metrics
from torpord.server.app import (
    DaemonAlreadyRunning,
    build_server,
    prepare_socket_dir,
    set_serving,
)
from torpord.server.fdsocket import FdServer
from torpord.storage.diskcache import DiskCache, UnsafeCacheDir
from torpord.storage.layers import LayerPatterns
from torpord.storage.pipeline import ReadOptions

__all__ = ["main"]

log = structlog.get_logger("torpord")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torpord",
        description="Torpor node daemon: owns device and pinned host memory and manages model"
        " weights (Load, Sleep, Wake, Offload, Unload) over gRPC.",
    )
    p.add_argument("--config", type=Path, help="TOML config file (default: embedded defaults)")
    p.add_argument("--socket", type=Path, help="Unix socket to listen on (overrides server.socket)")
    p.add_argument("--tcp", help='also listen on HOST:PORT (overrides server.tcp; "" turns it off)')
    p.add_argument("--backend", choices=("auto", "host", "cuda"), help="overrides backend.kind")
    p.add_argument(
        "--allowed-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory model sources may come from; repeatable (replaces sources.allowed_roots)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--print-default-config", action="store_true", help="print the default config and exit"
    )
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--version", action="version", version=f"torpord {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.print_default_config:
        sys.stdout.write(default_config_toml())
        return 0
    try:
        config = load_config(
            args.config,
            Overrides(
                socket=args.socket,
                tcp=args.tcp,
                backend=args.backend,
                allowed_roots=tuple(args.allowed_root),
                log_level=args.log_level,
            ),
        )
    except ConfigError as err:
        print(f"torpord: {err}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"torpord: {args.config or 'embedded defaults'}: ok")
        return 0
    configure_logging(config.log.level, config.log.format)
    # systemd's watchdog ends a stalled daemon with SIGABRT: each thread's
    # stack goes to stderr (the journal) first, to show where it was stuck.
    faulthandler.enable()
    daemon = Daemon(config)
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    code = runner.run(daemon.run())
    if daemon.abandoned:
        # Closing the loop would wait for the work left behind (it never
        # returns), and so would the interpreter's exit: leave now.
        _exit_now(code)
    runner.close()
    stuck = _blocked_threads(timeout=THREAD_EXIT_WAIT)
    if stuck:
        log.error("threads still blocked at exit; not waiting for them", threads=stuck)
        _exit_now(code)
    return code


# How long the io threads may take to finish their last piece at exit.
THREAD_EXIT_WAIT = 2.0
# Of the grace period, what is kept for rolling back what didn't finish in time.
ROLLBACK_RESERVE = 2.0


def _blocked_threads(timeout: float) -> list[str]:
    """Threads other than this one still running after `timeout` seconds in
    all (the interpreter's exit would wait for them forever)."""
    deadline = time.monotonic() + timeout
    left = []
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread.name)
    return left


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _catalogue(cfg: Config, backend: Backend) -> tuple[Entry, ...]:
    """The config's [[catalogue]] entries, each device resolved on `backend`."""
    entries = []
    for index, e in enumerate(cfg.catalogue):
        try:
            device = backend.resolve_device(e.device) if e.device else ""
        except InvalidArgument as err:
            where = str(cfg.file or "<defaults>")
            raise ConfigError(where, f"catalogue[{index}].device", err.message) from None
        entries.append(Entry(e.model_id, e.source, device, e.policy))
    return tuple(entries)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._signals = 0
        # The sockets this daemon listens on (a forced exit still removes them).
        self._sockets: list[Path] = []
        # True when the shutdown left work behind that can't be waited for.
        self.abandoned = False

    async def run(self) -> int:
        cfg = self.config
        if not self._prepare_listeners():
            return 1
        try:
            disk = (
                DiskCache(cfg.disk_cache.path, cfg.disk_cache.capacity)
                if cfg.disk_cache.path
                else None
            )
        except UnsafeCacheDir as err:  # (checked before the backend pins anything)
            log.error("cannot start", error=f"{cfg.file or '<defaults>'}: disk_cache.path: {err}")
            return 2
        try:
            history = HistoryFile(cfg.policy.history) if cfg.policy.history else None
        except UnsafeCacheDir as err:
            log.error("cannot start", error=f"{cfg.file or '<defaults>'}: policy.history: {err}")
            return 2
        systemd.status("starting the backend (a GPU host pins its host pool now)")
        try:
            backend, why = build_backend(cfg)
        except BackendUnavailable as err:
            log.error("cannot start", error=str(err))
            return 1
        try:
            catalogue = _catalogue(cfg, backend)
        except ConfigError as err:  # (a device only the backend knows)
            log.error("cannot start", error=str(err))
            backend.close()
            return 2
        manager = ModelManager(
            backend,
            ManagerSettings(
                allowed_roots=cfg.sources.allowed_roots,
                patterns=LayerPatterns(cfg.layers.block_patterns, cfg.layers.post_patterns),
                alignment=cfg.layers.alignment,
                read=ReadOptions(cfg.io.chunk_size, cfg.io.threads, cfg.io.direct),
                policy=cfg.policy.settings,
                policy_interval=cfg.policy.interval,
                acquire_patience=cfg.policy.acquire_patience,
                acquire_hold=cfg.policy.acquire_hold,
                catalogue=catalogue,
                scrub_rate=cfg.scrub.rate,
                scrub_interval=cfg.scrub.interval,
            ),
            disk=disk,
        )
        # Before anything listens: no request may meet an image half restored.
        await manager.restore_images()
        keeper = HistoryKeeper(history, manager.activity) if history else None
        if keeper is not None:  # (after the images: their ids are known then)
            keeper.restore()
        socket_path = cfg.server.socket
        fd_socket = socket_path.with_name(socket_path.name + ".fds")
        agents = AgentRegistry(
            manager,
            quiesce_timeout=cfg.agents.quiesce_timeout,
            on_quiesce_timeout=cfg.agents.on_quiesce_timeout,
        )
        manager.use_engines(agents)
        metrics: MetricsServer | None = None
        if cfg.metrics.listen:
            try:
                _, metrics = await serve_metrics(
                    manager, cfg.metrics.listen, cfg.metrics.keep_unloaded
                )
            except OSError as err:
                log.error(
                    "cannot listen",
                    error=f"{cfg.file or '<defaults>'}: metrics.listen {cfg.metrics.listen}:"
                    f" {err.strerror or err}",
                )
                backend.close()
                return 1
        try:
            server, health = build_server(
                manager,
                socket_path=socket_path,
                tcp=cfg.server.tcp,
                agents=agents,
                fd_socket=fd_socket,
                backend_reason=why,
                tcp_auth=cfg.server.tcp_auth,
            )
            fds = FdServer(agents, fd_socket, asyncio.get_running_loop())
        except (DaemonAlreadyRunning, OSError, RuntimeError) as err:
            log.error("cannot listen", socket=str(socket_path), tcp=cfg.server.tcp, error=str(err))
            if metrics is not None:
                await metrics.close()
            backend.close()
            return 1
        await server.start()
        self._sockets = [socket_path, fd_socket]
        os.chmod(socket_path, cfg.server.socket_mode)
        fds.start(cfg.server.socket_mode)
        if metrics is not None:
            await metrics.start()
        await set_serving(health, True)
        self._install_signals()
        log.info(
            "torpord ready",
            version=__version__,
            socket=str(socket_path),
            tcp=cfg.server.tcp,
            tcp_auth=cfg.server.tcp_auth.mode if cfg.server.tcp_auth else None,
            metrics=cfg.metrics.listen,
            backend=backend.kind,
            backend_reason=why,
            devices=[d.uuid for d in backend.devices()],
            host_pool_bytes=backend.host_pool().capacity,
            config=str(cfg.file) if cfg.file else "embedded defaults",
            pid=os.getpid(),
        )
        systemd.ready(f"listening on {socket_path}")
        # From READY=1 (when systemd arms it) until the exit, drain included.
        watchdog = systemd.Watchdog.from_env()
        if watchdog is not None:
            watchdog.start()
        manager.pilot.start()  # (it does nothing while the policy layer is off)
        if manager.scrubber is not None:
            manager.scrubber.start()
        if keeper is not None:
            keeper.start()
        await self._stop.wait()

        # Everything below ends within the grace period, whatever it waits
        # for (an engine that doesn't answer, a read that never returns);
        # the last ROLLBACK_RESERVE seconds of it are for rolling back.
        grace = cfg.server.grace_period
        deadline = time.monotonic() + grace
        reserve = min(ROLLBACK_RESERVE, grace / 4)

        def left(keep: float = 0.0) -> float:
            return max(0.0, deadline - time.monotonic() - keep)

        log.info("stopping: draining in-flight calls", grace_seconds=grace)
        systemd.stopping("draining")
        await set_serving(health, False)
        if metrics is not None:  # (it reads the models, which are about to go)
            await metrics.close()
        await manager.pilot.stop()  # no policy starts anything while the daemon drains
        manager.bus.close()  # end Watch streams, so they do not hold the grace period
        # Engines let go of the weights before they are freed.
        await agents.shutdown(timeout=left(reserve))
        await server.stop(left(reserve))
        fds.close()
        if keeper is not None and not await keeper.close(left(reserve)):
            self.abandoned = True  # (its thread may be stuck in the write: don't join it)
        clean = await manager.close(left(reserve), rollback=min(reserve, left()))
        if clean:
            backend.close()
        else:  # (a worker may still be writing into a slab: the exit frees it all)
            self.abandoned = True
        self._remove_sockets()
        log.info("stopped", clean=clean)
        if watchdog is not None:
            await watchdog.stop()
        return 0

    def _remove_sockets(self) -> None:
        for path in self._sockets:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _prepare_listeners(self) -> bool:
        """Before the backend (minutes on a GPU host): refuse what would make
        the listeners unsafe, and make the socket's directory."""
        server = self.config.server
        try:
            prepare_socket_dir(server.socket.parent, server.socket_mode)
        except UnsafeSocketDir as err:
            log.error(
                f"refusing the socket directory {err.directory}: it {err.why}; whoever can"
                " change it can put their own socket in torpord's place. Remove it, or set"
                " server.socket (--socket) to a socket in a directory of torpord's user",
                socket=str(server.socket),
            )
            return False
        except OSError as err:
            log.error("cannot listen", socket=str(server.socket), error=str(err))
            return False
        if server.tcp and server.tcp_auth is not None and server.tcp_auth.insecure:
            log.warning(
                f"the TCP listener asks for no credentials (server.tcp_insecure = true):"
                f" everyone who can connect to {server.tcp} may load, sleep and unload models",
                tcp=server.tcp,
            )
        return True

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, dump_stacks)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now", signal=sig.name)
            self._remove_sockets()
            _exit_now(1)
        log.info("signal received", signal=sig.name)
        self._stop.set()


def dump_stacks() -> None:
    """Log the stack of every asyncio task and every thread (SIGUSR1)."""
    tasks = []
    for task in asyncio.all_tasks():
        # Not Task.print_stack: it fails on frames without a line number
        # (grpc's Cython coroutines have those).
        frames = [
            f"  {f.f_code.co_filename}:{f.f_lineno or '?'} in {f.f_code.co_name}"
            for f in task.get_stack()
        ]
        tasks.append("\n".join([f"{task.get_name()}: {task.get_coro()!r}", *frames]))
    current = sys._current_frames()
    threads = {
        f"{t.name} ({t.ident})": "".join(traceback.format_stack(current[t.ident]))
        for t in threading.enumerate()
        if t.ident is not None and t.ident in current
    }
    log.info("stacks", task_count=len(tasks), tasks=tasks, threads=threads)


if __name__ == "__main__":
    sys.exit(main())

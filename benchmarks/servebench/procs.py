"""Start a server in a process group of its own, sample its memory, and always stop it by its pid.

The server is the leader of a new session (its pid is its process group id); stopping sends SIGTERM
to that group, waits, then SIGKILL to the group and to any process of its tree seen while it ran
(a child that left the group). Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from servebench.configs import ServerConfig

# vLLM's words for an engine that will not come up.
FATAL_MARKERS = ("EngineCore failed to start", "Engine core initialization failed")


class BenchInterrupted(Exception):
    """SIGTERM or SIGHUP arrived: unwind so that every finally block stops its server."""


# Signals that came while a server was being stopped (signals_deferred), handled afterwards.
_held: list[int] = []
_holding = 0


def _interrupt(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise BenchInterrupted(f"signal {signal.Signals(signum).name}")


def raise_on_signals() -> None:
    """Turn SIGTERM/SIGHUP into an exception, and make SIGINT raise KeyboardInterrupt even where
    it was ignored (a shell starts background jobs with SIGINT ignored); while a server is being
    stopped (signals_deferred) they are held instead."""

    def handler(signum: int, _frame: object) -> None:
        if _holding:
            _held.append(signum)
        else:
            _interrupt(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the signals of raise_on_signals while stopping a server: a second signal (a supervisor
    that repeats its SIGTERM) must not cut the stop short and leave the server running. The first
    signal that came meanwhile interrupts the run once the outermost block is done."""
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if not _holding and _held:
            signum = _held[0]
            _held.clear()
            _interrupt(signum)


def require_free_port(port: int) -> None:
    """Fail clearly when something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers do: connections of an earlier server in TIME_WAIT do not block the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise SystemExit(
                f"port {port} on 127.0.0.1 is taken ({e.strerror}): stop what uses it or choose"
                " other ports with --base-port"
            ) from e


def tree_memory(
    root: psutil.Process, with_pss: bool = True
) -> tuple[int | None, int, dict[int, psutil.Process]]:
    """Summed PSS (None unless with_pss) and RSS of a process and its descendants.

    RSS comes from /proc/PID/statm (cheap); PSS from /proc/PID/smaps_rollup, which makes the kernel
    walk the page tables: ~0.1 s for a vLLM server holding 5 GB, so it is read less often.
    """
    pss = rss = 0
    pids: dict[int, psutil.Process] = {}
    procs = [root]
    with contextlib.suppress(psutil.Error):
        procs += root.children(recursive=True)
    for proc in procs:
        try:
            if with_pss:
                info = proc.memory_full_info()
                pss += getattr(info, "pss", info.rss)
                rss += info.rss
            else:
                rss += proc.memory_info().rss
            pids[proc.pid] = proc
        except psutil.Error:
            continue
    return (pss if with_pss else None), rss, pids


class MemorySampler(threading.Thread):
    """Samples the server tree's RSS every `interval` seconds and its PSS every `pss_every`-th
    sample (and whenever sample() is called); keeps the peaks and the last values."""

    def __init__(self, pid: int, interval: float = 1.0, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self.peak_pss = self.peak_rss = self.last_pss = self.last_rss = 0
        # every process of the tree seen, as psutil objects: kill() refuses a reused pid
        self.pids: dict[int, psutil.Process] = {pid: self.root}
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def sample(self, with_pss: bool = True) -> tuple[int, int]:
        """Take one sample now; return (pss, rss) (pss: the last one read, unless with_pss)."""
        pss, rss, pids = tree_memory(self.root, with_pss)
        with self._lock:
            self.pids.update(pids)
            self.last_rss = rss
            self.peak_rss = max(self.peak_rss, rss)
            if pss is not None:
                self.last_pss = pss
                self.peak_pss = max(self.peak_pss, pss)
            return self.last_pss, rss

    def run(self) -> None:
        """Sample until stopped."""
        count = 0
        while not self._stop_event.is_set():
            self.sample(with_pss=count % self.pss_every == 0)
            count += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop_event.set()
        self.join(timeout=5)


def _preexec(nofile: int | None) -> Callable[[], None] | None:
    """Raise the open-files soft limit in the child, as the unit's LimitNOFILE does."""
    if nofile is None:
        return None

    def apply() -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))

    return apply


def _get(url: str, timeout: float = 2.0) -> int:
    """HTTP status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return 0


class Server:
    """One running server: `with Server(config, log) as s:` starts it; leaving stops it."""

    def __init__(self, config: ServerConfig, logfile: Path) -> None:
        self.config = config
        self.logfile = logfile
        self.proc: psutil.Popen | None = None
        self.sampler: MemorySampler | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        """Base URL of the server (loopback)."""
        return f"http://127.0.0.1:{self.config.port}"

    def __enter__(self) -> Server:
        require_free_port(self.config.port)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.config.cwd.mkdir(parents=True, exist_ok=True)
        out = self.logfile.open("wb")
        out.write(f"$ {' '.join(self.config.argv)}\n".encode())
        out.flush()
        self.started_at = time.monotonic()
        try:
            self.proc = psutil.Popen(
                self.config.argv,
                env=self.config.env,
                cwd=self.config.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # own process group: pgid == pid
                preexec_fn=_preexec(self.config.nofile),
            )
        finally:
            out.close()
        self.sampler = MemorySampler(self.proc.pid)
        self.sampler.start()
        return self

    def wait_healthy(self, timeout: float) -> float:
        """Seconds from start until /health answers 200; fails when the process exits first."""
        assert self.proc is not None
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.config.name} exited with {self.proc.returncode} before /health"
                    f" answered; last lines of {self.logfile}:\n{self.log_tail()}"
                )
            if _get(self.url + "/health") == 200:
                return time.monotonic() - self.started_at
            fatal = self.fatal_in_log()
            if fatal:
                raise RuntimeError(
                    f"{self.config.name} failed to start ({fatal}); last lines of"
                    f" {self.logfile}:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        raise RuntimeError(
            f"{self.config.name}: no /health within {timeout:.0f} s; last lines of"
            f" {self.logfile}:\n{self.log_tail()}"
        )

    def fatal_in_log(self) -> str:
        """A line of the log saying start-up failed for good (vLLM's API server can stay alive
        after its engine process died), else ""."""
        with contextlib.suppress(OSError), self.logfile.open(errors="replace") as f:
            for line in f:
                if any(marker in line for marker in FATAL_MARKERS):
                    return line.strip()[-200:]
        return ""

    def log_tail(self, lines: int = 12) -> str:
        """The first error line of the server's log (the root cause), then its last lines."""
        text = self.logfile.read_text(errors="replace").splitlines()
        cause = next((line for line in text if re.search(r"\b\w+Error: ", line)), "")
        return (f"root cause: {cause.strip()}\n" if cause else "") + "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM to the process group, wait, then SIGKILL to the group and every pid seen."""
        if self.proc is None:
            return
        with signals_deferred():
            self._stop()

    def _stop(self) -> None:
        assert self.proc is not None
        seen = dict(self.sampler.pids) if self.sampler else {}
        if self.sampler:
            self.sampler.stop()
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(psutil.TimeoutExpired):
            self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(psutil.TimeoutExpired):
            self.proc.wait(timeout=10)
        for pid, proc in seen.items():
            if pid == pgid:
                continue
            with contextlib.suppress(psutil.Error):
                proc.kill()  # psutil checks the pid still names the process it saw
                proc.wait(timeout=10)
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()

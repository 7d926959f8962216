"""Real background contention for training scenarios and tests: busy-loop processes and memory ballast.

Why processes, not threads: the contention must be outside the process being measured (and
outside its GIL), the way another program on the machine would be. Each worker is this file
run as a script with the interpreter that imported it, so it starts without the caller's
imports (no torch, no model) and exits by itself if its parent dies.

    with LoadGenerator(LoadLevel(workers=2, duty=0.6, ballast_mib=512)):
        ...   # generate under load

Manual use: ``python load_generator.py --workers 2 --duty 0.6 --ballast-mib 512 --seconds 30``.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

PAGE = 4096
READY = "ready"


@dataclass(frozen=True)
class LoadLevel:
    """How much contention: ``workers`` busy loops each spinning ``duty`` of every ``period_s``,
    plus ``ballast_mib`` of resident memory held by one more process. With ``stream_mib`` > 0 a
    worker's busy time copies a buffer of that size back and forth instead of spinning: decoding is
    memory-bound, so bandwidth taken from it slows it even on another core."""
    workers: int = 1
    duty: float = 1.0
    ballast_mib: int = 0
    period_s: float = 0.05
    stream_mib: int = 0

    def __post_init__(self) -> None:
        if self.workers < 0 or self.ballast_mib < 0 or self.stream_mib < 0:
            raise ValueError(f"workers, ballast_mib and stream_mib must be >= 0, got {self.workers}, "
                             f"{self.ballast_mib}, {self.stream_mib}")
        if not 0.0 <= self.duty <= 1.0:
            raise ValueError(f"duty must be in [0, 1], got {self.duty}")
        if self.period_s <= 0:
            raise ValueError(f"period_s must be positive, got {self.period_s}")


class LoadGenerator:
    """Starts the load on ``start()``/``with``, stops it on ``stop()`` or leaving ``with``, even
    when the body raises. ``start()`` returns once every worker runs and the ballast is resident."""

    def __init__(self, level: LoadLevel) -> None:
        self.level = level
        self._procs: list[subprocess.Popen[str]] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> LoadGenerator:
        if self._procs:
            return self
        lv = self.level
        available_mib = psutil.virtual_memory().available >> 20
        if lv.ballast_mib > 0.9 * available_mib:      # leave the OOM killer nothing to choose
            raise MemoryError(f"ballast of {lv.ballast_mib} MiB exceeds 90% of the {available_mib} MiB available")
        try:
            if lv.duty > 0:
                for _ in range(lv.workers):
                    self._spawn("spin", "--duty", str(lv.duty), "--period", str(lv.period_s),
                                "--stream-mib", str(lv.stream_mib))
            if lv.ballast_mib > 0:
                self._spawn("ballast", "--mib", str(lv.ballast_mib))
            for proc in self._procs:
                if proc.stdout.readline().strip() != READY:
                    raise RuntimeError(f"load worker {proc.pid} failed to start (exit code {proc.wait()})")
        except BaseException:
            self.stop()
            raise
        log.info("load on: %s (pids %s)", lv, self.pids)
        return self

    def _spawn(self, role: str, *args: str) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--parent", str(os.getpid()), *args]
        self._procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate every worker, kill those that do not exit in time, and reap them all."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._procs:
            log.info("load off")
        self._procs = []

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Worker side (this file run as a script)
# ---------------------------------------------------------------------------------------------


def spin(duty: float, period_s: float, parent: int, stream_mib: int = 0) -> None:
    """Busy for ``duty`` of each period, asleep for the rest, until the parent goes away; busy
    means copying ``stream_mib`` MiB between two buffers when given (memory traffic), else spinning."""
    half = (stream_mib << 20) // 2
    src, dst = bytearray(b"\x01" * half), bytearray(half)
    while os.getppid() == parent:
        start = time.perf_counter()
        busy_until = start + duty * period_s
        while time.perf_counter() < busy_until:
            if half:
                dst[:] = src
                src, dst = dst, src
        rest = start + period_s - time.perf_counter()
        if rest > 0:
            time.sleep(rest)


def hold_ballast(mib: int, parent: int) -> bytearray:
    """Allocate ``mib`` MiB and write every page so it is resident, then hold it."""
    ballast = bytearray(mib << 20)
    ballast[::PAGE] = b"\x01" * len(range(0, len(ballast), PAGE))
    print(READY, flush=True)
    while os.getppid() == parent:
        time.sleep(0.2)
    return ballast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("spin", "ballast"), help="internal: run one worker")
    parser.add_argument("--parent", type=int, help="internal: exit when this process goes away")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duty", type=float, default=1.0)
    parser.add_argument("--period", type=float, default=0.05)
    parser.add_argument("--mib", "--ballast-mib", dest="mib", type=int, default=0)
    parser.add_argument("--stream-mib", type=int, default=0, help="busy time copies this much memory")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the manual load runs")
    args = parser.parse_args(argv)
    if args.role == "spin":
        print(READY, flush=True)
        spin(args.duty, args.period, args.parent, args.stream_mib)
    elif args.role == "ballast":
        hold_ballast(args.mib, args.parent)
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        with LoadGenerator(LoadLevel(args.workers, args.duty, args.mib, args.period, args.stream_mib)):
            time.sleep(args.seconds)


if __name__ == "__main__":
    main()

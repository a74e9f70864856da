"""CPU and memory accounting for the throughput benchmark.

How "CPU outside the model" is measured (the same way for every row):

* **process CPU** is the benchmark process's user + system time over the measured interval
  (``psutil.Process().cpu_times()``), plus that of its live child processes (the decode pool
  with ``--decode-pool processes``), never the moto server's, which is counted on its own;
* **model CPU** is the CPU the forward passes cost, from two sources: the calling thread's
  ``time.thread_time()`` spent inside ``Backbone.submit`` and ``PendingFeatures.result`` (the
  backbone instance is wrapped, the consumer's code is not changed), plus the CPU of every
  thread that has no Python ``threading.Thread`` object: those are torch's intra-op (OpenMP)
  workers, which only the model uses. Per-thread times are the kernel's nanosecond run times
  (``/proc/self/task/<tid>/schedstat``), read at the start and the end of the interval: the
  10 ms ticks of ``/proc/<tid>/stat`` (what ``psutil`` reads) round a light thread's share of a
  short window to nothing;
* **outside the model** is process CPU minus model CPU: decode, AWS calls (botocore, HTTP, SSL),
  serialisation and the pipeline's bookkeeping. The same per-thread times, grouped by thread name
  (``fetch``, ``decode``, ``write``, ``receive``, ``ack``, ``infer``...), say where it went;
  what no live thread accounts for (threads that exited, the process's tick rounding) is
  ``unattributed``.
  The benchmark's own threads (the memory sampler; in the end-to-end row the main thread, which
  only polls for completion) are left out of every figure.

Peak resident memory is sampled every 50 ms (this process, plus the decode processes if any);
``resource.getrusage`` only knows the peak over the process's whole life.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

NATIVE_GROUP = "model-native"
"""Threads without a Python object: torch's intra-op workers (counted as model CPU)."""
S3_NATIVE_GROUP = "s3-native"
"""obstore's Rust I/O threads (tokio, no Python object either): S3 work, not the model's."""


def python_threads() -> dict[int, str]:
    """Native id -> name of the threads Python started. A native thread that once ran Python
    (obstore calls a credential provider on its tokio threads, and logging there registers the
    thread) shows in ``threading.enumerate()`` as a ``_DummyThread``; it is left out, so that its
    CPU is grouped by :func:`native_group` as every other native thread's."""
    return {
        t.native_id: t.name
        for t in threading.enumerate()
        if t.native_id is not None and not isinstance(t, threading._DummyThread)
    }


def native_group(tid: int) -> str:
    """The group of a thread Python does not know, by its kernel name: tokio's workers (the
    native S3 client) are named ``tokio-rt-worker``, torch's are named after the process."""
    try:
        with open(f"/proc/self/task/{tid}/comm") as comm:
            name = comm.read().strip()
    except OSError:  # gone, or not Linux
        return NATIVE_GROUP
    return S3_NATIVE_GROUP if name.startswith("tokio") else NATIVE_GROUP


def task_schedstat() -> dict[int, tuple[float, float]]:
    """Per thread of this process: (seconds run on a CPU, seconds waited for one), in the
    kernel's nanoseconds; empty where the kernel keeps no schedstat (not Linux)."""
    times: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                run, wait, _ = task.joinpath("schedstat").read_text().split()
                times[int(task.name)] = (int(run) / 1e9, int(wait) / 1e9)
    return times


def thread_cpu_seconds(process: psutil.Process) -> dict[int, float]:
    """CPU seconds per thread of this process: exact from schedstat, else psutil's ticks."""
    exact = task_schedstat()
    if exact:
        return {tid: run for tid, (run, _) in exact.items()}
    return {t.id: t.user_time + t.system_time for t in process.threads()}


class ModelClock:
    """Accumulates the calling threads' CPU time spent in a backbone's forward passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds

    def read(self) -> float:
        with self._lock:
            return self.seconds

    def attach(self, backbone: Any) -> None:
        """Time ``backbone.submit`` and the ``result()`` of what it returns, per calling thread.

        The wrapper is an instance attribute, so ``Backbone.__call__`` and the consumer's
        inference thread both go through it; :meth:`detach` removes it.
        """
        original: Callable[[Any], Any] = type(backbone).submit.__get__(backbone)

        def submit(batch: Any) -> _TimedPending:
            started = time.thread_time()
            try:
                pending = original(batch)
            finally:
                self.add(time.thread_time() - started)
            return _TimedPending(pending, self)

        backbone.submit = submit

    @staticmethod
    def detach(backbone: Any) -> None:
        backbone.__dict__.pop("submit", None)


class _TimedPending:
    """A ``PendingFeatures`` whose ``result()`` wait is charged to the model."""

    def __init__(self, pending: Any, clock: ModelClock) -> None:
        self.pending = pending
        self.clock = clock

    def result(self) -> np.ndarray:
        started = time.thread_time()
        try:
            return np.asarray(self.pending.result())
        finally:
            self.clock.add(time.thread_time() - started)


def thread_group(name: str) -> str:
    """``fetch_3`` -> ``fetch``, ``receive-0`` -> ``receive``, ``MainThread`` -> ``main``."""
    if name == "MainThread":
        return "main"
    return re.sub(r"[-_]\d+$", "", name) or name


@dataclass
class _Snapshot:
    wall: float
    process: float
    children: float
    excluded: float
    machine_busy: float
    threads: dict[int, float]
    names: dict[int, str]


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores: total minus idle)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass
class CpuReport:
    """CPU seconds over one measured interval."""

    wall_s: float
    process_s: float
    children_s: float
    model_s: float
    by_group: dict[str, float] = field(default_factory=dict)
    overhead_s: float = 0.0
    foreign_s: float = 0.0

    @property
    def foreign_share(self) -> float:
        """Share of the machine's CPU capacity other processes used (contention warning)."""
        capacity = self.wall_s * (psutil.cpu_count() or 1)
        return self.foreign_s / capacity if capacity > 0 else 0.0

    @property
    def total_s(self) -> float:
        """CPU of the work measured: process and decode processes, less the benchmark's own."""
        return max(0.0, self.process_s + self.children_s - self.overhead_s)

    @property
    def outside_model_s(self) -> float:
        return max(0.0, self.total_s - self.model_s)


class CpuMeter:
    """Process, child-process and per-thread CPU between :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        clock: ModelClock,
        exclude_pids: Iterable[int] = (),
        overhead_groups: Iterable[str] = ("bench-rss",),
    ) -> None:
        self.clock = clock
        self.exclude = set(exclude_pids)
        self.overhead_groups = set(overhead_groups)
        self.process = psutil.Process()
        self._start: _Snapshot | None = None
        self._clock_start = 0.0

    def _children_cpu(self) -> tuple[float, float]:
        """CPU of live child processes: (counted ones, excluded ones such as the moto server)."""
        counted = excluded = 0.0
        for child in self.process.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            if child.pid in self.exclude:
                excluded += times.user + times.system
            else:
                counted += times.user + times.system
        return counted, excluded

    def _snapshot(self) -> _Snapshot:
        names = python_threads()
        times = self.process.cpu_times()
        children, excluded = self._children_cpu()
        return _Snapshot(
            wall=time.perf_counter(),
            process=times.user + times.system,
            children=children,
            excluded=excluded,
            machine_busy=machine_busy_seconds(),
            threads=thread_cpu_seconds(self.process),
            names=names,
        )

    def start(self) -> None:
        self._start = self._snapshot()
        self._clock_start = self.clock.read()

    def stop(self) -> CpuReport:
        assert self._start is not None, "CpuMeter.stop() before start()"
        end = self._snapshot()
        begin = self._start
        python_ids = set(begin.names) | set(end.names)
        by_group: dict[str, float] = defaultdict(float)
        native = 0.0
        for tid, seconds in end.threads.items():
            delta = seconds - begin.threads.get(tid, 0.0)
            if tid in python_ids:
                by_group[thread_group(end.names.get(tid) or begin.names[tid])] += delta
            elif (group := native_group(tid)) == NATIVE_GROUP:
                native += delta
            else:
                by_group[group] += delta
        by_group[NATIVE_GROUP] += native
        process = end.process - begin.process
        # Threads that exited during the interval, and the process figure's 10 ms ticks.
        by_group["unattributed"] += max(0.0, process - sum(by_group.values()))
        children = end.children - begin.children
        if children > 0:
            by_group["child-processes"] += children
        model = (self.clock.read() - self._clock_start) + native
        return CpuReport(
            wall_s=end.wall - begin.wall,
            process_s=process,
            children_s=children,
            model_s=model,
            by_group=dict(by_group),
            overhead_s=sum(by_group.get(group, 0.0) for group in self.overhead_groups),
            foreign_s=max(
                0.0,
                (end.machine_busy - begin.machine_busy)
                - process
                - children
                - (end.excluded - begin.excluded),
            ),
        )


class RssSampler(threading.Thread):
    """Samples resident memory (this process plus non-excluded children) until stopped."""

    def __init__(
        self, exclude_pids: Iterable[int] = (), *, children: bool = False, interval: float = 0.05
    ) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.exclude = set(exclude_pids)
        self.children = children
        self.interval = interval
        self.process = psutil.Process()
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def rss(self) -> int:
        total = int(self.process.memory_info().rss)
        if not self.children:
            return total
        for child in self.process.children(recursive=True):
            if child.pid in self.exclude:
                continue
            try:
                total += int(child.memory_info().rss)
            except psutil.Error:
                continue
        return total

    def run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), self.rss()))
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.samples.append((time.perf_counter(), self.rss()))

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    def halves(self) -> tuple[int, int]:
        """Peak RSS over the first and the second half of the sampled interval."""
        if len(self.samples) < 2:
            return self.peak, self.peak
        first, last = self.samples[0][0], self.samples[-1][0]
        middle = (first + last) / 2
        early = [rss for at, rss in self.samples if at <= middle] or [self.peak]
        late = [rss for at, rss in self.samples if at > middle] or [self.peak]
        return max(early), max(late)

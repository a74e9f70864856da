"""How long the process that owns the model holds the GIL, per image.

One Python process can run Python code on one core at a time: at ``g`` milliseconds of GIL per
image it never passes ``1000 / g`` images per second, however many cores or GPUs it has. Two
ways to measure ``g`` over a window, both giving seconds of GIL held by each thread group:

``py-spy`` (preferred)
    ``py-spy record --pid <this process> --gil --threads --nonblocking --format raw`` runs for the
    window: it samples every thread's stack ``rate`` times a second and, with ``--gil``, keeps
    only the samples of the thread holding the GIL (read from the interpreter's own state), each
    line prefixed with the thread's name. GIL-held seconds of a thread group = its samples /
    ``rate``. ``--nonblocking`` never pauses the process (pausing would slow what is measured);
    the price is an occasional torn stack, which only changes a stack's frames, not whose it is.
    py-spy reads another process's memory, so it needs ptrace permission: root or
    CAP_SYS_PTRACE, or, where Yama's ``ptrace_scope`` is 1, a tracee that names its tracer
    (``prctl(PR_SET_PTRACER)``, done here before py-spy starts).
``probe`` (when py-spy is missing or may not attach)
    A thread of this process sleeps a short random time, over and over, and measures how late
    it gets going again. Waking, it must take the GIL: if no thread holds it that costs
    microseconds, if one does it waits until the holder lets go (at the latest after
    ``sys.getswitchinterval()``). The share of wake-ups that had to wait longer than the
    machine's own wake-up jitter (calibrated first, with the process quiet) estimates the share
    of time the GIL is held; times the window, that is GIL-held seconds. It sees neither which
    thread held the GIL nor holds shorter than the jitter, and it counts a holder preempted by
    the OS as holding, as py-spy does; it is the cruder instrument, and the JSON names the one
    used.

Both count wall-clock time: on a machine with more runnable threads than cores, a thread holding
the GIL while the kernel runs something else still holds it, and every other Python thread
waits. That inflates ``g`` on a busy machine (the 2-core development machine, shared with the
moto server, is one). :class:`RunQueueClock` corrects for it: the kernel keeps, per thread,
the time it ran and the time it waited on a run queue, runnable but not running
(``/proc/<pid>/task/<tid>/schedstat``). A thread group's GIL-held time on a CPU is estimated
as its sampled GIL time times the share of its runnable time it actually ran (assuming a thread
is as likely to be preempted with the GIL as without), and never more than the CPU time the
group used. On an idle machine the two figures agree.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.accounting import python_threads, task_schedstat, thread_group

PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


@dataclass
class GilReport:
    """GIL-held seconds over one window, by thread group (``total`` when the method can't tell)."""

    method: str
    window_s: float
    by_group: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    note: str = ""

    def held_s(self, exclude: frozenset[str] | set[str] = frozenset()) -> float:
        return sum(s for group, s in self.by_group.items() if group not in exclude)


def py_spy_path() -> str | None:
    """The py-spy next to this interpreter (the venv's), else on the PATH."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def _allow_any_tracer() -> None:
    """Under Yama ptrace_scope 1 a child may not trace its parent unless the parent says so."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY), 0, 0, 0)


def parse_raw(text: str, rate: float) -> tuple[dict[str, float], int]:
    """py-spy's ``--threads --format raw`` lines -> GIL-held seconds by thread group, samples.

    A line is ``thread (<tid>): <name>;<frame>;<frame> <count>``; a thread without a Python
    ``threading`` name shows as ``thread (<tid>)`` alone.
    """
    by_group: dict[str, float] = defaultdict(float)
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        head = stack.split(";", 1)[0]
        name = head.partition("): ")[2] if "): " in head else "unnamed"
        by_group[thread_group(name)] += int(count) / rate
        samples += int(count)
    return dict(by_group), samples


class RunQueueClock:
    """Per thread group of this process: seconds run and seconds waited for a CPU."""

    def __init__(self) -> None:
        self._start: dict[int, tuple[float, float]] = {}
        self._names: dict[int, str] = {}

    def _name_threads(self) -> None:
        self._names.update(python_threads())

    def start(self) -> None:
        self._name_threads()
        self._start = task_schedstat()

    def stop(self) -> dict[str, float]:
        """Share of its runnable time each group ran (1.0 where the kernel keeps no figures)."""
        end = task_schedstat()
        self._name_threads()
        run: dict[str, float] = defaultdict(float)
        wait: dict[str, float] = defaultdict(float)
        for tid, (r1, w1) in end.items():
            r0, w0 = self._start.get(tid, (0.0, 0.0))
            group = thread_group(self._names.get(tid, "unnamed"))
            run[group] += r1 - r0
            wait[group] += w1 - w0
        # "total" (the probe's one group): every thread of the process together.
        run["total"], wait["total"] = sum(run.values()), sum(wait.values())
        return {
            group: run[group] / (run[group] + wait[group]) if run[group] + wait[group] else 1.0
            for group in run
        }


def on_cpu_seconds(
    gil_by_group: dict[str, float], ran_share: dict[str, float], cpu_by_group: dict[str, float]
) -> dict[str, float]:
    """Sampled GIL seconds by group -> the part held while running on a CPU (see above)."""
    return {
        group: min(held * ran_share.get(group, 1.0), cpu_by_group.get(group, held))
        for group, held in gil_by_group.items()
    }


class PySpyGil:
    """py-spy sampling this process's GIL holder from :meth:`start` to :meth:`stop`."""

    method = "py-spy"

    def __init__(self, executable: str, rate: int = 100) -> None:
        self.executable = executable
        self.rate = rate
        self._dir = tempfile.TemporaryDirectory(prefix="bench-gil-")
        self.output = Path(self._dir.name) / "gil.raw"
        self.proc: subprocess.Popen[str] | None = None
        self.started = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start py-spy and return once it samples (it says so); raises if it cannot attach."""
        _allow_any_tracer()
        self.proc = subprocess.Popen(
            [
                self.executable,
                *("record", "--pid", str(os.getpid()), "--gil", "--threads", "--nonblocking"),
                *("--format", "raw", "--rate", str(self.rate), "--output", str(self.output)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "Sampling process" not in first:
            rest = self._finish(timeout=10)
            raise RuntimeError(f"py-spy did not start sampling: {(first + rest).strip()[:300]}")
        self.started = time.perf_counter()

    def _finish(self, timeout: float) -> str:
        assert self.proc is not None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""

    def stop(self) -> GilReport:
        """SIGINT (py-spy's Control-C: it writes what it sampled), then read the samples."""
        assert self.proc is not None, "PySpyGil.stop() before start()"
        window = time.perf_counter() - self.started
        self.proc.send_signal(signal.SIGINT)
        said = self._finish(timeout=30)
        try:
            text = self.output.read_text()
        except OSError as exc:
            raise RuntimeError(f"py-spy wrote nothing ({exc}): {said.strip()[:300]}") from None
        finally:
            self._dir.cleanup()
        by_group, samples = parse_raw(text, self.rate)
        note = "sampler fell behind its rate" if "behind in sampling" in said else ""
        return GilReport(self.method, window, by_group, samples, note)


class ProbeGil(threading.Thread):
    """Estimates the share of time the GIL is held from how late a sleeping thread wakes."""

    method = "probe"

    def __init__(self, interval_s: tuple[float, float] = (0.001, 0.004)) -> None:
        super().__init__(name="bench-gil-probe", daemon=True)
        self.interval_s = interval_s
        self.threshold_s = 0.0
        self.pid = None
        self._halt = threading.Event()
        self._random = random.Random(0)
        self.lates: list[float] = []
        self.started = 0.0

    def _late(self) -> float:
        nap = self._random.uniform(*self.interval_s)
        before = time.perf_counter()
        time.sleep(nap)
        return time.perf_counter() - before - nap

    def calibrate(self, probes: int = 200) -> None:
        """The wake-up lateness that is the OS's, not the GIL's: a high quantile, quiet."""
        lates = sorted(self._late() for _ in range(probes))
        self.threshold_s = max(2 * lates[int(0.9 * len(lates))], 50e-6)

    def start(self) -> None:
        if not self.threshold_s:
            self.calibrate()
        self.started = time.perf_counter()
        super().start()

    def run(self) -> None:
        while not self._halt.is_set():
            self.lates.append(self._late())

    def stop(self) -> GilReport:
        window = time.perf_counter() - self.started
        self._halt.set()
        self.join()
        held = sum(1 for late in self.lates if late > self.threshold_s)
        share = held / len(self.lates) if self.lates else 0.0
        note = (
            f"{len(self.lates)} probes, {held} found the GIL held "
            f"(threshold {1e6 * self.threshold_s:.0f} us)"
        )
        return GilReport(self.method, window, {"total": share * window}, len(self.lates), note)


def gil_sampler(method: str, rate: int = 100) -> PySpyGil | ProbeGil:
    """``py-spy``, ``probe``, or ``auto`` (py-spy when installed, else the probe)."""
    if method not in {"auto", "py-spy", "probe"}:
        raise ValueError(f"GIL method must be auto, py-spy or probe, got {method!r}")
    path = py_spy_path() if method != "probe" else None
    if method == "py-spy" and path is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return PySpyGil(path, rate) if path is not None else ProbeGil()

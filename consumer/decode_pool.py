"""Decode in child processes: a file that crashes its decoder costs one image, not the worker.

Pillow and the codecs under it (libjpeg, libpng, libwebp, libtiff) are native code fed hostile
bytes; each has had crashes. In a thread, a segfault or an abort on one file would kill the
consumer and every image it holds; here each decode runs in one of ``workers`` child processes,
one image at a time, so when a child dies the image it was given fails alone with the permanent
code ``decoder-crashed``, a new child takes its place and the worker goes on.

The same processes take decoding off the GIL of the process that owns the model: the parent only
writes the encoded bytes to a socket and copies the ``(H, W, 3)`` uint8 result out of a shared
memory slot, no pickling of pixels, the way PyTorch's DataLoader feeds a GPU. Each child:

- imports Pillow, numpy and the resize's compiled loops (:mod:`consumer.resample`, loaded once
  by the fork server), never torch (see :mod:`consumer.pil_resize`), so it starts in a
  fraction of a second from a fork server and its address space is small enough to cap;
- caps that address space (``RLIMIT_AS``) at what it has after start-up plus
  ``memory_bytes``, so a pathological image fails with ``too-large`` instead of inviting the
  kernel's out-of-memory killer to choose the consumer;
- ignores SIGINT and SIGTERM (the consumer decides when decoding stops) and exits when its socket
  closes, which is also what happens when the consumer dies.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import resource
import select
import signal
import socket
import struct
import threading
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

# Importing consumer.decode registers the HEIF opener (pillow-heif) and sets the AVIF plugin's
# threads: the fork server preloads this module, so every child opens phone photos too.
from consumer.decode import DecodeLimits
from consumer.errors import PermanentError, TransientError, classify
from consumer.heap import keep_freed_memory
from consumer.pil_resize import array_stages, plain_stages

log = logging.getLogger(__name__)

# One image may take this long in a child before the child is taken for hung and killed.
DECODE_TIMEOUT_S = 120.0
_OK = b"\x00"
_FAILED = b"\x01"
_READY = b"ready"
_START_TIMEOUT_S = 60.0
# multiprocessing.connection's framing (a signed 32-bit big-endian length), which the child's
# Connection reads and writes.
_FRAME = struct.Struct("!i")
_LONG = struct.Struct("!Q")
# A reply is a status byte, or a pickled (code, detail, permanent): far below this.
_REPLY_READ = 65536


class DecoderUnavailable(RuntimeError):
    """Decode processes cannot be started (the setup is broken, not an image)."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """Everything a decode child needs, picklable: the model's preprocessing and the limits."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str
    limits: DecodeLimits
    draft: bool
    memory_bytes: int
    hook: str = ""  # "module:function" called with (data, consumer_pid) first: tests only
    consumer_pid: int = 0

    @property
    def out_bytes(self) -> int:
        _, height, width = self.input_size
        return height * width * 3


class DecodeProcesses:
    """A :class:`~consumer.preprocess.Preparer` whose decodes run in crash-isolated children.

    Call it from any number of threads: each call waits for an idle child, hands it the bytes and
    blocks (GIL released) until the pixels or the failure come back.
    """

    def __init__(self, spec: ChildSpec, workers: int) -> None:
        self.spec = spec
        self.limits = spec.limits
        self._closed = False
        self._context = multiprocessing.get_context("forkserver")
        # The server imports the child's modules once; every child (and every replacement after
        # a crash) is then a cheap fork of it, never of this multi-threaded torch process.
        # consumer.resample too where the children will use it: the server loads the resize's
        # compiled loops once (numba's cache, or a compile of about a second the first time)
        # and every child forks with them, while this process, which does not resize, stays
        # without numba (114 MiB).
        plain = plain_stages(spec.input_size, spec.interpolation, spec.crop_pct, spec.crop_mode)
        vectorised = plain is not None and plain.vectorised
        self._context.set_forkserver_preload(
            ["consumer.decode_pool", *(["consumer.resample"] if vectorised else [])]
        )
        # Idle children, last in first out: the child that finished last decodes next, its
        # heap, its output slot and its code still in the CPU's caches. Taken in turn, each
        # child runs cold whenever fewer images come than there are children (0.08-0.1 ms more
        # child CPU per 500x375 JPEG, two children, one caller). A stack and one token per
        # child in it, both C: queue.LifoQueue is Python, and its locking showed in the GIL.
        self._idle = _IdleStack()
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        for _ in range(workers):
            self._idle.put(self._spawn())

    def __call__(self, data: bytes) -> np.ndarray:
        if self._closed:
            raise TransientError("stopping", "decoding stopped with the worker")
        child = self._idle.get()
        try:
            # Callers wait above for a child (every fetch thread may). close() stops the idle
            # children and kills the busy ones, whose callers then close them (below): a caller
            # whose turn comes after close() must neither use its child nor replace it.
            with self._lock:
                if self._closed:
                    raise TransientError("stopping", "decoding stopped with the worker")
                child.busy = True
            if child.dead:  # the child that crashed on the last image: replace it first
                child = self._replace(child)
            return child.decode(data)
        except DecoderUnavailable as exc:
            raise TransientError("decoder-unavailable", str(exc)) from None
        except _ChildDied as died:
            child.dead = True
            if self._closed:  # killed by the shutdown, not by the image
                raise TransientError("stopping", "decoding stopped with the worker") from None
            log.warning(
                "decoder process died; the image fails alone",
                extra={"fields": {"cause": died.cause, "pid": child.pid}},
            )
            raise PermanentError("decoder-crashed", f"the decoder process {died.cause}") from None
        finally:
            with self._lock:
                child.busy = False
                closing = self._closed
            if closing:
                child.close()
            self._idle.put(child)  # closed or not: the next waiter must wake to see close()

    def close(self) -> None:
        """Stop every child (their sockets close; they exit); idempotent.

        An idle child is closed here; a busy one is killed, and the caller it was decoding for
        closes it once its read ends, so that its shared memory is never released under a copy.
        """
        with self._lock:
            self._closed = True
            children, self._children = self._children, []
        for child in children:
            if child.busy:
                child.process.kill()
            else:
                child.close()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [child.pid for child in self._children]

    def _spawn(self, *, busy: bool = False) -> _Child:
        child = _Child(self._context, self.spec)
        with self._lock:
            if not self._closed:
                child.busy = busy
                self._children.append(child)
                return child
        child.close()  # started while close() ran: no one else would stop it
        raise TransientError("stopping", "decoding stopped with the worker")

    def _replace(self, dead: _Child) -> _Child:
        dead.close()
        with self._lock:
            if dead in self._children:
                self._children.remove(dead)
        return self._spawn(busy=True)


class _IdleStack:
    """Idle children, last in first out, from any number of threads; C calls only.

    ``put`` pushes the child before it adds a token, and ``get`` takes a token before it pops,
    so a thread holding a token always finds a child (another may have taken the one it saw
    pushed; then there is another).
    """

    def __init__(self) -> None:
        self._children: collections.deque[_Child] = collections.deque()
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()

    def put(self, child: _Child) -> None:
        self._children.append(child)
        self._tokens.put(None)

    def get(self) -> _Child:
        self._tokens.get()
        return self._children.pop()


class _ChildDied(Exception):
    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class _Child:
    """One decode process, its socket and its shared-memory output slot."""

    def __init__(self, context: Any, spec: ChildSpec) -> None:
        self.spec = spec
        self.dead = False
        self.busy = False  # decoding for a caller (DecodeProcesses' lock guards it)
        self._closing = threading.Lock()
        self._closed = False
        self.shm = SharedMemory(create=True, size=spec.out_bytes)
        # A socket pair, as multiprocessing's duplex Pipe is: the child reads it through a
        # Connection; this side frames its messages itself (see _send_frame, _recv_frame).
        self.sock, child_sock = socket.socketpair()
        child_conn = multiprocessing.connection.Connection(child_sock.detach())
        self.process = context.Process(
            target=serve, args=(child_conn, self.shm.name, spec), daemon=True, name="decode"
        )
        try:
            self.process.start()
        except (EOFError, OSError) as exc:  # the fork server died (a module it preloads broke)
            child_conn.close()
            self.sock.close()
            self.shm.close()
            self.shm.unlink()
            raise DecoderUnavailable(
                f"a decode process could not start: the fork server failed ({exc!r})"
            ) from exc
        child_conn.close()
        self.pid = int(self.process.pid or 0)
        # A child that cannot even start (a bad hook, no shared memory) is a broken setup, not
        # a poison image: say so here, before any image is blamed for it.
        started = select.poll()
        started.register(self.sock.fileno(), select.POLLIN)
        try:
            ready = bool(started.poll(_START_TIMEOUT_S * 1000)) and _recv_frame(self.sock) == _READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            cause = self._cause() if not self.process.is_alive() else "did not answer"
            self.close()
            raise DecoderUnavailable(f"a decode process could not start: it {cause}")
        # From now on a reply is awaited by one blocking read that the kernel ends after
        # DECODE_TIMEOUT_S (BlockingIOError), not by a poll and then a read: each of the two
        # gives up the GIL and must take it back, behind every busy thread of the process.
        seconds = int(DECODE_TIMEOUT_S)
        timeval = struct.pack("ll", seconds, int((DECODE_TIMEOUT_S - seconds) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)

    def decode(self, data: bytes) -> np.ndarray:
        try:
            _send_frame(self.sock, data)
            reply = _recv_frame(self.sock)
        except BlockingIOError:  # SO_RCVTIMEO ran out: the child is alive and stuck
            self.process.kill()
            raise _ChildDied(
                f"hung for more than {DECODE_TIMEOUT_S:.0f} s and was killed"
            ) from None
        except (EOFError, OSError):
            raise _ChildDied(self._cause()) from None
        if reply[:1] == _FAILED:
            code, detail, permanent = pickle.loads(reply[1:])
            raise (PermanentError if permanent else TransientError)(code, detail)
        _, height, width = self.spec.input_size
        pixels = np.frombuffer(self._buffer(), dtype=np.uint8, count=self.spec.out_bytes)
        # A copy: the slot is this child's next output. (One 150 KB memcpy per image.)
        return pixels.reshape(height, width, 3).copy()

    def _buffer(self) -> memoryview:
        buffer = self.shm.buf
        assert buffer is not None  # None only once closed
        return buffer

    def _cause(self) -> str:
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def close(self) -> None:
        # Idempotent, and safe from two threads: close() and the caller that used the child.
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self.sock.close()
            self.process.join(timeout=2)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=2)
            self.shm.close()
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


def _send_frame(sock: socket.socket, data: bytes) -> None:
    """``data`` framed as ``Connection.send_bytes`` frames it, in one system call.

    ``send_bytes`` writes the length and a payload over 16 KiB separately: the child wakes for
    the four bytes and sleeps again for the rest, and this thread gives up and takes back the
    GIL between the two writes, a wait behind every busy thread of the process.
    """
    size = len(data)
    # Over 2 GiB (a --max-image-bytes that large): the long form Connection reads too.
    header = _FRAME.pack(size) if size <= 0x7FFFFFFF else _FRAME.pack(-1) + _LONG.pack(size)
    sent = sock.sendmsg([header, data])
    # Cut short (a signal; over 2 GiB, Linux's cap on one call): the rest, without copying.
    if sent < len(header):
        sock.sendall(header[sent:])
    if sent < len(header) + len(data):
        sock.sendall(memoryview(data)[max(0, sent - len(header)) :])


def _recv_frame(sock: socket.socket) -> bytes:
    """One message the child sent with ``Connection.send_bytes``: one read when it is whole."""
    buffer = sock.recv(_REPLY_READ)
    while len(buffer) < _FRAME.size:
        buffer += _recv_some(sock, _FRAME.size - len(buffer))
    (size,) = _FRAME.unpack_from(buffer)
    end = _FRAME.size + size
    while len(buffer) < end:
        buffer += _recv_some(sock, end - len(buffer))
    if len(buffer) > end:  # the child answers once per request: more is a broken protocol
        raise OSError(f"the decode process sent {len(buffer) - end} bytes it was not asked for")
    return buffer[_FRAME.size :]


def _recv_some(sock: socket.socket, size: int) -> bytes:
    chunk = sock.recv(size)
    if not chunk:
        raise EOFError("the decode process closed its end")
    return chunk


# --- the child side -------------------------------------------------------------------------


def serve(conn: multiprocessing.connection.Connection, shm_name: str, spec: ChildSpec) -> None:
    """The child's loop: bytes in, pixels into the shared slot (or a failure) out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep_freed_memory()  # a decode process's heap: see consumer.heap
    prepare = _preparer(spec)
    hook = _hook(spec.hook)
    # The fork server shares the consumer's resource tracker, so attaching registers nothing
    # new and the consumer's unlink on close is the one that counts.
    shm = SharedMemory(name=shm_name)
    buffer = shm.buf
    assert buffer is not None
    out = np.frombuffer(buffer, dtype=np.uint8, count=spec.out_bytes)
    _limit_memory(spec.memory_bytes)
    conn.send_bytes(_READY)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break  # the consumer closed the socket, or died
        try:
            if hook is not None:
                hook(data, spec.consumer_pid)
            pixels = prepare(data)
            out[:] = pixels.reshape(-1)
            reply = _OK
        except MemoryError:
            failure = PermanentError(
                "too-large",
                f"decoding needs more than the decoder's {spec.memory_bytes >> 20} MiB limit",
            )
            reply = _FAILED + pickle.dumps(_settled(failure))
        except Exception as exc:
            reply = _FAILED + pickle.dumps(_settled(exc))
        try:
            conn.send_bytes(reply)
        except (EOFError, OSError):
            break
    del out, buffer
    shm.close()


def _settled(exc: BaseException) -> tuple[str, str, bool]:
    failure = classify(exc)
    return failure.error_code, failure.detail, failure.permanent


def _preparer(spec: ChildSpec) -> Any:
    from consumer.decode import decode_image

    stages: Any = plain_stages(spec.input_size, spec.interpolation, spec.crop_pct, spec.crop_mode)
    if stages is None:  # an unusual transform: timm's own (this child then imports torch)
        from consumer.preprocess import InputSpec, pil_stages

        stages = pil_stages(
            InputSpec(
                spec.input_size,
                spec.interpolation,
                spec.mean,
                spec.std,
                spec.crop_pct,
                spec.crop_mode,
            )
        )
    # Before the address space is capped: the resize's compiled loops, where it uses them (the
    # fork server preloads them, unless it was already running with another list).
    to_array = array_stages(stages)
    _, height, width = spec.input_size
    expected = (height, width, 3)
    draft_size = None
    if spec.draft:
        scale = max(int(s / spec.crop_pct) for s in spec.input_size[1:])
        draft_size = (scale, scale)

    def prepare(data: bytes) -> np.ndarray:
        array = to_array(decode_image(data, spec.limits, draft_size=draft_size))
        if array.shape != expected:
            raise RuntimeError(f"preprocessed image has shape {array.shape}, expected {expected}")
        return array

    return prepare


def _hook(path: str) -> Any:
    if not path:
        return None
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _limit_memory(budget: int) -> None:
    """Cap the address space at what start-up mapped plus ``budget`` bytes (0: no cap)."""
    if budget <= 0:
        return
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

"""A decode hook for tests only: images carrying a marker crash the decoder in chosen ways.

The consumer calls ``BOTTLENECK_DECODE_HOOK=tests.crash_hook:crash_on_marked`` in each decode
process before decoding, with the image's bytes and the consumer's pid. The shipped image has
no ``tests`` package, so this cannot run in production. A marker is appended after the image's
end, where decoders never look, so a marked image is otherwise a perfectly good one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

SEGFAULT = b"#segfault-the-decoder"
ABORT = b"#abort-the-decoder"
KILL_CONSUMER = b"#kill-the-consumer"  # as the kernel's OOM killer would
HANG = b"#hang-the-decoder"


def mark(data: bytes, marker: bytes) -> bytes:
    return data + marker


def crash_on_marked(data: bytes, consumer_pid: int) -> None:
    tail = data[-64:]
    if tail.endswith(SEGFAULT):
        ctypes.string_at(0)  # a real invalid read: SIGSEGV
    if tail.endswith(ABORT):
        os.abort()
    if tail.endswith(KILL_CONSUMER):
        os.kill(consumer_pid, signal.SIGKILL)
    if tail.endswith(HANG):
        time.sleep(3600)

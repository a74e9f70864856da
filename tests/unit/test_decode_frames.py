"""The decode pool's own framing: what multiprocessing's Connection writes and reads."""

from __future__ import annotations

import socket
import threading
from multiprocessing.connection import Connection

import pytest

from consumer.decode_pool import _recv_frame, _send_frame


@pytest.mark.parametrize("size", [0, 1, 16384, 16385, 300_000])
def test_a_frame_sent_in_one_call_reads_as_one_message_in_the_child(size: int) -> None:
    # GIVEN a socket pair with multiprocessing's Connection on the child's end
    parent, child_end = socket.socketpair()
    child = Connection(child_end.detach())
    data = bytes(i % 251 for i in range(size))
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(child.recv_bytes()))
    reader.start()

    # WHEN the parent sends the bytes (larger than the socket's buffer for the last size)
    _send_frame(parent, data)
    reader.join(timeout=10)

    # THEN the child's recv_bytes returns exactly them
    assert received == [data]
    parent.close()
    child.close()


@pytest.mark.parametrize("size", [0, 1, 70_000])
def test_a_reply_sent_with_send_bytes_reads_whole(size: int) -> None:
    parent, child_end = socket.socketpair()
    child = Connection(child_end.detach())
    data = bytes(i % 7 for i in range(size))
    writer = threading.Thread(target=child.send_bytes, args=(data,))
    writer.start()

    assert _recv_frame(parent) == data
    writer.join(timeout=10)
    parent.close()
    child.close()


def test_a_child_that_closes_mid_reply_is_an_end_of_file() -> None:
    # GIVEN a child end that wrote a header promising 100 bytes, then 10, then closed
    parent, child_end = socket.socketpair()
    child_end.sendall((100).to_bytes(4, "big") + b"x" * 10)
    child_end.close()

    # THEN reading the reply fails as the death of the child is detected elsewhere: EOFError
    with pytest.raises(EOFError):
        _recv_frame(parent)
    parent.close()


def test_more_than_one_reply_is_a_broken_protocol() -> None:
    parent, child_end = socket.socketpair()
    child_end.sendall((1).to_bytes(4, "big") + b"\x00" + b"extra")

    with pytest.raises(OSError, match="not asked for"):
        _recv_frame(parent)
    parent.close()
    child_end.close()


class ShortSocket:
    """A socket whose sendmsg stops after ``cut`` bytes, as one interrupted by a signal does."""

    def __init__(self, cut: int) -> None:
        self.cut = cut
        self.stream = b""

    def sendmsg(self, buffers: list[bytes]) -> int:
        self.stream += b"".join(bytes(b) for b in buffers)[: self.cut]
        return min(self.cut, sum(len(b) for b in buffers))

    def sendall(self, data: bytes) -> None:
        self.stream += bytes(data)


@pytest.mark.parametrize("cut", [0, 2, 4, 5, 1000])
def test_a_send_cut_short_sends_the_rest_once(cut: int) -> None:
    sock = ShortSocket(cut)
    data = bytes(range(200)) * 10

    _send_frame(sock, data)  # type: ignore[arg-type]

    assert sock.stream == len(data).to_bytes(4, "big") + data

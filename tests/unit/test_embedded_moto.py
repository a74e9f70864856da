"""The embedded moto takes each SQS message once per receive, even with receives at once."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import boto3
import pytest

from consumer.embedded_moto import receive_each_message_once


def _receive_twice_at_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two receives of a one-message queue, the first held between moto's visibility check and
    its mark (where a loaded machine switches threads); the ids both got, together."""
    from moto.sqs.models import Message

    sqs = boto3.client("sqs", region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName="once")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="only")
    mark = Message.mark_received

    def slow_mark(self: Message, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)
        mark(self, *args, **kwargs)

    monkeypatch.setattr(Message, "mark_received", slow_mark)
    got: list[str] = []

    def receive() -> None:
        client = boto3.client("sqs", region_name="us-east-1")
        messages = client.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)
        got.extend(m["MessageId"] for m in messages.get("Messages", []))

    threads = [threading.Thread(target=receive) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # the second starts while the first sits before its mark
    for thread in threads:
        thread.join()
    return got


def test_moto_alone_returns_one_message_to_two_receives_at_once(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.sqs.models import SQSBackend

    # GIVEN moto's own receive, without the lock (the tests' session applies it)
    wrapped: Any = SQSBackend.receive_message
    monkeypatch.setattr(SQSBackend, "receive_message", wrapped.__wrapped__)

    # WHEN two receives run at once THEN both get the one message: the duplicate this fixes
    assert len(_receive_twice_at_once(monkeypatch)) == 2


def test_two_receives_at_once_take_the_message_once(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the fix (idempotent: applying it again changes nothing)
    receive_each_message_once()

    # WHEN two receives run at once THEN one of them gets the message
    assert len(_receive_twice_at_once(monkeypatch)) == 1


def test_a_long_poll_waits_without_holding_other_receives_back(aws: None) -> None:
    # GIVEN a long poll of an empty queue under way
    sqs = boto3.client("sqs", region_name="us-east-1")
    empty = sqs.create_queue(QueueName="empty")["QueueUrl"]
    full = sqs.create_queue(QueueName="full")["QueueUrl"]
    sqs.send_message(QueueUrl=full, MessageBody="waiting")
    got: list[str] = []

    def poll() -> None:
        client = boto3.client("sqs", region_name="us-east-1")
        messages = client.receive_message(QueueUrl=empty, WaitTimeSeconds=20)
        got.extend(m["Body"] for m in messages.get("Messages", []))

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.3)

    # WHEN another receive runs meanwhile
    other = sqs.receive_message(QueueUrl=full, WaitTimeSeconds=0)

    # THEN it is answered while the long poll still waits (the lock is not held while waiting),
    # and the long poll takes the message that comes later
    assert [m["Body"] for m in other["Messages"]] == ["waiting"]
    assert poller.is_alive()
    sqs.send_message(QueueUrl=empty, MessageBody="later")
    poller.join(timeout=10)
    assert not poller.is_alive() and got == ["later"]


def test_a_receive_moto_makes_from_within_a_receive_does_not_deadlock(aws: None) -> None:
    from moto.sqs.models import sqs_backends

    # GIVEN a message one receive from its dead-letter queue, and moto receiving from within
    # that receive as it moves it (what a Lambda mapping on the dead-letter queue makes it do)
    receive_each_message_once()
    sqs = boto3.client("sqs", region_name="us-east-1")
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]
    redrive = {"deadLetterTargetArn": arn["QueueArn"], "maxReceiveCount": "1"}
    queue_url = sqs.create_queue(
        QueueName="work",
        Attributes={"RedrivePolicy": json.dumps(redrive), "VisibilityTimeout": "0"},
    )["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="poison")
    assert len(sqs.receive_message(QueueUrl=queue_url)["Messages"]) == 1
    backend = sqs_backends["123456789012"]["us-east-1"]
    dead_letters = backend.get_queue("dlq")
    add = dead_letters.add_message
    nested: list[int] = []

    def add_and_receive(message: Any) -> None:
        add(message)
        nested.append(len(backend.receive_message("dlq", 1, 0, 0)))

    dead_letters.add_message = add_and_receive  # type: ignore[method-assign]

    # WHEN the next receive moves the message to the dead-letter queue
    done: list[int] = []
    thread = threading.Thread(
        target=lambda: done.append(len(backend.receive_message("work", 1, 0, 0))), daemon=True
    )
    thread.start()
    thread.join(timeout=10)

    # THEN both receives finished: the inner one took the dead letter, the outer nothing
    assert not thread.is_alive(), "the nested receive deadlocked on the lock"
    assert nested == [1] and done == [0]

"""A consumer process whose held work stops making progress exits 3 on its own, at once, with
the stuck message back on the queue: here a GetObject that S3 never answers (the proxy holds the
request), so a fetch thread hangs, as a GPU call would hang the inference thread."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bottleneck_contract.messages import ImageRef, encode
from consumer.stall import EXIT_STALLED
from tests.corpus import photo_jpeg
from tests.faults import Fault, FaultyEndpoint
from tests.integration.consumer_process import CONSUMER, Endpoint, aws_env
from tests.integration.test_signals import log_lines

STARTUP = 90


def test_a_consumer_that_stalls_releases_its_work_and_exits_3(
    moto_server: str, tmp_path: Path
) -> None:
    # GIVEN three images, one of which S3 never answers a GET for
    endpoint = Endpoint.create(moto_server, visibility=300)
    keys = ["ok/0.jpg", "ok/1.jpg", "hang/0.jpg"]
    for i, key in enumerate(keys):
        endpoint.s3.put_object(Bucket="images", Key=key, Body=photo_jpeg(120, 90, seed=i))
        endpoint.sqs.send_message(
            QueueUrl=endpoint.queue_url, MessageBody=encode(ImageRef("images", key))
        )
    log = tmp_path / "consumer.log"
    plan = {"get_object": Fault("hang", every=1, key="hang/0.jpg")}
    with FaultyEndpoint(moto_server, plan) as proxy, log.open("ab") as sink:
        # WHEN a consumer runs with a 6 s stall timeout, its S3 requests through the proxy
        process = subprocess.Popen(
            [
                CONSUMER,
                *("--queue-url", endpoint.queue_url, "--output", "s3://feats/v1/"),
                *("--model", "test_resnet", "--weights", "random", "--device", "cpu"),
                *("--stall-timeout", "6", "--idle-exit", "5"),
            ],
            env={**aws_env(moto_server), "AWS_ENDPOINT_URL_S3": proxy.url},
            stdout=sink,
            stderr=sink,
        )
        try:
            code = process.wait(timeout=STARTUP + 60)
        finally:
            process.kill()
        injected = proxy.injected["get_object"]

    # THEN it exits 3 by itself (held work keeps it from idling out), with the other two written
    # and the hung one back on the queue at once, and the log says why, with every thread's
    # stack in one JSON record. (The exit does not wait for the hung fetch thread: without
    # that, the same run took 65 s instead of 9, until obstore's request timeout let it go.)
    text = log.read_text()
    assert code == EXIT_STALLED, text[-3000:]
    assert injected >= 1
    assert sorted(endpoint.versions()) == ["v1/ok/0.jpg.npy", "v1/ok/1.jpg.npy"]
    assert endpoint.counts() == (1, 0)
    stalls = [
        record
        for record in log_lines(log)
        if record.get("message") == "no progress with work in flight; releasing it and exiting"
    ]
    assert len(stalls) == 1
    stacks = stalls[0]["stacks"]
    assert any(name.startswith("fetch") for name in stacks)
    assert any("obstore" in stack or "native.py" in stack for stack in stacks.values())

"""The benchmark's arithmetic: py-spy's GIL samples, the run-queue correction, the ceilings."""

from __future__ import annotations

import _thread
import os
import threading
import time

import obstore
import pytest
from obstore.store import MemoryStore

from benchmarks import throughput
from benchmarks.accounting import (
    NATIVE_GROUP,
    S3_NATIVE_GROUP,
    CpuMeter,
    ModelClock,
    native_group,
    python_threads,
)
from benchmarks.costs import cost_table, image_cost, layout_requests, unpriced
from benchmarks.feed import (
    INSTANCES,
    ceilings,
    decode_cpu_ms,
    feed_argv,
    relative_cpu,
    sampling_error,
)
from benchmarks.gil import on_cpu_seconds, parse_raw

RAW = """\
thread (101): fetch_0;_bootstrap (threading.py:1002);get (client.py:10) 30
thread (102): fetch_11;_bootstrap (threading.py:1002);get (client.py:12) 20
thread (103): write_2;_bootstrap (threading.py:1002);put (client.py:20) 50
thread (104): MainThread;<module> (bench.py:1) 5
thread (105);<module> (x.py:1) 1
not a py-spy line
"""


def test_py_spy_raw_samples_become_seconds_by_thread_group() -> None:
    # GIVEN py-spy's --threads --format raw output sampled at 100 Hz
    # WHEN it is parsed
    by_group, samples = parse_raw(RAW, rate=100)

    # THEN each thread pool's samples add up under its name, one sample being 1/rate seconds
    assert samples == 106
    assert by_group == pytest.approx({"fetch": 0.5, "write": 0.5, "main": 0.05, "unnamed": 0.01})


def test_gil_time_on_a_cpu_discounts_run_queue_waits_and_never_exceeds_cpu() -> None:
    # GIVEN sampled GIL seconds, the share of runnable time each group ran, and its CPU seconds
    gil = {"fetch": 2.0, "write": 1.0, "decode": 1.0}
    ran = {"fetch": 0.25, "write": 1.0}  # decode: no schedstat figures
    cpu = {"fetch": 4.0, "write": 0.4, "decode": 3.0}

    # WHEN the GIL time held while running is estimated
    on_cpu = on_cpu_seconds(gil, ran, cpu)

    # THEN fetch keeps a quarter, write is capped at its CPU, decode is left as sampled
    assert on_cpu == pytest.approx({"fetch": 0.5, "write": 0.4, "decode": 1.0})


def test_ceilings_follow_from_gil_and_cpu_per_image() -> None:
    # GIVEN 2 ms of GIL and 4 ms of CPU outside the model per image
    result = ceilings(gil_ms=2.0, cpu_ms=4.0)

    # THEN one process tops out at 500 images/s, and each instance at vCPUs * 250 images/s
    assert result["process_ceiling_images_per_s"] == 500.0
    rows = {row["instance"]: row for row in result["rows"]}
    assert set(rows) == {inst.name for inst in INSTANCES}
    small, large = rows["g6.xlarge"], rows["g6.2xlarge"]
    assert small["cpu_ceiling_images_per_s"] == 1000.0
    assert (small["bound_images_per_s"], small["bound_by"]) == (500.0, "GIL")
    assert large["cpu_ceiling_images_per_s"] == 2000.0
    # AND images per dollar: the bound for an hour over the on-demand price
    assert small["images_per_usd"] == round(500 * 3600 / 0.805)
    # AND without the GIL (several processes) the g6.2xlarge's CPU and its L4 tie at 2,000
    assert large["bound_processes_images_per_s"] == 2000.0
    assert large["images_per_usd_processes"] == round(2000 * 3600 / 0.98)


def test_ceilings_name_the_cpu_or_the_gpu_when_they_bind() -> None:
    # GIVEN a cheap GIL and 3 ms of CPU per image
    rows = {row["instance"]: row for row in ceilings(gil_ms=0.1, cpu_ms=3.0)["rows"]}

    # THEN 4 vCPUs feed 1,333 images/s (the CPU binds); 8 would feed 2,667, over the L4's 2,000
    assert rows["g6.xlarge"]["bound_by"] == "CPU"
    assert rows["g6.xlarge"]["bound_images_per_s"] == pytest.approx(4000 / 3, abs=0.1)
    assert rows["g6.2xlarge"]["bound_by"] == "GPU"
    assert rows["g6.2xlarge"]["bound_images_per_s"] == 2000


def test_rows_flag_runs_only_the_rows_named() -> None:
    # WHEN only the feed row is asked for
    args = throughput.parse_args(["--rows", "feed"])

    # THEN every other measurement, decode alone included, is skipped
    assert set(throughput.SKIPPABLE) - args.skip == {"feed"}


def test_the_feed_row_can_run_the_consumer_on_shards() -> None:
    # WHEN the feed row is asked for the sharded layout
    args = throughput.parse_args(["--rows", "feed", "--feed-layout", "shards"])
    argv = feed_argv(args, "q", "dlq", "s3://out/feed/")

    # THEN the consumer writes shards small enough to be written inside the window
    assert argv[argv.index("--layout") + 1] == "shards"
    assert argv[argv.index("--shard-rows") + 1] == "100"
    assert "--layout" not in feed_argv(throughput.parse_args([]), "q", "dlq", "s3://out/f/")


def test_rows_flag_rejects_an_unknown_row(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        throughput.parse_args(["--rows", "feed,nope"])
    assert exit_info.value.code == 2
    assert "--rows: unknown ['nope']" in capsys.readouterr().err


def test_obstores_native_io_threads_count_as_s3_work_and_other_native_threads_as_the_model() -> (
    None
):
    # GIVEN obstore's runtime started (its I/O threads have no Python object, like torch's)
    store = MemoryStore()
    obstore.put(store, "k", b"x")
    # WHEN the accounting groups the threads Python does not know (a new thread names itself
    # once it first runs: on a busy machine that can come after the runtime's start returns)
    deadline = time.monotonic() + 10
    while True:
        native = [int(t) for t in os.listdir("/proc/self/task") if int(t) not in python_threads()]
        groups = {native_group(tid) for tid in native}
        if S3_NATIVE_GROUP in groups or time.monotonic() > deadline:
            break
        time.sleep(0.01)

    # THEN obstore's are S3 work, not the model's; a thread named otherwise stays the model's
    assert S3_NATIVE_GROUP in groups
    assert native_group(threading.main_thread().native_id or 0) == NATIVE_GROUP


def test_a_native_thread_that_once_ran_python_is_still_a_native_thread() -> None:
    # GIVEN a thread Python did not start that calls into threading (as a tokio thread running
    # obstore's credential provider does when it logs), registering a _DummyThread, and one
    # Python thread
    registered, release = threading.Event(), threading.Event()
    ids: list[int] = []

    def foreign() -> None:
        ids.append(threading.current_thread().native_id or 0)
        registered.set()
        release.wait(10)

    _thread.start_new_thread(foreign, ())
    started = threading.Thread(target=release.wait, args=(10,), name="fetch_0")
    started.start()
    try:
        assert registered.wait(10)
        # WHEN the accounting lists the threads Python started
        known = python_threads()
    finally:
        release.set()
        started.join()

    # THEN the Python thread is there by its name, the foreign one is not
    assert known[started.native_id or 0] == "fetch_0"
    assert ids[0] not in known


def test_a_thread_using_a_few_ms_of_cpu_shows_them_in_its_stage() -> None:
    # GIVEN a meter started, then a live thread that burns about 3 ms of CPU (under one 10 ms
    # tick, as a light fetch or write thread does over a short window)
    meter = CpuMeter(ModelClock())
    meter.start()
    used: list[float] = []
    burnt, release = threading.Event(), threading.Event()

    def burn() -> None:
        began = time.thread_time()
        while time.thread_time() - began < 0.003:
            pass
        used.append(time.thread_time() - began)
        burnt.set()
        release.wait()

    thread = threading.Thread(target=burn, name="light_0")
    thread.start()
    burnt.wait()

    # WHEN the meter stops while the thread is alive
    report = meter.stop()
    release.set()
    thread.join()

    # THEN its stage shows what it used, to the millisecond (10 ms ticks would show 0 or 10)
    assert report.by_group.get("light", 0.0) == pytest.approx(used[0], abs=0.001)


def test_cost_per_million_images_counts_each_request_at_its_price() -> None:
    # GIVEN the consumer's requests per image for per-image files (one GET, one PUT, a tenth of
    # a receive and of a delete batch) on an instance at $0.98/h feeding 2,000 images/s
    per_image = {
        "GetObject": 1.0,
        "PutObject": 1.0,
        "ReceiveMessage": 0.1,
        "DeleteMessageBatch": 0.1,
    }

    # WHEN it is priced
    cost = image_cost(per_image, usd_per_hour=0.98, images_per_s=2000)

    # THEN S3 is $5.40, SQS $0.08, the instance 0.98 / 7.2 M images per hour, plus the upload path
    assert cost.s3 == pytest.approx(5.40)
    assert cost.sqs == pytest.approx(0.08)
    assert cost.instance == pytest.approx(0.98 / 7.2)
    assert cost.upload_path == pytest.approx(0.54, abs=0.01)
    assert cost.total == pytest.approx(5.40 + 0.08 + 0.98 / 7.2 + cost.upload_path)


def test_shards_turn_a_put_per_image_into_two_per_shard() -> None:
    per_image = {"GetObject": 1.0, "PutObject": 1.02, "HeadObject": 0.02, "ReceiveMessage": 0.1}
    shards = layout_requests(per_image, "shards", shard_rows=10_000)
    assert shards == {"GetObject": 1.0, "PutObject": 0.0002, "ReceiveMessage": 0.1}
    assert layout_requests(per_image, "files") == per_image
    rows = cost_table(per_image, [_ceiling_row()], shard_rows=10_000)
    by_layout = {r["layout"]: r for r in rows}
    assert by_layout["files"]["fed"]["s3"] == pytest.approx(0.4 + 5.1 + 0.008, abs=1e-3)
    assert by_layout["shards"]["fed"]["s3"] == pytest.approx(0.4 + 0.001, abs=1e-3)
    assert unpriced({"GetObject": 1.0, "Bogus": 1.0}) == ["Bogus"]


def _ceiling_row() -> dict[str, object]:
    return {
        "instance": "g6.2xlarge",
        "usd_per_hour": 0.98,
        "gpu_images_per_s": 2000,
        "bound_images_per_s": 1000,
    }


def test_the_gil_figure_names_its_sampling_error_when_py_spy_counted_it() -> None:
    # 25 samples: one standard error is a fifth of the figure; the probe and an empty window
    # name none (the probe's error is of another kind)
    assert sampling_error({"gil_method": "py-spy", "gil_samples": 25}).endswith(
        "25 samples, +-20 % from sampling alone"
    )
    assert sampling_error({"gil_method": "probe", "gil_samples": 25}) == ""
    assert sampling_error({"gil_method": "py-spy", "gil_samples": 0}) == ""


def test_the_consumers_cpu_is_also_given_over_the_moto_servers() -> None:
    # 3.3 ms outside the model while the moto server spent 27.5 ms on the same images: 0.12;
    # a window in which the moto server was not measured gives no ratio rather than infinity
    assert relative_cpu(3.3, 27.5) == pytest.approx(0.12)
    assert relative_cpu(3.3, 0.0) is None


def test_the_decode_share_is_its_processes_or_its_threads() -> None:
    # decode processes (the default) or --decode-isolation threads; the other stages are not
    assert decode_cpu_ms({"child-processes": 1.9, "fetch": 0.3, "write": 0.2}) == 1.9
    assert decode_cpu_ms({"decode": 2.1, "fetch": 0.3}) == 2.1
    assert decode_cpu_ms({"fetch": 0.3, "infer (outside the forward)": 0.9}) == 0.0
    # (--decode cuda: what the device refuses is decoded on the host-decode threads)
    assert decode_cpu_ms({"host-decode": 0.2, "infer (outside the forward)": 0.9}) == 0.2


def _feed_row(**figures: object) -> dict[str, object]:
    row: dict[str, object] = {
        "row": "feed",
        "decode": "pil",
        "gil_method": "py-spy",
        "gil_ms_per_image": 0.31,
        "outside_model_cpu_ms_per_image": 2.6,
        "outside_model_not_decode_cpu_ms_per_image": 0.73,
    }
    return {**row, **figures}


def test_the_feed_rows_figures_are_judged_against_issue_11s_targets() -> None:
    # WHEN only the feed row ran (no main model: its rows' targets are not listed)
    met = throughput.evaluate_targets({"feed": _feed_row()}, {})
    missed = throughput.evaluate_targets(
        {
            "feed": _feed_row(
                gil_ms_per_image=0.53,
                outside_model_cpu_ms_per_image=3.22,
                outside_model_not_decode_cpu_ms_per_image=1.07,
            )
        },
        {},
    )

    # THEN each of the three figures meets its target, or misses it, at its own threshold
    assert [(t["issue"], t["threshold"], t["met"], t["applies"]) for t in met] == [
        (11, "<= 0.5", True, True),
        (11, "<= 3.0", True, True),
        (11, "<= 1.0", True, True),
    ]
    assert [t["value"] for t in missed] == [0.53, 3.22, 1.07]
    assert [t["met"] for t in missed] == [False, False, False]
    # AND the line says which issue set it and the verdict
    printed = throughput.format_details({"rows": [], "decode_only": None, "targets": missed})
    assert "  feed: CPU outside the model, ms per 500x375 JPEG (CPU decode) (issue 11): 3.22" in (
        printed
    )
    assert printed.count("MISSED") == 3


def test_the_feed_targets_apply_to_cpu_decode_and_py_spys_count_only() -> None:
    # GPU decode: the host's CPU is another figure; the draft decodes less than the exact path
    # (only the stages around the decode compare); the probe's GIL count reads higher
    on_gpu = throughput.evaluate_targets({"feed": _feed_row(decode="cuda")}, {})
    draft = throughput.evaluate_targets({"feed": _feed_row(decode="pil-draft")}, {})
    probed = throughput.evaluate_targets({"feed": _feed_row(gil_method="probe")}, {})
    assert [t["applies"] for t in on_gpu] == [True, False, False]
    assert [t["applies"] for t in draft] == [True, False, True]
    assert [t["applies"] for t in probed] == [False, True, True]
    # AND without the feed row there is nothing of issue 11's to judge
    assert throughput.evaluate_targets({}, {}) == []


def test_the_rows_against_moto_keep_a_moto_sized_concurrency_unless_told() -> None:
    # WHEN the feed row and the e2e row build their consumer's command lines
    default = throughput.parse_args([])
    told = throughput.parse_args(["--fetch-concurrency", "64", "--receivers", "5"])

    def option(argv: list[str], flag: str) -> str:
        return argv[argv.index(flag) + 1]

    # THEN they pass moto's concurrency (the consumer's defaults are sized for AWS's latency)
    for argv in (
        feed_argv(default, "q", "dlq", "s3://out/feed/"),
        throughput.consumer_argv(default, 16, "q", "dlq"),
    ):
        assert option(argv, "--receivers") == str(throughput.MOTO_CONCURRENCY["receivers"])
        assert option(argv, "--fetch-concurrency") == "16"
        assert option(argv, "--write-concurrency") == "16"
    # and what the command line says wins
    argv = feed_argv(told, "q", "dlq", "s3://out/feed/")
    assert (option(argv, "--fetch-concurrency"), option(argv, "--receivers")) == ("64", "5")
    assert option(argv, "--write-concurrency") == "16"

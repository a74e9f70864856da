"""``--decode cuda`` in the pipeline: the inference thread decodes each micro-batch on the device.

There is no GPU here, so the device is the CPU and torchvision's libjpeg-turbo stands in for
nvJPEG (the same resize and crop code runs); what is tested is the hand-over: one bad image fails
alone with its own code, the others are computed as a smaller batch, and their features are
those of the exact path within the issue's tolerance.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import timm
import torch

from bottleneck_contract.messages import ImageRef
from consumer.batch_queue import BatchQueue
from consumer.byte_budget import ByteBudget
from consumer.decode import DecodeLimits
from consumer.gpu_decode import GpuBatchDecoder, TorchvisionDecoder
from consumer.inflight import InFlight
from consumer.model import Backbone
from consumer.preprocess import ImagePreparer, InputSpec
from consumer.stages.infer import Inference
from consumer.stats import Stats
from consumer.work import ImageTask, Message
from tests.corpus import GOOD_CASES, photo_jpeg

CPU = torch.device("cpu")


def backbone() -> Backbone:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    return Backbone(model, InputSpec.from_model(model), device=CPU, precision="fp32", pool="avg")


def task(name: str, data: bytes) -> ImageTask:
    message = Message(name, "h", "{}", 1, 0.0, 60.0)
    image = ImageTask(message=message, ref=ImageRef("images", name), data=data)
    message.images = [image]
    return image


def test_a_micro_batch_is_decoded_on_the_device_and_a_bad_image_fails_alone() -> None:
    # GIVEN the inference stage with a batched decoder, and a batch of JPEGs, a PNG (the host
    # path's) and a JPEG cut short
    model = backbone()
    limits = DecodeLimits()
    decoder = GpuBatchDecoder(model.spec, limits, CPU, backend=TorchvisionDecoder(CPU))
    computed: list[ImageTask] = []
    stats = Stats()
    inference = Inference(
        backbone=model,
        source=BatchQueue(8),
        sink=computed.append,
        inflight=InFlight(100, lambda action: None),
        stats=stats,
        batch_size=8,
        max_wait=0.0,
        halted=threading.Event(),
        batch_decoder=decoder,
    )
    jpegs = {f"{i}.jpg": photo_jpeg(300 + 7 * i, 200 + 5 * i, seed=i) for i in range(5)}
    png = GOOD_CASES["rgba.png"]
    cut = photo_jpeg(300, 200, seed=9)[:-700]
    batch = [task(n, d) for n, d in jpegs.items()] + [task("a.png", png), task("cut.jpg", cut)]
    budget = ByteBudget(1 << 30)  # each image holds its bytes' share, as the fetch took it
    for t in batch:
        assert t.data is not None and budget.take(len(t.data))
        t.budget, t.budgeted = budget, len(t.data)

    # WHEN it runs the batch
    submitted = inference._submit(batch)
    assert submitted is not None
    inference._finish(*submitted)

    # THEN the cut JPEG failed alone with the exact path's code, the other six were computed,
    # and their features are the exact path's within the tolerance
    failed = {t.ref.key: t.failure.error_code for t in batch if t.failure is not None}
    assert failed == {"cut.jpg": "truncated"}
    assert [t.ref.key for t in computed] == [*jpegs, "a.png"]
    exact = ImagePreparer(model.spec, limits)
    reference = model(model.stack([exact(d) for d in [*jpegs.values(), png]]))
    for row, t in zip(reference, computed, strict=True):
        assert t.features is not None
        relative = np.linalg.norm(t.features - row) / np.linalg.norm(row)
        cosine = float(np.dot(t.features, row) / (np.linalg.norm(t.features) * np.linalg.norm(row)))
        assert relative <= 0.01 and cosine >= 0.9999, (t.ref.key, relative, cosine)
    # AND every image let its encoded bytes go once its batch was done, giving the budget back
    assert all(t.data is None for t in computed)
    assert budget.held == 0


def test_a_batch_halved_for_device_memory_decodes_again_and_gives_its_bytes_back() -> None:
    # GIVEN the inference stage with a batched decoder on a device that runs out of memory
    # above 2 images, and a batch of 6 JPEGs each holding its bytes' share of a budget
    model = backbone()
    real_submit = model.submit
    sizes: dict[str, list[int]] = {"oom": [], "ok": []}

    def small_device(pixels: torch.Tensor) -> Any:
        fits = pixels.shape[0] <= 2
        sizes["ok" if fits else "oom"].append(int(pixels.shape[0]))
        if not fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_submit(pixels)

    model.submit = small_device  # type: ignore[method-assign,assignment]
    decoder = GpuBatchDecoder(model.spec, DecodeLimits(), CPU, backend=TorchvisionDecoder(CPU))
    computed: list[ImageTask] = []
    inference = Inference(
        backbone=model,
        source=BatchQueue(8),
        sink=computed.append,
        inflight=InFlight(100, lambda action: None),
        stats=Stats(),
        batch_size=8,
        max_wait=0.0,
        halted=threading.Event(),
        batch_decoder=decoder,
    )
    batch = [task(f"{i}.jpg", photo_jpeg(200, 150, seed=20 + i)) for i in range(6)]
    budget = ByteBudget(1 << 30)
    for t in batch:
        assert t.data is not None and budget.take(len(t.data))
        t.budget, t.budgeted = budget, len(t.data)

    # WHEN it runs the batch
    submitted = inference._submit(batch)
    if submitted is not None:
        inference._finish(*submitted)

    # THEN the halves decoded again from the bytes they still held, every image was computed,
    # and only then were the bytes let go and the budget given back
    assert sizes["oom"][0] == 6 and sum(sizes["ok"]) == 6
    assert sorted(t.ref.key for t in computed) == sorted(t.ref.key for t in batch)
    assert all(t.features is not None and t.data is None for t in computed)
    assert budget.held == 0

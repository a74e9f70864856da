"""``--decode cuda`` in the pipeline: the inference thread decodes each micro-batch on the device.

There is no GPU here, so the device is the CPU and torchvision's libjpeg-turbo stands in for
nvJPEG (the same resize and crop code runs); what is tested is the hand-over: one bad image fails
alone with its own code, the others are computed as a smaller batch, and their features are
those of the exact path within the issue's tolerance.
"""

from __future__ import annotations

import threading

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

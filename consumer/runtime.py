"""The composition root: from a :class:`~consumer.config.Config` to everything the worker needs.

Building happens once, before any message is received, so that every configuration problem
(unknown model, missing weights, no dead-letter queue, no such device) is reported first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from consumer.aws import Clients, make_clients
from consumer.config import Config
from consumer.decode import DecodeLimits
from consumer.errors import ConfigError
from consumer.features import FeatureSettings, library_versions
from consumer.model import (
    Backbone,
    create_model,
    model_label,
    resolve_head,
    select_device,
    select_precision,
)
from consumer.objects import ObjectClient, open_objects
from consumer.preprocess import ImagePreparer, InputSpec, Preparer
from consumer.sqs import WorkQueue, resolve_dead_letter_url
from consumer.sqs_lean import open_queue_client, queue_client_name
from consumer.stages.ack import ACK_CALLS
from consumer.weights import resolve_weights

if TYPE_CHECKING:
    from consumer.gpu_decode import GpuBatchDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    """The built pieces: clients, queues, the backbone and the settings behind the numbers."""

    config: Config
    clients: Clients
    objects: ObjectClient  # the hot path's GET, HEAD and conditional PUT (--s3-client)
    work_queue: WorkQueue
    backbone: Backbone
    prepare: Preparer  # the host decode path (all images, or the GPU decoder's fallbacks)
    settings: FeatureSettings
    fingerprint: str
    feature_shape: tuple[int, ...]
    # --decode cuda: JPEGs decoded a micro-batch at a time on the device by the inference
    # thread (the loader then only fetches); None on the host paths.
    batch_decoder: GpuBatchDecoder | None = None

    def __post_init__(self) -> None:
        # A worker given a template would write into a folder literally named "{model}".
        if self.config.output_template.templated:
            raise ValueError(f"the runtime's output must be expanded: {self.config.output}")


def build_backbone(
    config: Config, clients: Clients | None = None
) -> tuple[Backbone, FeatureSettings]:
    """The model on its device with the settings that fingerprint its numbers (no queue needed)."""
    device = select_device(config.device)
    precision = select_precision(config.precision, device)
    s3 = clients.s3 if clients is not None else None
    weights = resolve_weights(config.weights, seed=config.seed, cache_dir=config.cache_dir, s3=s3)
    head = resolve_head(config.head, config.model, config.pool)
    model, weights_identity = create_model(config.model, weights, head=head)
    spec = InputSpec.from_model(model)
    backbone = Backbone(
        model,
        spec,
        device=device,
        precision=precision,
        pool=config.pool,
        normalize=config.normalize,
        channels_last=config.channels_last,
        compile=config.compile,
    )
    settings = FeatureSettings(
        model=model_label(model, config.model),
        weights=weights_identity,
        pool=config.pool,
        spec=spec,
        dtype=config.feature_dtype,
        precision=precision,
        decode=resolve_decode(config.decode, device),
        head=head,
        normalize=config.normalize,
        libraries=library_versions(numeric_libraries()),
    )
    return backbone, settings


def numeric_libraries() -> dict[str, str]:
    """The versions of the libraries whose code computes the numbers: timm (the model code and
    the data config), torch (the kernels), Pillow (decoding, resizing)."""
    import PIL
    import timm

    return {"pillow": PIL.__version__, "timm": timm.__version__, "torch": torch.__version__}


def resolve_decode(decode: str, device: torch.device) -> str:
    """``--decode auto``: batched nvJPEG on a CUDA device, exact Pillow elsewhere."""
    if decode == "auto":
        return "cuda" if device.type == "cuda" else "pil"
    return decode


def build_batch_decoder(
    config: Config, backbone: Backbone, host: Preparer
) -> GpuBatchDecoder | None:
    """``--decode cuda`` (the default on a CUDA device): the batched GPU decoder, whose
    fallbacks (other formats, refused or damaged JPEGs) go to ``host``, on a thread pool."""
    if resolve_decode(config.decode, backbone.device) != "cuda":
        return None
    if backbone.device.type != "cuda":
        raise ConfigError(f"--decode cuda: needs a CUDA device, the model is on {backbone.device}")
    from concurrent.futures import ThreadPoolExecutor

    from consumer.gpu_decode import GpuBatchDecoder

    return GpuBatchDecoder(
        backbone.spec,
        host.limits,
        backbone.device,
        host=cast("Callable[[bytes], np.ndarray]", host),  # the host paths return arrays
        host_pool=ThreadPoolExecutor(config.decode_threads, thread_name_prefix="host-decode"),
    )


def build_preparer(config: Config, backbone: Backbone) -> Preparer:
    """The host decode path: exact Pillow (or ``pil-draft``), in processes or threads."""
    limits = DecodeLimits(max_pixels=config.max_pixels, max_bytes=config.max_image_bytes)
    draft = config.decode == "pil-draft"
    if config.decode_isolation == "threads":
        return ImagePreparer(backbone.spec, limits, draft=draft)
    from consumer.decode_pool import ChildSpec, DecodeProcesses, DecoderUnavailable

    spec = backbone.spec
    child = ChildSpec(
        spec.input_size,
        spec.interpolation,
        spec.mean,
        spec.std,
        spec.crop_pct,
        spec.crop_mode,
        limits,
        draft=draft,
        memory_bytes=config.decode_memory_mb << 20,
        hook=config.decode_hook,
        consumer_pid=os.getpid(),
    )
    try:
        return DecodeProcesses(child, workers=config.decode_threads)
    except DecoderUnavailable as exc:
        raise ConfigError(f"--decode-isolation processes: {exc}") from None


def build_runtime(
    config: Config, clients: Clients | None = None, objects: ObjectClient | None = None
) -> Runtime:
    """Resolve queues, weights and the model; raises :class:`ConfigError` on any bad setting.

    With ``clients`` passed in (moto in-process, a fault-injecting proxy), ``--s3-client auto``
    and ``--sqs-client auto`` use those clients for the hot path's calls too: the caller chose
    where S3 and SQS are, and how they answer.
    """
    pool = config.fetch_concurrency + config.write_concurrency + config.receivers + 4
    # Long polls, the acker's calls, the heartbeat and a dead-letter send, each on its own
    # kept-alive connection.
    sqs_pool = config.receivers + ACK_CALLS + 2
    s3_client, sqs_client = config.s3_client, config.sqs_client
    if clients is not None:
        s3_client = "boto3" if s3_client == "auto" else s3_client
        sqs_client = "boto3" if sqs_client == "auto" else sqs_client
    clients = clients or make_clients(pool_size=pool, sqs_pool_size=sqs_pool)
    objects = objects or open_objects(s3_client, clients.s3)
    queue_client = open_queue_client(sqs_client, clients.sqs, clients.session)
    try:
        dead_letter_url = config.dead_letter_url or resolve_dead_letter_url(
            clients.sqs, config.queue_url
        )
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"--queue-url: cannot read the queue's attributes: {_line(exc)}"
        ) from None
    backbone, settings = build_backbone(config, clients)
    feature_shape = backbone.feature_shape()
    if config.compile or backbone.device.type == "cuda":
        started = time.monotonic()
        backbone.warm_up(config.batch_size)
        log.info(
            "model warmed up", extra={"fields": {"seconds": round(time.monotonic() - started, 1)}}
        )
    prepare = build_preparer(config, backbone)
    fingerprint = settings.fingerprint()
    config = expand_output(config, settings.model, fingerprint)
    runtime = Runtime(
        config=config,
        clients=clients,
        objects=objects,
        work_queue=WorkQueue(queue_client, config.queue_url, dead_letter_url),
        backbone=backbone,
        prepare=prepare,
        batch_decoder=build_batch_decoder(config, backbone, prepare),
        settings=settings,
        fingerprint=fingerprint,
        feature_shape=feature_shape,
    )
    log.info(
        "consumer ready",
        extra={
            "fields": {
                "model": settings.model,
                "weights": settings.weights,
                "device": str(backbone.device),
                "precision": settings.precision,
                "pool": settings.pool,
                "head": settings.head,
                "normalize": settings.normalize,
                "libraries": settings.libraries,
                "feature_shape": list(feature_shape),
                "input": list(backbone.spec.input_size),
                "fingerprint": runtime.fingerprint,
                "output": str(config.output),
                "dead_letter_url": dead_letter_url,
                "s3_client": objects.name,
                "sqs_client": queue_client_name(queue_client),
            }
        },
    )
    return runtime


def expand_output(config: Config, model: str, fingerprint: str) -> Config:
    """``config`` with ``--output``'s ``{model}`` and ``{fingerprint}`` filled in (unchanged
    without placeholders): everything downstream (feature keys, the quarantine's markers and the
    dedupe index under ``<output>_bottleneck/``) then lies in this model's and setting's folder.

    ``model`` is the resolved label the feature files' ``model`` metadata carries
    (``resnet50.a1_in1k`` for ``resnet50``), so a folder says which weights' tag it holds.
    """
    template = config.output_template
    if not template.templated:
        return config
    try:
        output = template.expand(model, fingerprint)
    except ValueError as exc:
        raise ConfigError(f"--output {template}: {exc}") from None
    return replace(config, output=output)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]

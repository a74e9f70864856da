"""The consumer's one frozen configuration: flags over environment variables over defaults.

Every option is declared once in :data:`OPTIONS` (flag, environment variable, parser, default,
help); :meth:`Config.from_args` builds the argument parser from that table, merges the sources and
validates, raising :class:`~consumer.errors.ConfigError` with one line that names the option. No
other module of the consumer reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from bottleneck_contract.locations import OutputTemplate, S3Location
from consumer.errors import ConfigError

ENV_PREFIX = "BOTTLENECK_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the consumer needs to run, resolved and validated once at start-up."""

    queue_url: str
    # As given: {model}/{fingerprint} placeholders stay in its prefix until build_runtime expands
    # them (the fingerprint needs the built model); the worker only ever sees the expansion.
    output: S3Location
    dead_letter_url: str | None = None
    model: str = "resnet50"
    weights: str = "pretrained"
    pool: str = "avg"
    head: str = "auto"
    normalize: str = "none"
    feature_dtype: str = "float32"
    batch_size: int = 64
    max_wait_ms: int = 200
    device: str = "auto"
    precision: str = "auto"
    idle_exit: float = 0.0
    overwrite: bool = False
    existing_check: str = "write"
    orphan_check: str = "off"
    dedupe: str = "off"
    s3_client: str = "auto"
    sqs_client: str = "auto"
    decode: str = "auto"
    receivers: int = 8
    fetch_concurrency: int = 128
    decode_workers: int = 0
    decode_isolation: str = "processes"
    decode_memory_mb: int = 2048
    decode_hook: str = ""
    write_concurrency: int = 128
    max_in_flight: int = 0
    visibility_timeout: int = 60
    stop_grace: float = 25.0
    stall_timeout: float = 900.0
    max_pixels: int = 100_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    # Four --decode cuda batches of 64 images of 16 MB (consumer.byte_budget): typical photos
    # never reach it, and it is a small share of the stack's default 28,000 MiB job.
    max_encoded_bytes: int = 4 * 1024**3
    seed: int = 0
    cache_dir: Path = field(
        default_factory=lambda: Path.home() / ".cache" / "serverless-bottleneck"
    )
    channels_last: bool = True
    compile: bool = False
    devices: str = "one"
    spot_watch: str = "auto"
    metadata_endpoint: str = "http://169.254.169.254"
    metrics: str = "auto"
    log_level: str = "INFO"
    layout: str = "files"
    shard_rows: int = 10_000
    shard_max_seconds: float = 300.0

    @property
    def in_flight_limit(self) -> int:
        """Images held at once (fetched, decoded, batched, on the device or being written)."""
        if self.max_in_flight:
            return self.max_in_flight
        # Two batches being assembled or computed, one being written, plus the fetches and the
        # writes that hide S3's latency: against AWS an image is held for 150-250 ms (a GET, a
        # batch's wait and forward pass, a PUT, the delete), so a GPU's 2,000 images/s need
        # 300-500 held (benchmarks.latency); small enough to bound memory.
        pipeline = 3 * self.batch_size + self.fetch_concurrency + self.write_concurrency
        if self.layout == "shards":
            # A shard's images stay held until the shard is written: a whole shard, and the
            # pipeline filling the next one meanwhile.
            return self.shard_rows + pipeline
        return pipeline

    @property
    def decode_threads(self) -> int:
        return self.decode_workers or max(1, os.cpu_count() or 1)

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Config:
        """Build the configuration from command-line flags and environment variables."""
        environ = os.environ if environ is None else environ
        parser = build_parser()
        namespace = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw = getattr(namespace, option.dest)
            source = option.flag
            if raw is None and option.env in environ:
                raw, source = environ[option.env], option.env
            if raw is None:
                continue
            try:
                values[option.dest] = option.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: {exc}") from None
        for required in ("queue_url", "output"):
            if required not in values:
                option = _BY_DEST[required]
                raise ConfigError(f"{option.flag} (or {option.env}) is required")
        _check_pooled_only(values)
        _check_shard_options(values)
        # "auto" switches resolve here, the one place that reads the environment: inside an AWS
        # Batch job (AWS_BATCH_JOB_ID is set by Batch) the Spot watch and EMF metrics are on.
        in_batch = bool(environ.get("AWS_BATCH_JOB_ID"))
        for name, on in (("spot_watch", "on"), ("metrics", "emf")):
            if values.get(name, "auto") == "auto":
                values[name] = on if in_batch else "off"
        config = cls(**values)
        _check_layout(config, values)
        return config

    @property
    def output_template(self) -> OutputTemplate:
        """``--output`` as a template (no fields when it names one concrete prefix)."""
        return OutputTemplate.parse(str(self.output))

    @property
    def queue_name(self) -> str:
        """The work queue's name (the last part of its URL), the metrics' ``Queue`` dimension."""
        return self.queue_url.rstrip("/").rsplit("/", 1)[-1]


def _check_pooled_only(values: Mapping[str, Any]) -> None:
    """The head and the normalisation act on the pooled vector; a feature map has neither."""
    if values.get("pool", "avg") == "avg":
        return
    if values.get("head") == "keep":
        raise ConfigError(
            "--head keep: needs --pool avg (the head takes the pooled vector; --pool none writes "
            "the feature map before it)"
        )
    if values.get("normalize", "none") != "none":
        raise ConfigError(
            f"--normalize {values['normalize']}: needs --pool avg (a feature map is not one "
            "vector: normalise it per position or as a whole, as its use needs, when reading it)"
        )


# SQS holds at most 120,000 messages in flight per standard queue (all consumers together);
# past it, ReceiveMessage fails with OverLimit.
SQS_IN_FLIGHT_LIMIT = 120_000
# A shard's images are held (their messages kept invisible by the heartbeat) until it is written.
# SQS keeps a received message at most 12 hours; a shard must be written long before, with room
# for a failed flush's retry and the pipeline's own time.
MAX_SHARD_SECONDS = 3600.0
# What does not apply to shards: each option's value that needs per-image files, and why.
_PER_IMAGE_ONLY = {
    "existing_check": (
        "head",
        "the HEAD looks for a per-image feature file; a shard is not found by key, so every "
        "delivered image is computed",
    ),
    "orphan_check": (
        "head",
        "a shard's row cannot be deleted alone; rows of deleted images stay until the shard is",
    ),
    "dedupe": (
        "content",
        "the content index points at per-image feature files to copy",
    ),
}


def _check_shard_options(values: Mapping[str, Any]) -> None:
    """The shard options mean nothing with per-image files: say so rather than ignore them."""
    if values.get("layout", "files") == "shards":
        return
    for name in ("shard_rows", "shard_max_seconds"):
        if name in values:
            raise ConfigError(f"{_BY_DEST[name].flag}: only with --layout shards")


def _check_layout(config: Config, given: Mapping[str, Any]) -> None:
    """``--layout shards``: the combinations that cannot work, and the in-flight cap."""
    if config.layout != "shards":
        return
    for name, (value, why) in _PER_IMAGE_ONLY.items():
        if getattr(config, name) == value:
            raise ConfigError(f"{_BY_DEST[name].flag} {value}: not with --layout shards ({why})")
    if config.shard_max_seconds <= 0 or config.shard_max_seconds > MAX_SHARD_SECONDS:
        raise ConfigError(
            f"--shard-max-seconds: must be above 0 and at most {MAX_SHARD_SECONDS:.0f} (a "
            "shard's messages stay in flight until it is written; SQS holds one at most 12 h), "
            f"got {config.shard_max_seconds:g}"
        )
    limit = config.in_flight_limit
    if "max_in_flight" in given and limit < config.shard_rows + config.batch_size:
        raise ConfigError(
            f"--max-in-flight {limit}: with --layout shards it must hold a whole shard and a "
            f"batch (--shard-rows {config.shard_rows} + --batch-size {config.batch_size}): a "
            "shard's images stay in flight until it is written"
        )
    if limit > SQS_IN_FLIGHT_LIMIT and "max_in_flight" in given:
        raise ConfigError(
            f"--max-in-flight {limit}: SQS allows {SQS_IN_FLIGHT_LIMIT:,} messages in flight per "
            "queue, for all consumers together"
        )
    if limit > SQS_IN_FLIGHT_LIMIT:
        raise ConfigError(
            f"--shard-rows {config.shard_rows}: a shard's messages stay in flight until it is "
            f"written, {limit:,} with the pipeline's; SQS allows {SQS_IN_FLIGHT_LIMIT:,} per "
            "queue, for all consumers together"
        )


@dataclass(frozen=True, slots=True)
class Option:
    """One configuration option: its flag, environment variable, parser and help."""

    dest: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    is_switch: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def env(self) -> str:
        if self.dest == "dead_letter_url":
            return ENV_PREFIX + "DLQ_URL"
        return ENV_PREFIX + self.dest.upper()


def _positive_int(text: Any) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: Any) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError(f"must be zero or a positive integer, got {text!r}")
    return value


def _int(text: Any) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None


def _non_negative_float(text: Any) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a finite number >= 0, got {text!r}")
    return value


def _switch(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return value

    return parse


def _device(text: Any) -> str:
    value = str(text).strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", value):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N; got {text!r}")
    return value


def _http_url(text: Any) -> str:
    value = str(text).strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/]+", value):
        raise ValueError(f"must be http://HOST[:PORT], got {text!r}")
    return value


def _queue_url(text: Any) -> str:
    value = str(text).strip()
    if not re.fullmatch(r"https?://\S+/\d{12}/[\w.-]+|https?://\S+/[\w.-]+", value):
        raise ValueError(
            "must be an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), "
            f"got {text!r}"
        )
    return value


def _model_name(text: Any) -> str:
    value = str(text).strip()
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", value) and not value.startswith(
        "hf-hub:"
    ):
        raise ValueError(
            "must be a timm model name such as resnet50 or vit_base_patch16_224.augreg_in21k, "
            f"got {text!r}"
        )
    return value


def _weights(text: Any) -> str:
    value = str(text).strip()
    if value in {"pretrained", "random"} or value.startswith("s3://"):
        return value
    if not value:
        raise ValueError("must be pretrained, random, a file path or an s3:// URI")
    return value  # a local path; its existence is checked when the model is built


def _output(text: Any) -> S3Location:
    # Checked here, so that a bad placeholder is a config error before anything is built; kept
    # as written (placeholders in the prefix) for build_runtime to expand.
    template = OutputTemplate.parse(str(text))
    return S3Location(template.root.bucket, template.key_prefix)


def _hook_path(text: Any) -> str:
    module, sep, name = str(text).partition(":")
    if not (sep and module and name.isidentifier()):
        raise ValueError(f"expected module:function, got {text!r}")
    return str(text)


def _log_level(text: Any) -> str:
    value = str(text).strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR; got {text!r}")
    return value


OPTIONS: tuple[Option, ...] = (
    Option("queue_url", _queue_url, "SQS work queue URL (required)", "URL"),
    Option(
        "dead_letter_url",
        _queue_url,
        "where permanent failures go (default: the queue's redrive target)",
        "URL",
    ),
    Option(
        "output",
        _output,
        "s3://bucket/prefix/ for feature files (required); may end in {model}/{fingerprint}/ "
        "(whole segments, either or both), filled in at start-up, so that each model and "
        "setting writes beside the others",
        "S3URI",
    ),
    Option("model", _model_name, "timm model name, optionally with .tag (default resnet50)"),
    Option(
        "weights",
        _weights,
        "pretrained (timm/Hugging Face cache), a local .safetensors/.pth file, an s3:// URI, "
        "or random (demos and tests only)",
    ),
    Option("pool", _choice("avg", "none"), "avg: pooled pre-logits vector; none: feature map"),
    Option(
        "head",
        _choice("auto", "keep", "drop"),
        "drop: the pooled vector before the model's head (a classifier's pre-logits); keep: the "
        "head's output (a CLIP image tower's projection into the image-text space); auto "
        "(default): keep for CLIP-family image towers, drop for every other model",
    ),
    Option(
        "normalize",
        _choice("none", "l2"),
        "l2: divide each feature vector by its L2 norm, on the device (for cosine similarity "
        "search; a zero vector stays zero); none (default): as the model gives them",
    ),
    Option("feature_dtype", _choice("float32", "float16"), "dtype of the written arrays"),
    Option("batch_size", _positive_int, "largest micro-batch (default 64)", "N"),
    Option("max_wait_ms", _non_negative_int, "longest a partial batch waits (default 200)", "MS"),
    Option("device", _device, "auto, cpu, cuda or cuda:N (default auto)"),
    Option("precision", _choice("auto", "fp32", "bf16", "fp16"), "fp32, bf16, fp16 or auto"),
    Option(
        "idle_exit",
        _non_negative_float,
        "exit 0 after this many seconds with an empty queue and nothing in flight (0: never)",
        "SECONDS",
    ),
    Option("overwrite", _switch, "recompute even where a matching feature file exists", None, True),
    Option(
        "existing_check",
        _choice("write", "head"),
        "write: find existing feature files at write time (conditional put, HEAD only on a "
        "conflict; fewest requests); head: HEAD before fetching (pays when most messages are "
        "repeats)",
    ),
    Option(
        "orphan_check",
        _choice("off", "head"),
        "head: after each write, HEAD the image and remove the feature file again if the image "
        "was deleted while it was being computed (one more request per image); off: images "
        "deleted before their fetch are still skipped, the rare file written in the second "
        "between fetch and write is left to bottleneck-reconcile --fix",
    ),
    Option(
        "dedupe",
        _choice("off", "content"),
        "content: an image whose bytes (SHA-256) already have current features under the output "
        "prefix gets a server-side copy of them instead of a forward pass (an index under "
        "<output>_bottleneck/content/: one more HEAD per image, one more PUT per new content)",
    ),
    Option(
        "s3_client",
        _choice("auto", "obstore", "boto3"),
        "client for the per-image GET, HEAD and conditional PUT: obstore (native, GIL released), "
        "boto3, or auto (obstore when installed)",
    ),
    Option(
        "sqs_client",
        _choice("auto", "lean", "boto3"),
        "client for ReceiveMessage and the delete, visibility and dead-letter batches: lean "
        "(signed JSON over kept-alive HTTP, a fraction of botocore's CPU), boto3, or auto (lean "
        "unless the endpoint needs a proxy or moto mocks AWS in-process)",
    ),
    Option(
        "decode",
        _choice("auto", "pil", "pil-draft", "cuda"),
        "auto (default: cuda on a CUDA device, else pil), pil (exact), pil-draft (Pillow JPEG "
        "DCT scaling for large JPEGs) or cuda (batched nvJPEG decode and resize on the GPU, "
        "Pillow for the rest)",
    ),
    Option("receivers", _positive_int, "concurrent SQS long-polls (default 8)", "N"),
    Option("fetch_concurrency", _positive_int, "concurrent S3 GETs (default 128)", "N"),
    Option(
        "decode_workers",
        _non_negative_int,
        "decode processes (or threads) (default: one per core)",
        "N",
    ),
    Option(
        "decode_isolation",
        _choice("processes", "threads"),
        "processes (default): each decode in a crash-isolated child, so a file that crashes its "
        "decoder fails alone (decoder-crashed); threads: in this process",
    ),
    Option(
        "decode_memory_mb",
        _non_negative_int,
        "address space a decode process may add past start-up before an image fails as "
        "too-large (default 2048; 0: no cap)",
        "MB",
    ),
    Option(
        "decode_hook",
        _hook_path,
        "for tests only: module:function called with each image's bytes in the decode process",
        "MODULE:FUNCTION",
    ),
    Option("write_concurrency", _positive_int, "concurrent S3 PUTs (default 128)", "N"),
    Option(
        "max_in_flight",
        _non_negative_int,
        "cap on images held at once (default: 3 x batch size + fetch and write concurrency; with "
        "--layout shards, plus --shard-rows)",
        "N",
    ),
    Option(
        "visibility_timeout",
        _positive_int,
        "seconds each received message stays invisible; a heartbeat extends it while the "
        "message is held (default 60)",
        "SECONDS",
    ),
    Option(
        "stop_grace",
        _non_negative_float,
        "on SIGTERM, seconds to finish work in hand before releasing the rest (default 25)",
        "SECONDS",
    ),
    Option(
        "stall_timeout",
        _non_negative_float,
        "seconds of held work without an image settled or a batch computed after which the "
        "consumer releases its messages and exits 3 (default 900; 0: never)",
        "SECONDS",
    ),
    Option("max_pixels", _positive_int, "largest width x height decoded (default 100000000)", "N"),
    Option(
        "max_image_bytes", _positive_int, "largest object fetched, in bytes (default 64 MiB)", "N"
    ),
    Option(
        "max_encoded_bytes",
        _positive_int,
        "encoded image bytes held at once, fetched and not yet decoded; fetches wait beyond it "
        "(default 4 GiB)",
        "N",
    ),
    Option("seed", _non_negative_int, "seed for --weights random (default 0)", "N"),
    Option(
        "cache_dir", lambda t: Path(str(t)).expanduser(), "where s3:// weights are cached", "DIR"
    ),
    Option("channels_last", _switch, "channels_last memory format on the device (default on)"),
    Option("compile", _switch, "torch.compile the model, warmed up before receiving", None, True),
    Option(
        "devices",
        _choice("one", "all"),
        "one: a single worker on --device; all: one worker process per visible GPU",
    ),
    Option(
        "spot_watch",
        _choice("auto", "on", "off"),
        "poll the instance metadata for a Spot interruption notice every 5 s and stop "
        "gracefully (auto: on inside AWS Batch)",
    ),
    Option(
        "metadata_endpoint",
        _http_url,
        "instance metadata service for --spot-watch (default http://169.254.169.254)",
        "URL",
    ),
    Option(
        "metrics",
        _choice("auto", "emf", "off"),
        "CloudWatch Embedded Metric Format lines on stdout (auto: on inside AWS Batch)",
    ),
    Option("log_level", _log_level, "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    Option(
        "layout",
        _choice("files", "shards"),
        "files (default): one .npy per image, as the contract says; shards: many images' rows "
        "in one .npy under <output>shards/<fingerprint>/ with a JSON-lines index (two PUTs per "
        "shard instead of one per image)",
    ),
    Option(
        "shard_rows",
        _positive_int,
        "with --layout shards: rows per shard (default 10000); its messages stay in flight "
        "until it is written",
        "N",
    ),
    Option(
        "shard_max_seconds",
        _non_negative_float,
        "with --layout shards: write a shard once its first row is this old (default 300, "
        "at most 3600)",
        "SECONDS",
    ),
)
_BY_DEST = {option.dest: option for option in OPTIONS}
assert set(_BY_DEST) == {f.name for f in fields(Config)}, "OPTIONS and Config disagree"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors raise a one-line :class:`ConfigError` (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``bottleneck-consumer`` argument parser; every default is None so that sources merge."""
    parser = _Parser(
        prog="bottleneck-consumer",
        description="Pull image keys from SQS, compute timm bottleneck features in micro-batches, "
        "and write one .npy per image to S3. Every flag has a BOTTLENECK_* environment variable; "
        "the flag wins.",
    )
    for option in OPTIONS:
        help_text = f"{option.help} [env {option.env}]"
        if option.is_switch:
            parser.add_argument(
                option.flag, dest=option.dest, action="store_const", const=True, help=help_text
            )
        else:
            parser.add_argument(
                option.flag, dest=option.dest, metavar=option.metavar, help=help_text
            )
    return parser

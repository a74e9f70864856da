"""The producer's settings: one frozen dataclass, built once from the environment.

This is the only module of ``producer_lambda`` that reads ``os.environ`` (the Lambda handler
calls :meth:`Settings.from_env`; the CLI asks :func:`bottleneck_environ` for flag defaults). Every
parser here raises :class:`SettingsError` with one line that names the variable or flag at fault,
so a misconfigured Lambda fails on its first invocation with a message that says what to fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from bottleneck_contract.locations import InvalidS3Uri, OutputTemplate, S3Location
from bottleneck_contract.suffixes import IMAGE_SUFFIXES

__all__ = [
    "DEFAULT_JOB_NAME_PREFIX",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_MESSAGES_PER_JOB",
    "DEFAULT_SUFFIXES",
    "ScalingSettings",
    "Settings",
    "SettingsError",
    "bottleneck_environ",
    "parse_count",
    "parse_job_name_prefix",
    "parse_location",
    "parse_output",
    "parse_suffixes",
]

DEFAULT_SUFFIXES = IMAGE_SUFFIXES
DEFAULT_MAX_JOBS = 4
DEFAULT_MESSAGES_PER_JOB = 5000
DEFAULT_JOB_NAME_PREFIX = "bottleneck"

# A Batch job name is at most 128 letters, digits, '-' and '_', starting with a letter or digit;
# the scaler appends "-YYYYmmddTHHMMSSZ-xxxxxxxx" (26 characters), so the prefix gets the rest.
_JOB_NAME_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message is one line naming the variable or flag."""


def parse_location(uri: str, option: str) -> S3Location:
    """Parse an ``s3://bucket/prefix/`` setting by the contract's one rule (a prefix without its
    trailing ``/`` means the folder); an invalid one is a :class:`SettingsError` naming ``option``.
    """
    try:
        return S3Location.parse(uri, option)
    except InvalidS3Uri as exc:
        raise SettingsError(str(exc)) from None


def parse_output(uri: str, option: str) -> OutputTemplate:
    """Parse an output that may end in ``{model}/{fingerprint}/`` placeholders (see
    :class:`~bottleneck_contract.locations.OutputTemplate`); errors name ``option``."""
    try:
        return OutputTemplate.parse(uri, option)
    except InvalidS3Uri as exc:
        raise SettingsError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class ScalingSettings:
    """What the scaler needs: where to submit, and the two numbers of its rule."""

    job_queue: str
    job_definition: str
    max_jobs: int = DEFAULT_MAX_JOBS
    messages_per_job: int = DEFAULT_MESSAGES_PER_JOB
    job_name_prefix: str = DEFAULT_JOB_NAME_PREFIX

    def __post_init__(self) -> None:
        if not self.job_queue:
            raise SettingsError("job queue must not be empty")
        if not self.job_definition:
            raise SettingsError("job definition must not be empty")
        if self.max_jobs < 0:
            raise SettingsError(f"max jobs must be >= 0, got {self.max_jobs}")
        if self.messages_per_job < 1:
            raise SettingsError(f"messages per job must be >= 1, got {self.messages_per_job}")
        parse_job_name_prefix(self.job_name_prefix, "job name prefix")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the Lambda handler reads from its environment.

    ``scaling`` is ``None`` when neither ``BOTTLENECK_JOB_QUEUE`` nor
    ``BOTTLENECK_JOB_DEFINITION`` is set: the function then only enqueues. ``output`` is where
    feature files lie under, the location whose events are ignored: for a templated
    ``BOTTLENECK_OUTPUT`` its root, every version of it included, with the template in
    ``output_template``.
    """

    queue_url: str
    output: S3Location
    input_prefix: str = ""
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
    scaling: ScalingSettings | None = None
    output_template: OutputTemplate | None = None

    def __post_init__(self) -> None:
        template = self.output_template
        if template is not None and (template.root != self.output or not template.templated):
            raise SettingsError(f"output template {template} is not a template of {self.output}")

    @property
    def feature_output(self) -> OutputTemplate:
        """Where deleted images' feature files are looked for: one prefix, or every version."""
        return self.output_template or OutputTemplate(self.output)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from ``environ`` (default: ``os.environ``).

        Required: ``BOTTLENECK_QUEUE_URL`` and ``BOTTLENECK_OUTPUT`` (without it the function could
        not tell its own output from new uploads). ``BOTTLENECK_JOB_QUEUE`` and
        ``BOTTLENECK_JOB_DEFINITION`` go together. Raises :class:`SettingsError`.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "").strip()

        queue_url = get("BOTTLENECK_QUEUE_URL")
        if not queue_url:
            raise SettingsError("BOTTLENECK_QUEUE_URL is required (the SQS work queue URL)")
        output_uri = get("BOTTLENECK_OUTPUT")
        if not output_uri:
            raise SettingsError(
                "BOTTLENECK_OUTPUT is required (s3://bucket/prefix/ of the feature files, "
                "optionally ending in {model}/{fingerprint}/; events under it are ignored)"
            )
        template = parse_output(output_uri, "BOTTLENECK_OUTPUT")
        input_prefix = get("BOTTLENECK_INPUT_PREFIX")
        if input_prefix.startswith("s3://"):
            raise SettingsError(
                f"BOTTLENECK_INPUT_PREFIX is a key prefix such as 'images/', not a URI: "
                f"{input_prefix!r}"
            )
        suffixes = parse_suffixes(env.get("BOTTLENECK_SUFFIXES"), "BOTTLENECK_SUFFIXES")

        job_queue = get("BOTTLENECK_JOB_QUEUE")
        job_definition = get("BOTTLENECK_JOB_DEFINITION")
        scaling = None
        if job_queue or job_definition:
            if not (job_queue and job_definition):
                missing = "BOTTLENECK_JOB_DEFINITION" if job_queue else "BOTTLENECK_JOB_QUEUE"
                raise SettingsError(
                    f"{missing} is required when the other of BOTTLENECK_JOB_QUEUE/"
                    "BOTTLENECK_JOB_DEFINITION is set"
                )
            scaling = ScalingSettings(
                job_queue=job_queue,
                job_definition=job_definition,
                max_jobs=parse_count(
                    env.get("BOTTLENECK_MAX_JOBS"), "BOTTLENECK_MAX_JOBS", DEFAULT_MAX_JOBS, 0
                ),
                messages_per_job=parse_count(
                    env.get("BOTTLENECK_MESSAGES_PER_JOB"),
                    "BOTTLENECK_MESSAGES_PER_JOB",
                    DEFAULT_MESSAGES_PER_JOB,
                    1,
                ),
                job_name_prefix=parse_job_name_prefix(
                    get("BOTTLENECK_JOB_NAME_PREFIX") or DEFAULT_JOB_NAME_PREFIX,
                    "BOTTLENECK_JOB_NAME_PREFIX",
                ),
            )
        return cls(
            queue_url=queue_url,
            output=template.root,
            input_prefix=input_prefix,
            suffixes=suffixes,
            scaling=scaling,
            output_template=template if template.templated else None,
        )


def parse_suffixes(value: str | None, option: str) -> tuple[str, ...]:
    """Parse a comma-separated suffix list into lower-case suffixes that start with a dot.

    ``None`` or blank gives :data:`DEFAULT_SUFFIXES`; ``jpg`` is read as ``.jpg``.
    """
    if value is None or not value.strip():
        return DEFAULT_SUFFIXES
    suffixes: list[str] = []
    for part in value.split(","):
        item = part.strip().lower()
        if not item:
            continue
        if not item.startswith("."):
            item = "." + item
        if len(item) < 2 or any(c.isspace() or c == "/" for c in item):
            raise SettingsError(f"{option} has an invalid suffix {part.strip()!r}")
        if item not in suffixes:
            suffixes.append(item)
    if not suffixes:
        raise SettingsError(f"{option} lists no suffix: {value!r}")
    return tuple(suffixes)


def parse_count(value: str | None, option: str, default: int, minimum: int) -> int:
    """Parse a whole number of at least ``minimum``; ``None`` or blank gives ``default``."""
    if value is None or not value.strip():
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise SettingsError(f"{option} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise SettingsError(f"{option} must be >= {minimum}, got {number}")
    return number


def parse_job_name_prefix(value: str, option: str) -> str:
    """Check that ``value`` can start a Batch job name (letters, digits, '-', '_'; <= 100)."""
    if not _JOB_NAME_PREFIX.fullmatch(value):
        raise SettingsError(
            f"{option} must be 1-100 letters, digits, '-' or '_' starting with a letter or digit, "
            f"got {value!r}"
        )
    return value


def bottleneck_environ() -> dict[str, str]:
    """The ``BOTTLENECK_*`` variables of this process, for the CLI's flag defaults."""
    return {name: value for name, value in os.environ.items() if name.startswith("BOTTLENECK_")}

"""What a million images cost: the requests counted end to end, times list prices, for both layouts.

Pure arithmetic over figures the benchmark measures: the consumer's requests per image (the
feed row counts every S3 and SQS call it makes), the upload path's use per upload (measured
against moto in ``tests/functional/test_upload_path.py``: 1.3 SQS requests, 0.01 invocations of
about 0.32 s, see :mod:`producer_lambda.costs`), and the instance time per image at the rate
the instance is bound to (its GPU once fed, or what this machine's CPU and GIL figures allow).

``--layout shards`` changes only the feature files' PUTs: a shard of ``shard_rows`` rows is two
create-only PUTs (the array and its index), so a PUT per image becomes ``2 / shard_rows``; every
other request stays. Prices are us-east-1 list prices (S3 Standard: PUT, COPY, POST and LIST
$0.005 per 1,000, GET and HEAD $0.0004 per 1,000, DELETE free; SQS $0.40 per million).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from producer_lambda.costs import SQS_REQUESTS, UploadPathUse, cost_per_million

__all__ = [
    "S3_USD_PER_MILLION",
    "UPLOAD_PATH_USE",
    "ImageCost",
    "cost_table",
    "format_costs",
    "image_cost",
    "layout_requests",
    "unpriced",
]

S3_USD_PER_MILLION: Mapping[str, float] = {
    "PutObject": 5.00,
    "CopyObject": 5.00,
    "ListObjectsV2": 5.00,
    "GetObject": 0.40,
    "HeadObject": 0.40,
    "DeleteObject": 0.0,
}
SQS_USD_PER_MILLION = 0.40
# The upload path's use per upload, measured against moto (README, "The upload path").
UPLOAD_PATH_USE = UploadPathUse(sqs_requests=1.3, invocations=0.01, seconds_per_invocation=0.317)


def layout_requests(
    per_image: Mapping[str, float], layout: str, shard_rows: int = 10_000
) -> dict[str, float]:
    """The consumer's requests per image under ``layout``, from those counted for files."""
    if layout == "files":
        return dict(per_image)
    if layout != "shards":
        raise ValueError(f"layout must be files or shards, got {layout!r}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    requests = {k: v for k, v in per_image.items() if k not in ("PutObject", "HeadObject")}
    # A HEAD per image comes only from a per-file conflict or --existing-check head: neither
    # exists for shards. Two create-only PUTs per shard.
    requests["PutObject"] = 2 / shard_rows
    return requests


@dataclass(frozen=True, slots=True)
class ImageCost:
    """Dollars per million images, by what is billed."""

    s3: float
    sqs: float
    upload_path: float
    instance: float

    @property
    def total(self) -> float:
        return self.s3 + self.sqs + self.upload_path + self.instance

    def as_dict(self) -> dict[str, float]:
        return {
            "s3": round(self.s3, 3),
            "sqs": round(self.sqs, 3),
            "upload_path": round(self.upload_path, 3),
            "instance": round(self.instance, 3),
            "total": round(self.total, 3),
        }


def image_cost(
    requests_per_image: Mapping[str, float], *, usd_per_hour: float, images_per_s: float
) -> ImageCost:
    """Dollars per million images: the consumer's requests, the upload path, the instance.

    Requests without a price here (see :func:`unpriced`) count for nothing."""
    if images_per_s <= 0:
        raise ValueError(f"images_per_s must be > 0, got {images_per_s}")
    s3 = sum(
        n * S3_USD_PER_MILLION[op]
        for op, n in requests_per_image.items()
        if op in S3_USD_PER_MILLION
    )
    sqs = sum(n for op, n in requests_per_image.items() if op in SQS_REQUESTS)
    return ImageCost(
        s3=s3,
        sqs=sqs * SQS_USD_PER_MILLION,
        upload_path=cost_per_million(UPLOAD_PATH_USE).total,
        instance=usd_per_hour / (images_per_s * 3600) * 1_000_000,
    )


def unpriced(requests_per_image: Mapping[str, float]) -> list[str]:
    """Operations counted that :func:`image_cost` has no price for."""
    return sorted(set(requests_per_image) - set(S3_USD_PER_MILLION) - SQS_REQUESTS)


def cost_table(
    per_image: Mapping[str, float], ceiling_rows: list[dict[str, Any]], shard_rows: int = 10_000
) -> list[dict[str, Any]]:
    """One row per layout and instance, at the instance's GPU rate (fed) and at the rate this
    machine's measured CPU and GIL costs would allow it (``bound``)."""
    rows = []
    for layout in ("files", "shards"):
        requests = layout_requests(per_image, layout, shard_rows)
        for inst in ceiling_rows:
            fed = image_cost(
                requests, usd_per_hour=inst["usd_per_hour"], images_per_s=inst["gpu_images_per_s"]
            )
            bound = image_cost(
                requests,
                usd_per_hour=inst["usd_per_hour"],
                images_per_s=inst["bound_images_per_s"],
            )
            rows.append(
                {
                    "layout": layout,
                    "instance": inst["instance"],
                    "fed": fed.as_dict(),
                    "bound": bound.as_dict(),
                    "bound_images_per_s": inst["bound_images_per_s"],
                }
            )
    return rows


def format_costs(rows: list[dict[str, Any]], shard_rows: int = 10_000) -> str:
    """The cost table as ``make bench`` prints it."""
    header = (
        f"{'layout':<7} {'instance':<11} {'S3':>6} {'SQS':>6} {'upload':>7} "
        f"{'GPU fed':>8} {'total fed':>10} {'GPU here':>9} {'total here':>11} {'$/billion fed':>14}"
    )
    lines = [
        f"cost per million images, US$ (us-east-1 list prices; shards of {shard_rows} rows; "
        "'fed' = the GPU's own rate, 'here' = the rate this machine's CPU and GIL figures allow)",
        header,
        "-" * len(header),
    ]
    for r in rows:
        fed, here = r["fed"], r["bound"]
        lines.append(
            f"{r['layout']:<7} {r['instance']:<11} {fed['s3']:>6.2f} {fed['sqs']:>6.2f} "
            f"{fed['upload_path']:>7.2f} {fed['instance']:>8.2f} {fed['total']:>10.2f} "
            f"{here['instance']:>9.2f} {here['total']:>11.2f} {fed['total'] * 1000:>14,.0f}"
        )
    return "\n".join(lines)

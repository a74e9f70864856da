"""What ``--decode cuda`` leaves on the host, and how the JPEG backends compare on a GPU.

``python -m benchmarks.gpu_decode`` measures, on the demo's generated JPEGs (500x375 and
2000x1500), the CPU milliseconds per image of:

``route``
    the header check each JPEG gets on the host before the device decodes it
    (:func:`consumer.gpu_decode.route`: limits, format, mode, EOI, EXIF orientation);
``pillow``
    the exact path it replaces (:class:`consumer.preprocess.ImagePreparer`: decode, resize, crop);
``cpu tensors``
    :class:`consumer.gpu_decode.GpuBatchDecoder` on the CPU (libjpeg-turbo, tensor resize): the
    device path's arithmetic where there is no device, for reference.

With CUDA it adds, per backend (nvimgcodec where installed, torchvision), one micro-batch decode
of ``--batch-size`` images: wall milliseconds and process CPU milliseconds per image (CPU covers
the decoder's own host threads). That is the measurement ``--decode cuda``'s ``auto`` backend
choice should be checked against. One thread for torch on the CPU, so the numbers are per core.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from consumer.decode import DecodeLimits
from consumer.demo import CLASSES, synthetic_image
from consumer.gpu_decode import BackendName, GpuBatchDecoder, route
from consumer.preprocess import ImagePreparer, InputSpec

SPEC = InputSpec(
    (3, 224, 224), "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.95, "center"
)


def cpu_ms(work: Callable[[], object], images: int, repeat: int) -> tuple[float, float]:
    """(wall, process CPU) ms per image of ``work``: the best of ``repeat``, after a warm-up."""
    work()
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = (
            (time.perf_counter() - wall) * 1e3 / images,
            (time.process_time() - cpu) * 1e3 / images,
        )
        best = min(best, elapsed)
    return best


def rows_for(
    label: str, items: Sequence[bytes], batch_size: int, repeat: int
) -> list[tuple[str, float, float]]:
    limits = DecodeLimits()
    exact = ImagePreparer(SPEC, limits)
    on_cpu = GpuBatchDecoder(SPEC, limits, torch.device("cpu"), "torchvision")
    rows = [
        (
            f"{label} route (host, per JPEG)",
            *cpu_ms(lambda: [route(d, limits) for d in items], len(items), repeat),
        ),
        (
            f"{label} pillow exact path",
            *cpu_ms(lambda: [exact(d) for d in items], len(items), repeat),
        ),
        (
            f"{label} cpu tensors (1 thread)",
            *cpu_ms(lambda: on_cpu.decode(items), len(items), repeat),
        ),
    ]
    if torch.cuda.is_available():
        batch = [items[i % len(items)] for i in range(batch_size)]
        backends: tuple[BackendName, ...] = ("nvimgcodec", "torchvision")
        for backend in backends:
            try:
                decoder = GpuBatchDecoder(SPEC, limits, torch.device("cuda"), backend)
            except Exception as exc:
                print(f"{backend}: unavailable ({exc})")
                continue
            routes = decoder.decode(batch).routes
            assert routes.count("device") == len(batch), routes
            rows.append(
                (
                    f"{label} cuda {backend}, batch {batch_size}",
                    *cpu_ms(partial(decoder.decode, batch), len(batch), repeat),
                )
            )
    return rows


def _jpegs(size: tuple[int, int], count: int) -> list[bytes]:
    return [synthetic_image(CLASSES[i % len(CLASSES)], seed=i, size=size) for i in range(count)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = rows_for("500x375", _jpegs((500, 375), 16), args.batch_size, args.repeat)
    rows += rows_for(
        "2000x1500",
        _jpegs((2000, 1500), 4),
        args.batch_size,
        args.repeat,
    )
    print(f"{'':48s} {'wall ms/img':>12s} {'CPU ms/img':>11s}")
    for name, wall, cpu in rows:
        print(f"{name:48s} {wall:12.3f} {cpu:11.3f}")


if __name__ == "__main__":
    main()

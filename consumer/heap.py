"""A decoding process's heap: keep what one image frees for the next instead of handing it back.

A process that decodes does the same allocations image after image. glibc's malloc, left to its
defaults, kept giving an image's buffers back to the kernel as they were freed (its moving trim
threshold follows the largest buffer freed, and an image's buffers together pass it) and took
them back as fresh pages, each faulted in and zeroed. Measured here:

- one decode process, 2000x1500 photos to 224 px: 3,000 page faults and 5.3 ms of system time
  per image in 16.4 ms of CPU; 500x375 JPEGs, 130 to 240 faults and 0.2 to 0.55 ms in most
  processes;
- two decode threads in a process with torch loaded (``--decode-isolation threads``), a mixed
  set with one photo in ten 2000x1500: 595 faults and 4.5 to 4.7 ms of CPU per image.

With :func:`keep_freed_memory`: no faults to speak of, 28 % less CPU per large photo in a decode
process, 3.5 to 3.7 ms per image in the threads. The cost is memory the process keeps: what it
has used, less what passes 64 MiB free at the top of a heap. A decode process has one heap
(about 22 MB more after that mixed set). The consumer's own process has one per thread that
allocates, up to 8 per core, each keeping up to 64 MiB, and the setting covers everything it
allocates (torch's and obstore's buffers too): 45 MB more for the two threads above, a review's
six threads allocating and freeing kept 210 MiB against 7; with a decode thread per core on an
8-vCPU instance count on some hundreds of MB, a few GB at the very most.
"""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h) and the values set: every allocation under 32 MiB
# (glibc's largest mmap threshold on 64-bit; Pillow allocates an image in blocks of at most
# 16 MiB) comes from a heap, and a heap is given back only past 64 MiB free at its top.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_BELOW = 32 << 20
_TRIM_ABOVE = 64 << 20


def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed memory for reuse (see the module); True if set.

    Process-wide: call it once, early, in a process whose work is decoding (each decode
    process; the consumer itself only when it decodes in its own threads). False where the C
    library's ``mallopt`` refuses these (musl's does nothing) or there is none (macOS):
    decoding works the same there, only slower.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Setting either turns off glibc's own moving thresholds: both are set, the mmap one first.
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_BELOW)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
    )

"""Find the images most like one image: nearest neighbours by cosine similarity of features.

    python examples/search.py DIR QUERY [--k 10] [--backend auto|numpy|faiss] [--json]

``DIR`` is what ``bottleneck-collect`` wrote. ``QUERY`` is an image's source key as in
``index.csv`` (``cats/1.jpg``), or ``s3://bucket/cats/1.jpg`` when the dataset holds that key
from several buckets. It prints one line per image: rank, similarity (cosine, 4 decimals) and
key. The query itself is always rank 1 (similarity 1.0000, or 0.0000 for an all-zero feature
vector), so ``--k 10`` shows it and its 9 nearest other images; an identical copy under
another key comes next at 1.0000. ``--json`` prints the same as one JSON object.

The search is a NumPy scan of the memory-mapped ``features.npy`` in row blocks (see
:mod:`bottleneck_tools.similar`); ``--backend faiss`` uses a faiss ``IndexFlatIP`` instead,
when ``faiss-cpu`` is installed, and ``auto`` (the default) does so only for large datasets.
Unpooled features (``--pool none``) are flattened, with a note on stderr.

Exit status: 0 found, 1 the dataset cannot be searched, 2 bad arguments, an unknown or
ambiguous query, or ``--backend faiss`` without faiss (one line on stderr in every case).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bottleneck_tools import similar
from bottleneck_tools.cmdline import EXIT_USAGE, OneLineParser

PROG = "search.py"


def main(argv: Sequence[str] | None = None) -> int:
    """Search and print; returns the exit status."""
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("directory", type=Path, help="a bottleneck-collect output directory")
    parser.add_argument("query", help="source key of the image (or s3://bucket/key)")
    parser.add_argument("--k", type=int, default=10, help="images to list, the query included")
    parser.add_argument(
        "--backend",
        choices=similar.BACKENDS,
        default="auto",
        help=f"auto: faiss if installed and at least {similar.FAISS_MIN_ROWS:,} rows, else numpy",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    try:
        dataset = similar.load(args.directory)
        backend = similar.choose_backend(
            args.backend, len(dataset.features), similar.faiss_available()
        )
        if len(dataset.row_shape) > 1:
            sys.stderr.write(
                f"{PROG}: note: unpooled features {dataset.row_shape} are flattened to "
                f"{dataset.features.shape[1]:,} values, so similar means the same things in the "
                "same places; pooled features (--pool avg) compare content alone\n"
            )
        found = similar.search(dataset, args.query, args.k, backend=backend)
    except similar.RequestError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except similar.SearchError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    if args.json:
        print(json.dumps(similar.to_json(found, backend=backend)))
    else:
        buckets = {row.source_bucket for row in dataset.index}
        sys.stdout.write(similar.format_text(found, with_bucket=len(buckets) > 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

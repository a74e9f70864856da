"""``python -m producer_lambda``: the same as ``bottleneck-enqueue``."""

from producer_lambda.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m producer_lambda``: the same as ``bottleneck-enqueue`` (the contract says so), which
lives in :mod:`bottleneck_tools.enqueue`; this module only hands over, and stays out of the zip."""

from bottleneck_tools.enqueue import main

if __name__ == "__main__":
    raise SystemExit(main())

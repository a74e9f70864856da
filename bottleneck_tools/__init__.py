"""The operator's tools: ``bottleneck-enqueue`` (backfills and dead-letter redrive),
``bottleneck-status``, ``bottleneck-reconcile`` and ``bottleneck-collect``.

They run on an operator's machine, never in the Lambda: they may import ``tqdm`` (the progress
bars) and ``numpy`` (``bottleneck-collect``), and they reuse the producer's scaler and settings and
the shared contract (:mod:`bottleneck_contract`).
"""

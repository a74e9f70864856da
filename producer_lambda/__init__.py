"""The producer: the S3-triggered Lambda, the Batch scaler and the ``bottleneck-enqueue`` tool.

Standard library and boto3 only (its Lambda package is this folder and ``bottleneck_contract``):
never torch, timm, numpy or Pillow. ``tqdm`` is imported by :mod:`producer_lambda.cli` only.
"""

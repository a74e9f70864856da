"""The producer: the S3-triggered Lambda and the Batch scaler, and what they run on.

Standard library and boto3 only (its Lambda package is this folder and ``bottleneck_contract``):
never torch, timm, numpy or Pillow. The operator's tools, ``bottleneck-enqueue`` among them, live
in :mod:`bottleneck_tools`, outside the zip.
"""

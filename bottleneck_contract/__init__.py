"""What every side of the project agrees on: the queue's messages, feature-file keys and metadata,
S3 locations, the dead-letter lookup and the log format.

Imported by the GPU consumer, the producer Lambda and the operator tools alike, so it stays small
and light: the standard library, and boto3 clients passed in, never imported here. It ships in
the Lambda zip next to ``producer_lambda``.
"""

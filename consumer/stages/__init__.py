"""The pipeline's stages, one module each: receive, load (fetch + decode), infer, write, ack,
plus the visibility heartbeat. :mod:`consumer.worker` joins them with bounded queues."""

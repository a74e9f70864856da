# syntax=docker/dockerfile:1
# The consumer image: bottleneck-consumer on CUDA PyTorch, with the MODEL's weights baked in so
# that a job needs no network beyond S3 and SQS (HF_HUB_OFFLINE=1 at run time).
#
#   docker build --build-arg MODEL=resnet50 -t bottleneck-consumer .
#
# The base is pinned by tag. To pin by digest as well (recommended for releases), resolve it once
# and write it after the tag:
#   docker buildx imagetools inspect pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
#   FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime@sha256:<digest>
# Both stages use the same base so the wheel is built by the same Python that runs it.

# ---------------------------------------------------------------- build: the project's wheel
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bottleneck_contract ./bottleneck_contract
COPY bottleneck_tools ./bottleneck_tools
COPY consumer ./consumer
COPY producer_lambda ./producer_lambda
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS runtime

ARG MODEL=resnet50
ENV HF_HOME=/opt/hf-cache \
    TORCH_HOME=/opt/torch-cache \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The base's torch (and torchvision, where present) are constraints, so that installing the
# project never swaps in different multi-gigabyte CUDA wheels.
COPY --from=build /wheels /wheels
RUN python -m pip list --format=freeze | grep -iE '^(torch|torchvision)==' > /tmp/constraints.txt \
    && python -m pip install --no-cache-dir --constraint /tmp/constraints.txt /wheels/*.whl \
    && rm -rf /wheels /tmp/constraints.txt

# Weights at build time, into a cache the runtime user can read but not change. The build has
# network access; the running container is told never to use it for the hub.
RUN python -c "import sys, timm; timm.create_model(sys.argv[1], pretrained=True, num_classes=0)" "$MODEL" \
    && mkdir -p "$HF_HOME" "$TORCH_HOME" \
    && chmod -R a+rX "$HF_HOME" "$TORCH_HOME"

RUN groupadd --system --gid 10001 bottleneck \
    && useradd --system --uid 10001 --gid bottleneck --create-home --home-dir /home/bottleneck bottleneck

ENV HF_HUB_OFFLINE=1 \
    BOTTLENECK_MODEL=${MODEL} \
    BOTTLENECK_WEIGHTS=pretrained

USER 10001:10001
WORKDIR /home/bottleneck

# A long-lived worker with no port: the queue, not a socket, says whether it is alive.
HEALTHCHECK NONE

ENTRYPOINT ["bottleneck-consumer"]

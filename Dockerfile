# syntax=docker/dockerfile:1
# The consumer image: bottleneck-consumer on CUDA PyTorch, with the MODEL's weights baked in so
# that a job needs no network beyond S3 and SQS (HF_HUB_OFFLINE=1 at run time).
#
#   docker build --build-arg MODEL=resnet50 -t bottleneck-consumer .
#
# The image runs what the tests run. Its base is the official PyTorch image of the torch and
# torchvision that `make test` installs from pyproject.toml (torch 2.14.1, torchvision 0.29.1,
# built for CUDA 13.0), TORCH_VERSION and TORCHVISION_VERSION below say the same, and the build
# stops if the base holds anything else; tests/infra/test_dockerfile.py fails when the tests'
# torch moves on and this file has not followed. CUDA 13.0 also picks nvImageCodec's wheel
# (-cu13) for --decode cuda's batched, hardware-engine JPEG decode.
#
# The base is pinned by tag. To pin by digest as well (recommended for releases), resolve it once
# and write it after the tag:
#   docker buildx imagetools inspect pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
#   FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime@sha256:<digest>
# Both stages use the same base so the wheel is built by the same Python that runs it.

# ---------------------------------------------------------------- build: the project's wheel
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bottleneck_contract ./bottleneck_contract
COPY bottleneck_tools ./bottleneck_tools
COPY consumer ./consumer
COPY producer_lambda ./producer_lambda
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime AS runtime

ARG MODEL=resnet50
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG NVIMGCODEC=nvidia-nvimgcodec-cu13[nvjpeg]>=0.9,<0.10
ENV HF_HOME=/opt/hf-cache \
    TORCH_HOME=/opt/torch-cache \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The tested versions, or no image: a base re-tagged or a mistyped tag fails here, not in a job.
RUN python -c "import sys, torch, torchvision; \
have = (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]); \
sys.exit(0 if list(have) == sys.argv[1:] else f'base has torch, torchvision {have}; tested: {sys.argv[1:]}')" \
    "$TORCH_VERSION" "$TORCHVISION_VERSION"

# torch and torchvision are constraints, so that installing the project never swaps in different
# multi-gigabyte CUDA wheels.
COPY --from=build /wheels /wheels
RUN printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > /tmp/constraints.txt \
    && python -m pip install --no-cache-dir --constraint /tmp/constraints.txt /wheels/*.whl "$NVIMGCODEC" \
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

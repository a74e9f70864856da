#!/usr/bin/env bash
# Deploy (or remove) the whole pipeline with the AWS CLI and Docker.
#
#   SUBNETS=subnet-a,subnet-b SECURITY_GROUPS=sg-1 infra/deploy.sh            # build + deploy
#   infra/deploy.sh outputs                                                   # show the outputs
#   infra/deploy.sh teardown                                                  # delete the stack
#
# Subcommands: deploy (default) | lambda | image | stack | outputs | teardown
#
# Settings (environment variables; defaults in brackets):
#   STACK [bottleneck]            stack name, also the prefix of every resource name
#   AWS_REGION [from the CLI]     region
#   MODEL [resnet50]              timm model: baked into the image and set in the job definition
#   SUBNETS, SECURITY_GROUPS      comma-separated ids for the GPU instances (required for deploy)
#   EXISTING_BUCKET [""]          watch this bucket instead of creating one
#   INPUT_PREFIX [images/]  OUTPUT_PREFIX [features/]  OUTPUT_BUCKET [""]
#   OUTPUT_LAYOUT [versioned]     versioned: features under <OUTPUT_PREFIX><model>/<fingerprint>/,
#                                 a model change writes beside the old ones; flat: directly under it
#   CAPACITY_TYPE [SPOT]  INSTANCE_TYPES [g6,g5]  MAX_VCPUS [32]  MAX_JOBS [4]
#   ARTIFACT_BUCKET [<stack>-artifacts-<account>-<region>]   holds the Lambda zip
#   ECR_REPOSITORY [<stack>-consumer]   IMAGE_TAG [<model>-<git sha>]
#   EXTRA_PARAMETERS [""]         more Key=Value overrides for the stack, space-separated
#   PYTHON [.venv/bin/python or python3]
#   DELETE_ARTIFACTS [0]          teardown: also delete the artifact bucket and ECR repository
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STACK="${STACK:-bottleneck}"
MODEL="${MODEL:-resnet50}"
TEMPLATE="infra/cloudformation.yaml"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'deploy.sh: error: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required (not found on PATH)"; }

context() {
  need aws
  REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region || true)}}"
  [[ -n "$REGION" ]] || die "no region: set AWS_REGION"
  export AWS_REGION="$REGION"
  ACCOUNT="$(aws sts get-caller-identity --query Account --output text)"
  ARTIFACT_BUCKET="${ARTIFACT_BUCKET:-${STACK}-artifacts-${ACCOUNT}-${REGION}}"
  ECR_REPOSITORY="${ECR_REPOSITORY:-${STACK}-consumer}"
  REGISTRY="${ACCOUNT}.dkr.ecr.${REGION}.amazonaws.com"
}

ensure_artifact_bucket() {
  if aws s3api head-bucket --bucket "$ARTIFACT_BUCKET" >/dev/null 2>&1; then
    return
  fi
  log "creating artifact bucket s3://$ARTIFACT_BUCKET"
  if [[ "$REGION" == "us-east-1" ]]; then
    aws s3api create-bucket --bucket "$ARTIFACT_BUCKET" >/dev/null
  else
    aws s3api create-bucket --bucket "$ARTIFACT_BUCKET" \
      --create-bucket-configuration "LocationConstraint=$REGION" >/dev/null
  fi
  aws s3api put-public-access-block --bucket "$ARTIFACT_BUCKET" --public-access-block-configuration \
    BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true
}

# Build the Lambda zip (reproducible bytes) and upload it under a content-addressed key, so that
# CloudFormation updates the function exactly when the code changed.
build_lambda() {
  log "building the producer Lambda package"
  "$PYTHON" -m producer_lambda.package build/producer_lambda.zip >/dev/null
  local digest
  digest="$("$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:16])' build/producer_lambda.zip)"
  LAMBDA_KEY="lambda/producer_lambda-${digest}.zip"
  ensure_artifact_bucket
  log "uploading s3://$ARTIFACT_BUCKET/$LAMBDA_KEY"
  aws s3 cp --only-show-errors build/producer_lambda.zip "s3://$ARTIFACT_BUCKET/$LAMBDA_KEY"
}

image_tag() {
  local sha safe_model
  safe_model="$(printf '%s' "$MODEL" | tr -c 'A-Za-z0-9_.-' '-')"
  sha="$(git rev-parse --short=12 HEAD 2>/dev/null || echo nogit)"
  if [[ -n "$(git status --porcelain 2>/dev/null || true)" ]]; then
    sha="${sha}-dirty-$(date -u +%Y%m%dT%H%M%SZ)"
  fi
  printf '%s-%s' "$safe_model" "$sha"
}

# Build the consumer image with the model's weights inside, push it, and pin it by digest.
build_image() {
  need docker
  local tag="${IMAGE_TAG:-$(image_tag)}"
  if ! aws ecr describe-repositories --repository-names "$ECR_REPOSITORY" >/dev/null 2>&1; then
    log "creating ECR repository $ECR_REPOSITORY"
    aws ecr create-repository --repository-name "$ECR_REPOSITORY" \
      --image-scanning-configuration scanOnPush=true \
      --encryption-configuration encryptionType=AES256 >/dev/null
  fi
  aws ecr get-login-password | docker login --username AWS --password-stdin "$REGISTRY" >/dev/null
  log "building $REGISTRY/$ECR_REPOSITORY:$tag (MODEL=$MODEL)"
  docker build --platform linux/amd64 --build-arg "MODEL=$MODEL" \
    -t "$REGISTRY/$ECR_REPOSITORY:$tag" .
  docker push "$REGISTRY/$ECR_REPOSITORY:$tag"
  local digest
  digest="$(aws ecr describe-images --repository-name "$ECR_REPOSITORY" --image-ids "imageTag=$tag" \
    --query 'imageDetails[0].imageDigest' --output text)"
  IMAGE_URI="$REGISTRY/$ECR_REPOSITORY@$digest"
  log "image $IMAGE_URI"
}

# An existing bucket must send its events to EventBridge. Its other notification settings are
# kept: the configuration is read, the EventBridge switch added, and written back.
enable_eventbridge() {
  local bucket="$1" current merged
  current="$(aws s3api get-bucket-notification-configuration --bucket "$bucket" --output json)"
  merged="$(printf '%s' "$current" | "$PYTHON" -c '
import json, sys
text = sys.stdin.read().strip()
config = json.loads(text) if text else {}
config.pop("ResponseMetadata", None)
config["EventBridgeConfiguration"] = {}
print(json.dumps(config))')"
  log "enabling EventBridge notifications on s3://$bucket (other notifications kept)"
  aws s3api put-bucket-notification-configuration --bucket "$bucket" \
    --notification-configuration "$merged"
}

deploy_stack() {
  [[ -n "${SUBNETS:-}" ]] || die "SUBNETS is required (comma-separated subnet ids)"
  [[ -n "${SECURITY_GROUPS:-}" ]] || die "SECURITY_GROUPS is required (comma-separated ids)"
  [[ -n "${LAMBDA_KEY:-}" ]] || die "internal: the Lambda package was not uploaded"
  [[ -n "${IMAGE_URI:-}" ]] || die "internal: the image was not pushed"
  if [[ -n "${EXISTING_BUCKET:-}" ]]; then
    enable_eventbridge "$EXISTING_BUCKET"
  fi
  local -a params=(
    "LambdaCodeBucket=$ARTIFACT_BUCKET"
    "LambdaCodeKey=$LAMBDA_KEY"
    "ContainerImage=$IMAGE_URI"
    "Model=$MODEL"
    "SubnetIds=$SUBNETS"
    "SecurityGroupIds=$SECURITY_GROUPS"
    "ExistingInputBucket=${EXISTING_BUCKET:-}"
    "InputPrefix=${INPUT_PREFIX:-images/}"
    "OutputBucket=${OUTPUT_BUCKET:-}"
    "OutputPrefix=${OUTPUT_PREFIX:-features/}"
    "OutputLayout=${OUTPUT_LAYOUT:-versioned}"
    "CapacityType=${CAPACITY_TYPE:-SPOT}"
    "InstanceTypes=${INSTANCE_TYPES:-g6,g5}"
    "MaxvCpus=${MAX_VCPUS:-32}"
    "MaxJobs=${MAX_JOBS:-4}"
  )
  if [[ -n "${EXTRA_PARAMETERS:-}" ]]; then
    local -a extra
    read -r -a extra <<<"$EXTRA_PARAMETERS"
    params+=("${extra[@]}")
  fi
  log "deploying stack $STACK in $REGION"
  aws cloudformation deploy \
    --stack-name "$STACK" \
    --template-file "$TEMPLATE" \
    --capabilities CAPABILITY_IAM \
    --no-fail-on-empty-changeset \
    --tags project=serverless-bottleneck \
    --parameter-overrides "${params[@]}"
  show_outputs
}

show_outputs() {
  aws cloudformation describe-stacks --stack-name "$STACK" \
    --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output table
}

teardown() {
  local bucket
  bucket="$(aws cloudformation describe-stacks --stack-name "$STACK" \
    --query "Stacks[0].Outputs[?OutputKey=='InputBucketName'].OutputValue" --output text 2>/dev/null || true)"
  log "deleting stack $STACK (running jobs are terminated with their job queue)"
  aws cloudformation delete-stack --stack-name "$STACK"
  aws cloudformation wait stack-delete-complete --stack-name "$STACK"
  if [[ -n "$bucket" && "$bucket" != "None" && -z "${EXISTING_BUCKET:-}" ]]; then
    log "kept bucket s3://$bucket (images and features are data: DeletionPolicy Retain)"
    log "  to delete it too: aws s3 rb s3://$bucket --force"
  fi
  if [[ "${DELETE_ARTIFACTS:-0}" == "1" ]]; then
    log "deleting s3://$ARTIFACT_BUCKET and ECR repository $ECR_REPOSITORY"
    aws s3 rb "s3://$ARTIFACT_BUCKET" --force || true
    aws ecr delete-repository --repository-name "$ECR_REPOSITORY" --force >/dev/null || true
  else
    log "kept s3://$ARTIFACT_BUCKET and ECR $ECR_REPOSITORY (DELETE_ARTIFACTS=1 removes them)"
  fi
}

main() {
  local command="${1:-deploy}"
  case "$command" in
    deploy)
      context
      build_lambda
      build_image
      deploy_stack
      ;;
    lambda) context; build_lambda; printf '%s\n' "s3://$ARTIFACT_BUCKET/$LAMBDA_KEY" ;;
    image) context; build_image; printf '%s\n' "$IMAGE_URI" ;;
    stack)
      context
      build_lambda
      [[ -n "${IMAGE_URI:-}" ]] || die "IMAGE_URI is required for 'stack' (use 'deploy' to build)"
      deploy_stack
      ;;
    outputs) context; show_outputs ;;
    teardown) context; teardown ;;
    -h | --help | help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$command' (deploy, lambda, image, stack, outputs, teardown)" ;;
  esac
}

main "$@"

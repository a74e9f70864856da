"""infra/deploy.sh against stand-ins for the AWS CLI and Docker that record their calls."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.conftest import ROOT

SCRIPT = ROOT / "infra" / "deploy.sh"
DIGEST = "sha256:" + "ab" * 32

AWS_STUB = f"""#!/usr/bin/env bash
printf 'aws %s\\n' "$*" >> "$CALLS"
case "$1 $2" in
  "configure get") echo us-east-1 ;;
  "sts get-caller-identity") echo 123456789012 ;;
  "ecr describe-images") echo {DIGEST} ;;
  "ecr get-login-password") echo secret ;;
  "s3api get-bucket-notification-configuration")
    echo '{{"QueueConfigurations": [{{"QueueArn": "arn:aws:sqs:us-east-1:1:q"}}]}}' ;;
esac
exit 0
"""

DOCKER_STUB = """#!/usr/bin/env bash
printf 'docker %s\\n' "$*" >> "$CALLS"
if [[ "$1" == login ]]; then cat >/dev/null; fi
exit 0
"""


def _run(
    tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("aws", AWS_STUB), ("docker", DOCKER_STUB)):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    completed = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "CALLS": str(calls),
            "PYTHON": sys.executable,
            **env,
        },
    )
    return completed, calls.read_text().splitlines()


def test_script_is_strict_bash() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_unknown_command_fails(tmp_path: Path) -> None:
    completed, calls = _run(tmp_path, "bogus")
    assert completed.returncode == 1
    assert "unknown command" in completed.stderr
    assert calls == []


def test_deploy_requires_the_network_settings(tmp_path: Path) -> None:
    completed, calls = _run(tmp_path, "deploy")
    assert completed.returncode == 1
    assert "SUBNETS is required" in completed.stderr
    assert not any("cloudformation deploy" in c for c in calls)


def test_deploy_builds_uploads_pushes_and_deploys_in_order(tmp_path: Path) -> None:
    completed, calls = _run(
        tmp_path,
        "deploy",
        STACK="bn",
        MODEL="convnext_tiny.fb_in1k",
        SUBNETS="subnet-1,subnet-2",
        SECURITY_GROUPS="sg-1",
        EXISTING_BUCKET="photos",
    )
    assert completed.returncode == 0, completed.stderr
    assert (ROOT / "build" / "producer_lambda.zip").is_file()
    index = {name: i for i, name in enumerate(calls)}
    upload = next(c for c in calls if c.startswith("aws s3 cp "))
    build = next(c for c in calls if c.startswith("docker build "))
    push = next(c for c in calls if c.startswith("docker push "))
    enable = next(c for c in calls if "put-bucket-notification-configuration" in c)
    deploy = next(c for c in calls if c.startswith("aws cloudformation deploy "))
    assert index[upload] < index[deploy] and index[push] < index[deploy]
    assert index[enable] < index[deploy]
    key = upload.split()[-1]
    assert key.startswith("s3://bn-artifacts-123456789012-us-east-1/lambda/producer_lambda-")
    assert "--build-arg MODEL=convnext_tiny.fb_in1k" in build
    # The existing bucket keeps its queue notification and gains EventBridge.
    assert '"QueueConfigurations"' in enable and '"EventBridgeConfiguration": {}' in enable
    args = shlex.split(deploy)
    overrides = args[args.index("--parameter-overrides") + 1 :]
    params = dict(o.split("=", 1) for o in overrides)
    registry = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    assert params["ContainerImage"] == f"{registry}/bn-consumer@{DIGEST}"
    assert params["LambdaCodeKey"] == key.removeprefix("s3://bn-artifacts-123456789012-us-east-1/")
    assert params["Model"] == "convnext_tiny.fb_in1k"
    assert params["SubnetIds"] == "subnet-1,subnet-2"
    assert params["ExistingInputBucket"] == "photos"
    assert args[args.index("--template-file") + 1] == "infra/cloudformation.yaml"
    assert "CAPABILITY_IAM" in args


@pytest.mark.parametrize("delete_artifacts", ["0", "1"])
def test_teardown_deletes_the_stack_and_keeps_data(tmp_path: Path, delete_artifacts: str) -> None:
    completed, calls = _run(tmp_path, "teardown", STACK="bn", DELETE_ARTIFACTS=delete_artifacts)
    assert completed.returncode == 0, completed.stderr
    assert "aws cloudformation delete-stack --stack-name bn" in calls
    assert "aws cloudformation wait stack-delete-complete --stack-name bn" in calls
    removed = any(c.startswith("aws ecr delete-repository") for c in calls)
    assert removed is (delete_artifacts == "1")
    assert not any(c.startswith("aws s3 rb s3://bn-input") for c in calls)

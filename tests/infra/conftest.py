"""Fixtures for the infrastructure tests: the template (parsed), and the stack deployed in moto."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = ROOT / "infra" / "cloudformation.yaml"
DOCKERFILE_PATH = ROOT / "Dockerfile"
REGION = "us-east-1"
STACK = "bn-test"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/bottleneck-consumer:abc123"

# Resource types in the template that moto's CloudFormation cannot create (it would skip them with
# a warning). They are removed before deploying and checked statically instead.
MOTO_UNSUPPORTED = frozenset(
    {"AWS::SQS::QueuePolicy", "AWS::S3::BucketPolicy", "AWS::CloudWatch::Alarm"}
)


def load_template(text: str | None = None) -> dict[str, Any]:
    """The template as plain data (short-form tags such as ``!Ref`` become ``{"Ref": ...}``)."""
    from cfnlint.decode import decode_str

    template, matches = decode_str(TEMPLATE_PATH.read_text() if text is None else text)
    assert not matches, [str(m) for m in matches]
    assert template is not None
    # cfn-lint's node types (str/dict subclasses that carry line numbers) to plain JSON types.
    data: dict[str, Any] = json.loads(json.dumps(template))
    return data


@pytest.fixture(scope="session")
def template() -> dict[str, Any]:
    """The parsed template (do not mutate: shared by the session)."""
    return load_template()


def resources_of(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """Logical id -> resource, for the resources of type ``kind``."""
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


@dataclass(frozen=True)
class Stack:
    """The moto deployment: outputs, logical id -> physical id, and the stripped resources."""

    outputs: dict[str, str]
    physical: dict[str, str]
    stripped: dict[str, str]
    code_sha256: str


def moto_supports(resource_type: str) -> bool:
    from moto.cloudformation.parsing import resource_class_from_type

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resource_class_from_type(resource_type) is not None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Deploy the template into moto's CloudFormation once per module; yield its handles.

    Moto-only adjustments, each for a known gap in moto (not in the template):
    * types moto cannot create are removed (and must be exactly ``MOTO_UNSUPPORTED``);
    * the compute environment gets a ServiceRole: moto requires one, AWS uses its
      service-linked role when it is absent;
    * InstanceTypes is passed explicitly: moto does not split a CommaDelimitedList default.
    """
    import boto3
    from moto import mock_aws

    from producer_lambda.package import build

    body = load_template()
    stripped = {
        logical: resource["Type"]
        for logical, resource in body["Resources"].items()
        if not moto_supports(resource["Type"])
    }
    for logical in stripped:
        del body["Resources"][logical]

    with mock_aws(config={"batch": {"use_docker": False}}):
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="batch", Description="gpu", VpcId=vpc)
        iam = boto3.client("iam", region_name=REGION)
        service_role = iam.create_role(RoleName="moto-batch-service", AssumeRolePolicyDocument="{}")
        body["Resources"]["ComputeEnvironment"]["Properties"]["ServiceRole"] = service_role["Role"][
            "Arn"
        ]

        # The real Lambda package, uploaded where the stack's parameters say: moto reads it.
        zip_path = tmp_path_factory.mktemp("lambda") / "producer_lambda.zip"
        build(zip_path)
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="bn-artifacts")
        s3.put_object(Bucket="bn-artifacts", Key="lambda/abc.zip", Body=zip_path.read_bytes())

        cfn = boto3.client("cloudformation", region_name=REGION)
        parameters = {
            "LambdaCodeBucket": "bn-artifacts",
            "LambdaCodeKey": "lambda/abc.zip",
            "ContainerImage": IMAGE,
            "SubnetIds": subnet,
            "SecurityGroupIds": group["GroupId"],
            "InstanceTypes": "g6,g5",
        }
        cfn.create_stack(
            StackName=STACK,
            TemplateBody=json.dumps(body),
            Capabilities=["CAPABILITY_IAM"],
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        )
        described = cfn.describe_stacks(StackName=STACK)["Stacks"][0]
        assert described["StackStatus"] == "CREATE_COMPLETE", described.get("StackStatusReason")
        summaries = cfn.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
        lam = boto3.client("lambda", region_name=REGION)
        code_sha = lam.get_function(FunctionName=f"{STACK}-producer")["Configuration"]["CodeSha256"]
        yield Stack(
            outputs={o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])},
            physical={s["LogicalResourceId"]: s["PhysicalResourceId"] for s in summaries},
            stripped=stripped,
            code_sha256=code_sha,
        )


def as_text(value: Any) -> str:
    """CloudFormation passes every environment value as a string; moto keeps Numbers as ints."""
    return value if isinstance(value, str) else json.dumps(value)

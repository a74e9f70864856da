"""An AWS Batch stack in moto (in-process or server): role, network, compute env, queue, job def.

moto validates what AWS validates here: a managed compute environment needs a service role and
an instance profile that exist, and subnets and security groups in a VPC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moto.core import DEFAULT_ACCOUNT_ID

ACCOUNT_ID = DEFAULT_ACCOUNT_ID
REGION = "us-east-1"

_ASSUME = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": ["batch.amazonaws.com", "ec2.amazonaws.com"]},
                "Action": "sts:AssumeRole",
            }
        ],
    }
)


@dataclass(frozen=True)
class BatchStack:
    """Names of what :func:`create_batch_stack` made."""

    job_queue: str
    job_definition: str
    compute_environment: str


def create_batch_stack(
    iam: Any, ec2: Any, batch: Any, *, name: str = "bottleneck-gpu", max_vcpus: int = 16
) -> BatchStack:
    """Create a managed GPU compute environment, its job queue and a consumer job definition."""
    role_arn = iam.create_role(
        RoleName=f"{name}-batch", AssumeRolePolicyDocument=_ASSUME, Path="/"
    )["Role"]["Arn"]
    profile_arn = iam.create_instance_profile(InstanceProfileName=f"{name}-instance")[
        "InstanceProfile"
    ]["Arn"]
    iam.add_role_to_instance_profile(
        InstanceProfileName=f"{name}-instance", RoleName=f"{name}-batch"
    )
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
    group_id = ec2.create_security_group(
        GroupName=f"{name}-sg", Description="bottleneck consumers", VpcId=vpc_id
    )["GroupId"]
    env_arn = batch.create_compute_environment(
        computeEnvironmentName=name,
        type="MANAGED",
        state="ENABLED",
        computeResources={
            "type": "EC2",
            "minvCpus": 0,
            "maxvCpus": max_vcpus,
            "desiredvCpus": 0,
            "instanceTypes": ["g4dn.xlarge"],
            "subnets": [subnet_id],
            "securityGroupIds": [group_id],
            "instanceRole": profile_arn,
        },
        serviceRole=role_arn,
    )["computeEnvironmentArn"]
    batch.create_job_queue(
        jobQueueName=name,
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env_arn}],
    )
    batch.register_job_definition(
        jobDefinitionName="bottleneck-consumer",
        type="container",
        containerProperties={
            "image": "bottleneck:latest",
            "command": ["bottleneck-consumer", "--idle-exit", "300"],
            "resourceRequirements": [
                {"type": "VCPU", "value": "4"},
                {"type": "MEMORY", "value": "15000"},
                {"type": "GPU", "value": "1"},
            ],
        },
    )
    return BatchStack(name, "bottleneck-consumer", name)

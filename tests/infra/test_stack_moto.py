"""The template deployed into moto's CloudFormation: what the services report is wired right.

GIVEN the stack created by the ``stack`` fixture (every resource type moto supports), WHEN the
services are asked about the resources, THEN queues, function, rules, roles and the job
definition are connected to each other as the pipeline needs.
"""

from __future__ import annotations

import ast
import json
from typing import Any

import boto3
import pytest

from consumer.config import OPTIONS, Config
from producer_lambda.settings import DEFAULT_SUFFIXES, Settings
from tests.infra.conftest import IMAGE, MOTO_UNSUPPORTED, REGION, STACK, Stack, as_text


def _client(service: str) -> Any:
    return boto3.client(service, region_name=REGION)  # type: ignore[call-overload]


def _queue_arn(url: str) -> str:
    attrs = _client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return str(attrs["Attributes"]["QueueArn"])


def _job_definition(stack: Stack) -> dict[str, Any]:
    found = _client("batch").describe_job_definitions(
        jobDefinitions=[stack.outputs["JobDefinitionArn"]]
    )["jobDefinitions"]
    assert len(found) == 1
    return dict(found[0])


def _lambda_env(stack: Stack, output: str = "ProducerFunctionName") -> dict[str, str]:
    config = _client("lambda").get_function_configuration(FunctionName=stack.outputs[output])
    return {k: as_text(v) for k, v in config["Environment"]["Variables"].items()}


def _inline_policy(role_logical_id: str, stack: Stack) -> list[dict[str, Any]]:
    iam = _client("iam")
    role = stack.physical[role_logical_id]
    names = iam.list_role_policies(RoleName=role)["PolicyNames"]
    statements: list[dict[str, Any]] = []
    for name in names:
        document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        if isinstance(document, str):
            # moto keeps a policy that came through CloudFormation as Python's repr, not JSON.
            document = (
                ast.literal_eval(document) if document.startswith("{'") else json.loads(document)
            )
        statements.extend(document["Statement"])
    return statements


def _allowed(statements: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Action -> resources it is allowed on (Allow statements only)."""
    allowed: dict[str, list[Any]] = {}
    for statement in statements:
        if statement["Effect"] != "Allow":
            continue
        actions = statement["Action"]
        resources = statement["Resource"]
        for action in [actions] if isinstance(actions, str) else actions:
            allowed.setdefault(action, []).extend(
                [resources] if isinstance(resources, str) else resources
            )
    return allowed


def test_stack_creates_every_supported_resource(stack: Stack) -> None:
    # Only the types moto cannot build were left out, and each of them is checked statically.
    assert set(stack.stripped.values()) <= MOTO_UNSUPPORTED
    assert {"QueuesTlsPolicy", "DeadLetterAlarm"} <= set(stack.stripped)
    expected = {
        "WorkQueue",
        "DeadLetterQueue",
        "ProducerFunction",
        "UploadFunction",
        "UploadQueue",
        "UploadDeadLetterQueue",
        "UploadEventSourceMapping",
        "UploadRule",
        "ScalerSchedule",
        "ComputeEnvironment",
        "JobQueue",
        "JobDefinition",
        "Dashboard",
        "InputBucket",
    }
    assert expected <= set(stack.physical)
    for key in ("InputBucketName", "WorkQueueUrl", "DeadLetterQueueUrl", "JobQueueArn"):
        assert stack.outputs[key]
    assert stack.outputs["DashboardUrl"].endswith(f"#dashboards:name={STACK}-pipeline")


def test_work_queue_redrives_to_the_dead_letter_queue(stack: Stack) -> None:
    sqs = _client("sqs")
    attrs = sqs.get_queue_attributes(QueueUrl=stack.outputs["WorkQueueUrl"], AttributeNames=["All"])
    attributes = attrs["Attributes"]
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == _queue_arn(stack.outputs["DeadLetterQueueUrl"])
    assert int(redrive["maxReceiveCount"]) == 5
    assert attributes["SqsManagedSseEnabled"] == "true"
    assert int(attributes["VisibilityTimeout"]) == 120
    assert int(attributes["ReceiveMessageWaitTimeSeconds"]) == 20
    dlq = sqs.get_queue_attributes(
        QueueUrl=stack.outputs["DeadLetterQueueUrl"], AttributeNames=["All"]
    )["Attributes"]
    # Messages must not expire in the dead-letter queue before they would have in the work queue.
    assert int(dlq["MessageRetentionPeriod"]) >= int(attributes["MessageRetentionPeriod"])


@pytest.mark.parametrize("detail_type", ["Object Created", "Object Deleted"])
@pytest.mark.parametrize(
    ("key", "bucket_matches", "expected"),
    [
        ("images/cat.jpg", True, True),
        ("images/2024/IMG_0001.JPG", True, True),
        ("images/scan.tiff", True, True),
        ("images/notes.txt", True, False),
        ("features/images/cat.jpg.npy", True, False),  # a feature file never triggers
        ("other/cat.jpg", True, False),
        ("images/cat.jpg", False, False),
    ],
)
def test_upload_rule_filters_bucket_prefix_and_suffix(
    stack: Stack, key: str, bucket_matches: bool, expected: bool, detail_type: str
) -> None:
    events = _client("events")
    rule = events.describe_rule(Name=stack.physical["UploadRule"])
    bucket = stack.outputs["InputBucketName"] if bucket_matches else "someone-elses-bucket"
    event = {
        "id": "1",
        "account": "123456789012",
        "source": "aws.s3",
        "time": "2024-05-01T12:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail-type": detail_type,
        "detail": {"bucket": {"name": bucket}, "object": {"key": key, "size": 10, "etag": "e"}},
    }
    # moto does not implement TestEventPattern; its rule matcher (which delivers events to
    # targets, wildcards included) is the next best judge.
    from moto.events.models import EventPattern, EventPatternParser

    raw = rule["EventPattern"]
    pattern = EventPattern(raw, EventPatternParser(raw).parse())
    assert pattern.matches_event(event) is expected  # type: ignore[arg-type]


def test_uploads_go_to_the_buffer_and_the_schedule_to_the_scaler(stack: Stack) -> None:
    events = _client("events")
    scaler = _client("lambda").get_function_configuration(
        FunctionName=stack.outputs["ProducerFunctionName"]
    )
    event_dlq_arn = _queue_arn(stack.outputs["EventDeadLetterQueueUrl"])
    expected = {
        "UploadRule": _queue_arn(stack.outputs["UploadQueueUrl"]),
        "ScalerSchedule": scaler["FunctionArn"],
    }
    for rule, arn in expected.items():
        targets = events.list_targets_by_rule(Rule=stack.physical[rule])["Targets"]
        assert [t["Arn"] for t in targets] == [arn]
        assert targets[0]["DeadLetterConfig"]["Arn"] == event_dlq_arn
    schedule = events.describe_rule(Name=stack.physical["ScalerSchedule"])
    assert schedule["ScheduleExpression"] == "rate(1 minute)"


def test_the_buffer_queue_feeds_the_upload_function_in_batches(stack: Stack) -> None:
    lam = _client("lambda")
    function = lam.get_function(FunctionName=stack.outputs["UploadFunctionName"])
    # GIVEN the upload function THEN it runs the same code and handler as the scaler, without
    # a concurrency cap of one
    assert function["Configuration"]["Handler"] == "producer_lambda.handler.lambda_handler"
    assert function["Configuration"]["CodeSha256"] == stack.code_sha256
    assert "ReservedConcurrentExecutions" not in function.get("Concurrency", {})
    # AND the buffer queue is its one event source: batches of 100 within a second, failed
    # items reported, at most 10 invocations at once
    (mapping,) = lam.list_event_source_mappings(FunctionName=stack.outputs["UploadFunctionName"])[
        "EventSourceMappings"
    ]
    buffer_url = stack.outputs["UploadQueueUrl"]
    assert mapping["EventSourceArn"] == _queue_arn(buffer_url)
    assert int(mapping["BatchSize"]) == 100
    assert int(mapping["MaximumBatchingWindowInSeconds"]) == 1
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert int(mapping["ScalingConfig"]["MaximumConcurrency"]) == 10
    # AND the buffer sets events aside in its own dead-letter queue after five receives
    attributes = _client("sqs").get_queue_attributes(QueueUrl=buffer_url, AttributeNames=["All"])[
        "Attributes"
    ]
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == _queue_arn(stack.outputs["UploadDeadLetterQueueUrl"])
    assert int(redrive["maxReceiveCount"]) == 5
    assert attributes["SqsManagedSseEnabled"] == "true"
    timeout = int(function["Configuration"]["Timeout"])
    assert int(attributes["VisibilityTimeout"]) >= 6 * timeout


def test_upload_function_environment_is_accepted_and_never_scales(stack: Stack) -> None:
    settings = Settings.from_env(_lambda_env(stack, "UploadFunctionName"))
    assert settings.queue_url == stack.outputs["WorkQueueUrl"]
    # The loop guard is the root of the versions; deletes look in every version under it.
    assert str(settings.output) == stack.outputs["OutputLocation"]
    assert str(settings.feature_output) == stack.outputs["FeatureOutput"]
    assert settings.feature_output.fields == ("model", "fingerprint")
    assert settings.input_prefix == "images/"
    assert settings.suffixes == DEFAULT_SUFFIXES
    assert settings.scaling is None


def test_lambda_environment_is_accepted_by_the_producer_settings(stack: Stack) -> None:
    config = _client("lambda").get_function(FunctionName=stack.outputs["ProducerFunctionName"])
    assert config["Concurrency"]["ReservedConcurrentExecutions"] == 1
    assert config["Configuration"]["Handler"] == "producer_lambda.handler.lambda_handler"
    assert config["Configuration"]["CodeSha256"] == stack.code_sha256
    env = _lambda_env(stack)
    settings = Settings.from_env(env)
    assert settings.queue_url == stack.outputs["WorkQueueUrl"]
    assert str(settings.output) == stack.outputs["OutputLocation"]
    assert settings.input_prefix == "images/"
    assert settings.suffixes == DEFAULT_SUFFIXES
    assert settings.scaling is not None
    assert settings.scaling.job_queue == stack.outputs["JobQueueArn"]
    assert settings.scaling.job_definition == stack.outputs["JobDefinitionArn"]
    assert settings.scaling.max_jobs == 4


def test_job_definition_requests_one_gpu_and_retries_only_host_loss(stack: Stack) -> None:
    job = _job_definition(stack)
    container = job["containerProperties"]
    assert container["image"] == IMAGE
    requirements = {r["type"]: as_text(r["value"]) for r in container["resourceRequirements"]}
    assert requirements["GPU"] == "1"
    assert int(requirements["VCPU"]) >= 1
    assert int(requirements["MEMORY"]) >= 1024
    rules = job["retryStrategy"]["evaluateOnExit"]
    assert [r["action"].upper() for r in rules] == ["RETRY", "EXIT"]
    assert rules[0]["onStatusReason"] == "Host EC2*"
    assert rules[1]["onReason"] == "*"
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert container["privileged"] is False


def test_job_definition_command_and_environment_parse_as_consumer_config(stack: Stack) -> None:
    container = _job_definition(stack)["containerProperties"]
    argv = [as_text(a) for a in container["command"]]
    env = {e["name"]: as_text(e["value"]) for e in container["environment"]}
    # Config ignores unknown BOTTLENECK_* variables, so a misspelt name would pass silently.
    known = {option.env for option in OPTIONS}
    assert set(env) <= known, sorted(set(env) - known)
    config = Config.from_args(argv, environ=env)
    assert config.queue_url == stack.outputs["WorkQueueUrl"]
    assert config.dead_letter_url == stack.outputs["DeadLetterQueueUrl"]
    # The default layout: <OutputPrefix><model>/<fingerprint>/, filled in by the consumer.
    assert str(config.output) == stack.outputs["FeatureOutput"]
    assert str(config.output) == stack.outputs["OutputLocation"] + "{model}/{fingerprint}/"
    assert str(config.output_template.root) == stack.outputs["OutputLocation"]
    assert config.idle_exit > 0
    assert config.device == "cuda"
    assert config.model == "resnet50"
    # Producer and consumer agree on where feature files go (the Lambda ignores events there).
    assert _lambda_env(stack)["BOTTLENECK_OUTPUT"] == str(config.output)


def test_compute_environment_scales_to_zero_on_gpu_instances(stack: Stack) -> None:
    envs = _client("batch").describe_compute_environments(
        computeEnvironments=[stack.physical["ComputeEnvironment"]]
    )["computeEnvironments"]
    resources = envs[0]["computeResources"]
    assert resources["minvCpus"] == 0
    assert resources["type"] == "SPOT"
    assert resources["allocationStrategy"] == "SPOT_PRICE_CAPACITY_OPTIMIZED"
    assert resources["instanceTypes"] == ["g6", "g5"]
    assert resources["ec2Configuration"][0]["imageType"].endswith("_NVIDIA")
    queues = _client("batch").describe_job_queues(jobQueues=[stack.outputs["JobQueueArn"]])
    order = queues["jobQueues"][0]["computeEnvironmentOrder"]
    assert [o["computeEnvironment"] for o in order] == [envs[0]["computeEnvironmentArn"]]


def test_producer_role_allows_exactly_what_the_lambda_calls(stack: Stack) -> None:
    allowed = _allowed(_inline_policy("ProducerRole", stack))
    assert set(allowed) == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "sqs:SendMessage",
        "sqs:GetQueueAttributes",
        "batch:SubmitJob",
        "batch:CancelJob",
        "batch:ListJobs",
        "batch:DescribeJobs",
    }
    work_arn = _queue_arn(stack.outputs["WorkQueueUrl"])
    assert allowed["sqs:GetQueueAttributes"] == [work_arn]
    # The scaler sends nothing to the work queue: only Lambda's own dead letters, with its role.
    assert allowed["sqs:SendMessage"] == [_queue_arn(stack.outputs["EventDeadLetterQueueUrl"])]
    assert sorted(allowed["batch:SubmitJob"]) == sorted(
        [stack.outputs["JobQueueArn"], stack.outputs["JobDefinitionArn"]]
    )


def test_upload_role_allows_exactly_what_the_upload_function_calls(stack: Stack) -> None:
    allowed = _allowed(_inline_policy("UploadRole", stack))
    assert set(allowed) == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
        "s3:GetObject",
        "s3:DeleteObject",
        "s3:PutObject",
        "s3:ListBucket",
    }
    buffer_arn = _queue_arn(stack.outputs["UploadQueueUrl"])
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"):
        assert allowed[action] == [buffer_arn], action
    assert allowed["sqs:SendMessage"] == [_queue_arn(stack.outputs["WorkQueueUrl"])]
    bucket = stack.outputs["InputBucketName"]
    # Deletes only under the output prefix; HEADs of images and of feature files; and the
    # ListBucket that makes a missing key a 404 instead of a 403
    assert allowed["s3:DeleteObject"] == [f"arn:aws:s3:::{bucket}/features/*"]
    # Writes only tombstones for shard rows (any version's), nothing else
    assert allowed["s3:PutObject"] == [f"arn:aws:s3:::{bucket}/features/*shards/tombstones/*"]
    assert sorted(allowed["s3:GetObject"]) == [
        f"arn:aws:s3:::{bucket}/features/*",
        f"arn:aws:s3:::{bucket}/images/*",
    ]
    assert allowed["s3:ListBucket"] == [f"arn:aws:s3:::{bucket}"]
    function = _client("lambda").get_function_configuration(
        FunctionName=stack.outputs["UploadFunctionName"]
    )
    assert function["Role"].endswith("/" + stack.physical["UploadRole"])


def test_job_role_allows_exactly_what_the_consumer_calls(stack: Stack) -> None:
    allowed = _allowed(_inline_policy("JobRole", stack))
    assert set(allowed) == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
        "sqs:SendMessage",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:ListBucket",
    }
    assert allowed["sqs:SendMessage"] == [_queue_arn(stack.outputs["DeadLetterQueueUrl"])]
    bucket = stack.outputs["InputBucketName"]
    # DeleteObject: the quarantine's markers and --orphan-check head, only under the output prefix
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert allowed[action] == [f"arn:aws:s3:::{bucket}/features/*"], action
    assert sorted(allowed["s3:GetObject"]) == [
        f"arn:aws:s3:::{bucket}/features/*",
        f"arn:aws:s3:::{bucket}/images/*",
    ]


def test_log_groups_have_retention(stack: Stack) -> None:
    groups = _client("logs").describe_log_groups(logGroupNamePrefix="/aws/")["logGroups"]
    retention = {g["logGroupName"]: g.get("retentionInDays") for g in groups}
    assert retention == {
        f"/aws/lambda/{STACK}-producer": 30,
        f"/aws/lambda/{STACK}-upload": 30,
        f"/aws/batch/{STACK}-consumer": 30,
    }

"""Static checks of infra/cloudformation.yaml: what moto cannot show, and cross-file agreement."""

from __future__ import annotations

import json
import re
from typing import Any

from consumer import metrics
from producer_lambda.settings import DEFAULT_SUFFIXES
from tests.infra.conftest import resources_of


def _statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    statements = document["Statement"]
    return statements if isinstance(statements, list) else [statements]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _inline_statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for logical, role in resources_of(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            found.extend((logical, s) for s in _statements(policy["PolicyDocument"]))
    return found


def test_roles_grant_no_wildcard_actions(template: dict[str, Any]) -> None:
    statements = _inline_statements(template)
    assert {logical for logical, _ in statements} == {"ProducerRole", "UploadRole", "JobRole"}
    for logical, statement in statements:
        assert statement["Effect"] == "Allow", (logical, statement)
        for action in _as_list(statement["Action"]):
            assert "*" not in action, f"{logical}: wildcard action {action}"
        if _as_list(statement["Resource"]) == ["*"]:
            # The one API without resource-level permissions.
            assert set(_as_list(statement["Action"])) == {"batch:ListJobs", "batch:DescribeJobs"}


def test_only_the_instance_role_uses_an_aws_managed_policy(template: dict[str, Any]) -> None:
    managed = {
        logical: role["Properties"].get("ManagedPolicyArns", [])
        for logical, role in resources_of(template, "AWS::IAM::Role").items()
    }
    assert managed["ProducerRole"] == managed["UploadRole"] == managed["JobRole"] == []
    (arn,) = managed["InstanceRole"]
    assert arn["Fn::Sub"].endswith(
        ":iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"
    )


def test_every_queue_denies_insecure_transport(template: dict[str, Any]) -> None:
    queues = set(resources_of(template, "AWS::SQS::Queue"))
    covered: set[str] = set()
    for policy in resources_of(template, "AWS::SQS::QueuePolicy").values():
        denies_plain_http = any(
            s["Effect"] == "Deny"
            and s["Principal"] == "*"
            and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
            for s in _statements(policy["Properties"]["PolicyDocument"])
        )
        if denies_plain_http:
            covered |= {ref["Ref"] for ref in policy["Properties"]["Queues"]}
    assert covered == queues


def test_queues_are_encrypted_and_redrive_with_a_receive_limit(template: dict[str, Any]) -> None:
    for logical, queue in resources_of(template, "AWS::SQS::Queue").items():
        assert queue["Properties"]["SqsManagedSseEnabled"] is True, logical
    redrive = template["Resources"]["WorkQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    assert redrive["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}


def test_bucket_sends_events_to_eventbridge_and_is_private(template: dict[str, Any]) -> None:
    bucket = template["Resources"]["InputBucket"]
    assert bucket["Condition"] == "CreateInputBucket"
    properties = bucket["Properties"]
    assert properties["NotificationConfiguration"] == {
        "EventBridgeConfiguration": {"EventBridgeEnabled": True}
    }
    assert set(properties["PublicAccessBlockConfiguration"].values()) == {True}
    policy = template["Resources"]["InputBucketPolicy"]["Properties"]["PolicyDocument"]
    (deny,) = _statements(policy)
    assert deny["Effect"] == "Deny"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_rule_patterns_and_lambda_suffixes_match_the_producer_defaults(
    template: dict[str, Any],
) -> None:
    for logical in ("ProducerFunction", "UploadFunction"):
        function = template["Resources"][logical]["Properties"]
        env = function["Environment"]["Variables"]
        assert tuple(env["BOTTLENECK_SUFFIXES"].split(",")) == DEFAULT_SUFFIXES, logical
    pattern = template["Resources"]["UploadRule"]["Properties"]["EventPattern"]
    # Uploads and deletes (lifecycle expirations are "Object Deleted" too), nothing else.
    assert pattern["detail-type"] == ["Object Created", "Object Deleted"]
    wildcards = {item["wildcard"]["Fn::Sub"] for item in pattern["detail"]["object"]["key"]}
    expected = {"${InputPrefix}*" + s for s in DEFAULT_SUFFIXES}
    expected |= {"${InputPrefix}*" + s.upper() for s in DEFAULT_SUFFIXES}
    assert wildcards == expected


def test_prefix_parameters_keep_outputs_apart_from_inputs(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    input_prefix = parameters["InputPrefix"]["Default"]
    output_prefix = parameters["OutputPrefix"]["Default"]
    assert re.fullmatch(parameters["InputPrefix"]["AllowedPattern"], input_prefix)
    assert re.fullmatch(parameters["OutputPrefix"]["AllowedPattern"], output_prefix)
    assert not output_prefix.startswith(input_prefix)
    # Characters that S3 URL-encodes in event keys would make the rule's patterns miss.
    assert not re.fullmatch(parameters["InputPrefix"]["AllowedPattern"], "my images/")
    # A feature file (<output prefix><key>.npy) never ends in an image suffix.
    assert not f"{output_prefix}{input_prefix}a.jpg.npy".lower().endswith(DEFAULT_SUFFIXES)


def test_lambda_runtime_logging_and_concurrency(template: dict[str, Any]) -> None:
    functions = resources_of(template, "AWS::Lambda::Function")
    assert set(functions) == {"ProducerFunction", "UploadFunction"}
    for logical, resource in functions.items():
        function = resource["Properties"]
        major, minor = (int(x) for x in function["Runtime"].removeprefix("python").split("."))
        assert (major, minor) >= (3, 12)
        assert function["LoggingConfig"]["LogFormat"] == "JSON"
        assert function["LoggingConfig"]["LogGroup"] == {
            "Ref": logical.replace("Function", "LogGroup")
        }
        # One code, one handler: the handler takes every kind of event.
        assert function["Handler"] == "producer_lambda.handler.lambda_handler"
        assert function["Code"] == {
            "S3Bucket": {"Ref": "LambdaCodeBucket"},
            "S3Key": {"Ref": "LambdaCodeKey"},
        }
    # The scaler runs one at a time; the upload path is not capped at one (nor by reserved
    # concurrency at all: the event source mapping's MaximumConcurrency caps it).
    assert functions["ProducerFunction"]["Properties"]["ReservedConcurrentExecutions"] == 1
    assert "ReservedConcurrentExecutions" not in functions["UploadFunction"]["Properties"]
    for log_group in resources_of(template, "AWS::Logs::LogGroup").values():
        assert log_group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_compute_environment_and_job_definition(template: dict[str, Any]) -> None:
    resources = template["Resources"]["ComputeEnvironment"]["Properties"]["ComputeResources"]
    assert resources["MinvCpus"] == 0
    assert resources["Ec2Configuration"] == [{"ImageType": {"Ref": "AmiImageType"}}]
    assert set(template["Parameters"]["AmiImageType"]["AllowedValues"]) <= {
        "ECS_AL2_NVIDIA",
        "ECS_AL2023_NVIDIA",
    }
    assert template["Parameters"]["InstanceTypes"]["Default"] == "g6,g5"
    job = template["Resources"]["JobDefinition"]["Properties"]
    assert job["Timeout"] == {"AttemptDurationSeconds": {"Ref": "JobTimeoutSeconds"}}
    assert job["PlatformCapabilities"] == ["EC2"]
    assert job["ContainerProperties"]["Command"][0] == "--idle-exit"


def test_alarms_watch_dead_letter_depth(template: dict[str, Any]) -> None:
    watched = set()
    for alarm in resources_of(template, "AWS::CloudWatch::Alarm").values():
        properties = alarm["Properties"]
        assert properties["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert properties["ComparisonOperator"] == "GreaterThanThreshold"
        assert properties["Threshold"] == 0
        (dimension,) = properties["Dimensions"]
        watched.add(dimension["Value"]["Fn::GetAtt"][0])
    assert watched == {"DeadLetterQueue", "EventDeadLetterQueue", "UploadDeadLetterQueue"}


def _dashboard(template: dict[str, Any]) -> dict[str, Any]:
    body, variables = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    for name in [*variables, "AWS::Region"]:
        body = body.replace("${" + name + "}", f"value-of-{name}")
    assert "${" not in body, "a ${...} in the dashboard body that Fn::Sub does not define"
    document: dict[str, Any] = json.loads(body)
    return document


def test_dashboard_reads_the_metrics_the_consumer_emits(template: dict[str, Any]) -> None:
    dashboard = _dashboard(template)
    rows = [row for w in dashboard["widgets"] for row in w["properties"]["metrics"]]
    plain = {(row[0], row[1], row[2]) for row in rows if isinstance(row[0], str)}
    namespace = metrics.DEFAULT_NAMESPACE
    assert (namespace, metrics.METRIC_IMAGES, "Queue") in plain
    assert (namespace, metrics.METRIC_BATCH_LATENCY, "Queue") in plain
    assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName") in plain
    assert ("AWS/SQS", "ApproximateNumberOfMessagesNotVisible", "QueueName") in plain
    expressions = " ".join(row[0]["expression"] for row in rows if isinstance(row[0], dict))
    assert f'MetricName="{metrics.METRIC_FAILURES}"' in expressions
    assert f"{{{namespace},{metrics.ERROR_CODE_DIMENSION},Queue}}" in expressions
    assert "PERIOD(images)" in expressions


def test_outputs(template: dict[str, Any]) -> None:
    assert {
        "InputBucketName",
        "OutputLocation",
        "WorkQueueUrl",
        "DeadLetterQueueUrl",
        "JobQueueArn",
        "DashboardUrl",
        "UploadFunctionName",
        "UploadQueueUrl",
        "UploadDeadLetterQueueUrl",
    } <= set(template["Outputs"])


def test_uploads_reach_the_upload_function_through_a_buffer_queue(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    # GIVEN the upload rule THEN its one target is the buffer queue, with a dead-letter queue for
    # what EventBridge cannot deliver; no rule invokes the upload function directly
    (target,) = resources["UploadRule"]["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["UploadQueue", "Arn"]}
    assert target["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": ["EventDeadLetterQueue", "Arn"]}}
    permissions = resources_of(template, "AWS::Lambda::Permission").values()
    assert all(p["Properties"]["FunctionName"] == {"Ref": "ProducerFunction"} for p in permissions)
    # AND the buffer queue hands batches to the upload function, reporting failed items only
    (mapping,) = resources_of(template, "AWS::Lambda::EventSourceMapping").values()
    properties = mapping["Properties"]
    assert properties["EventSourceArn"] == {"Fn::GetAtt": ["UploadQueue", "Arn"]}
    assert properties["FunctionName"] == {"Ref": "UploadFunction"}
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert properties["BatchSize"] == {"Ref": "UploadBatchSize"}
    assert properties["MaximumBatchingWindowInSeconds"] == {"Ref": "UploadBatchWindowSeconds"}
    assert properties["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "UploadMaxConcurrency"}}
    parameters = template["Parameters"]
    defaults = [
        parameters[name]["Default"]
        for name in ("UploadBatchSize", "UploadBatchWindowSeconds", "UploadMaxConcurrency")
    ]
    assert defaults == [100, 1, 10]  # fmt: skip
    # Lambda: a batch over 10 needs a window of at least 1 s; a mapping's cap is at least 2
    assert parameters["UploadBatchWindowSeconds"]["MinValue"] >= 1
    assert parameters["UploadMaxConcurrency"]["MinValue"] >= 2
    # AND the buffer outlasts a throttled batch and sets failing events aside after 5 receives
    queue = resources["UploadQueue"]["Properties"]
    timeout = resources["UploadFunction"]["Properties"]["Timeout"]
    assert queue["VisibilityTimeout"] >= 6 * timeout
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["UploadDeadLetterQueue", "Arn"]},
        "maxReceiveCount": 5,
    }
    dlq = resources["UploadDeadLetterQueue"]["Properties"]
    assert dlq["MessageRetentionPeriod"] >= queue["MessageRetentionPeriod"]


def test_only_the_upload_rule_may_send_to_the_buffer_queue(template: dict[str, Any]) -> None:
    policies = [
        p["Properties"]
        for p in resources_of(template, "AWS::SQS::QueuePolicy").values()
        if {"Ref": "UploadQueue"} in p["Properties"]["Queues"]
    ]
    (policy,) = policies  # a queue keeps one policy: a second would replace the first
    assert policy["Queues"] == [{"Ref": "UploadQueue"}]
    allows = [s for s in _statements(policy["PolicyDocument"]) if s["Effect"] == "Allow"]
    assert allows == [
        {
            "Sid": "UploadRuleOnly",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": {"Fn::GetAtt": ["UploadQueue", "Arn"]},
            "Condition": {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["UploadRule", "Arn"]}}},
        }
    ]


def test_the_upload_function_never_scales_and_its_role_cannot(template: dict[str, Any]) -> None:
    env = template["Resources"]["UploadFunction"]["Properties"]["Environment"]["Variables"]
    assert not {"BOTTLENECK_JOB_QUEUE", "BOTTLENECK_JOB_DEFINITION"} & set(env)
    actions = {
        action
        for logical, statement in _inline_statements(template)
        if logical == "UploadRole"
        for action in _as_list(statement["Action"])
    }
    assert not any(action.startswith("batch:") for action in actions)
    # AND the scaler no longer sends messages: it reads the depth (and its DLQ is Lambda's)
    scaler = [s for logical, s in _inline_statements(template) if logical == "ProducerRole"]
    sends = [s for s in scaler if "sqs:SendMessage" in _as_list(s["Action"])]
    assert [s["Resource"] for s in sends] == [{"Fn::GetAtt": ["EventDeadLetterQueue", "Arn"]}]


def _output_values(template: dict[str, Any]) -> dict[str, Any]:
    """Every BOTTLENECK_OUTPUT in the template (both functions, the job definition) and the
    FeatureOutput output, by where they are."""
    resources = template["Resources"]
    found = {
        logical: resources[logical]["Properties"]["Environment"]["Variables"]["BOTTLENECK_OUTPUT"]
        for logical in ("ProducerFunction", "UploadFunction")
    }
    container = resources["JobDefinition"]["Properties"]["ContainerProperties"]
    (job,) = [e["Value"] for e in container["Environment"] if e["Name"] == "BOTTLENECK_OUTPUT"]
    found["JobDefinition"] = job
    found["FeatureOutput"] = template["Outputs"]["FeatureOutput"]["Value"]
    return found


def _resolve(value: Any, layout: str) -> str:
    """A BOTTLENECK_OUTPUT for one OutputLayout, with the bucket and the prefix left as names."""
    text, variables = value["Fn::Sub"]
    condition, versioned, flat = variables["Layout"]["Fn::If"]
    assert condition == "VersionedOutput"
    return str(text.replace("${Layout}", versioned if layout == "versioned" else flat))


def test_outputs_carry_the_model_and_fingerprint_unless_the_layout_is_flat(
    template: dict[str, Any],
) -> None:
    # GIVEN the OutputLayout parameter: versioned by default, flat as before
    parameter = template["Parameters"]["OutputLayout"]
    assert (parameter["Default"], parameter["AllowedValues"]) == (
        "versioned",
        ["versioned", "flat"],
    )
    assert template["Conditions"]["VersionedOutput"] == {
        "Fn::Equals": [{"Ref": "OutputLayout"}, "versioned"]
    }
    values = _output_values(template)
    # THEN the consumer, both functions and the stack's output say the same, for each layout:
    # versioned adds {model}/{fingerprint}/ to the root, flat is exactly OutputPrefix
    for layout, expected in (
        ("versioned", "s3://${Bucket}/${OutputPrefix}{model}/{fingerprint}/"),
        ("flat", "s3://${Bucket}/${OutputPrefix}"),
    ):
        assert {where: _resolve(v, layout) for where, v in values.items()} == dict.fromkeys(
            values, expected
        )
    # AND the bucket is chosen the same way everywhere
    buckets = [json.dumps(v["Fn::Sub"][1]["Bucket"], sort_keys=True) for v in values.values()]
    assert len(set(buckets)) == 1


def test_grants_on_the_output_stay_on_the_root(template: dict[str, Any]) -> None:
    # Every version lies under OutputPrefix: no grant names a placeholder or the layout.
    text = json.dumps([statement for _, statement in _inline_statements(template)])
    assert "${OutputPrefix}*" in text
    assert "Layout" not in text and "{model}" not in text and "{fingerprint}" not in text

"""The Dockerfile, without a Docker engine: it parses, pins its base, runs offline as non-root."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata

import torch

from tests.infra.conftest import DOCKERFILE_PATH, ROOT

KNOWN = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are ignored by Docker too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def _instructions() -> list[Instruction]:
    return parse(DOCKERFILE_PATH.read_text())


def _final_stage() -> list[Instruction]:
    instructions = _instructions()
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def test_parses_into_known_instructions() -> None:
    instructions = _instructions()
    assert instructions[0].keyword in {"FROM", "ARG"}
    unknown = [(i.line, i.keyword) for i in instructions if i.keyword not in KNOWN]
    assert unknown == []


def test_parser_rejects_an_unterminated_continuation() -> None:
    try:
        parse("FROM x:1\nRUN echo \\\n")
    except AssertionError:
        return
    raise AssertionError("expected the parser to reject a dangling continuation")


def test_every_base_is_a_pinned_cuda_pytorch_runtime() -> None:
    bases = [i.value.split()[0] for i in _instructions() if i.keyword == "FROM"]
    assert bases
    for base in bases:
        image, _, tag = base.partition("@")[0].rpartition(":")
        assert image == "pytorch/pytorch", base
        # A full version tag (never "latest"), CUDA and the runtime (not the devel) flavour.
        assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), base


def _args(stage: list[Instruction]) -> dict[str, str]:
    return dict(i.value.split("=", 1) for i in stage if i.keyword == "ARG" and "=" in i.value)


def test_the_image_runs_the_torch_the_tests_run() -> None:
    # GIVEN the torch and torchvision this test suite runs on
    torch_version = metadata.version("torch").split("+")[0]
    torchvision_version = metadata.version("torchvision").split("+")[0]
    cuda = torch.version.cuda  # None for a CPU-only build: then the CUDA line is not checked

    # THEN the final stage pins the same versions
    args = _args(_final_stage())
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (
        torch_version,
        torchvision_version,
    ), "the tests moved to another torch: move the Dockerfile's base and pins with them"
    # AND every base is that torch's official image, for the CUDA these wheels are built for
    for base in [i.value.split()[0] for i in _instructions() if i.keyword == "FROM"]:
        tag = base.partition("@")[0].rpartition(":")[2]
        version, cuda_part = tag.split("-")[:2]
        assert version == torch_version, base
        if cuda is not None:
            assert cuda_part == f"cuda{cuda}", (base, cuda)
        # AND nvImageCodec's wheel is built for the same CUDA major version
        major = cuda_part.removeprefix("cuda").split(".")[0]
        assert re.match(rf"nvidia-nvimgcodec-cu{major}\[nvjpeg\]", args["NVIMGCODEC"]), args


def test_the_build_checks_the_base_then_installs_under_its_pins() -> None:
    runs = [i for i in _final_stage() if i.keyword == "RUN"]
    (check,) = [r for r in runs if "torchvision.__version__" in r.value]
    (install,) = [r for r in runs if "/wheels/*.whl" in r.value]
    # The base's versions are checked before anything is installed on top of it
    assert check.line < install.line
    assert '"$TORCH_VERSION" "$TORCHVISION_VERSION"' in check.value
    assert "torch==%s" in install.value and "torchvision==%s" in install.value
    assert "--constraint /tmp/constraints.txt" in install.value
    assert '"$NVIMGCODEC"' in install.value


def test_every_package_of_the_distribution_is_copied_into_the_build() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*")
        for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    instructions = _instructions()
    first_stage_end = next(
        i for i, ins in enumerate(instructions) if ins.keyword == "FROM" and i > 0
    )
    copied = {
        src.rstrip("/").removeprefix("./")
        for ins in instructions[:first_stage_end]
        if ins.keyword == "COPY"
        for src in ins.value.split()[:-1]
    }
    assert packages and packages <= copied, packages - copied


def test_runs_as_a_non_root_user() -> None:
    users = [i.value for i in _final_stage() if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_hub_is_offline_at_run_time_and_weights_are_baked_in() -> None:
    final = _final_stage()
    env = " ".join(i.value for i in final if i.keyword == "ENV")
    assert re.search(r"(^|\s)HF_HUB_OFFLINE=1(\s|$)", env)
    assert re.search(r"(^|\s)HF_HOME=/\S+", env)
    args = [i.value for i in final if i.keyword == "ARG"]
    assert any(a.startswith("MODEL=") for a in args)
    runs = [i for i in final if i.keyword == "RUN"]
    (bake,) = [r for r in runs if "create_model" in r.value]
    assert "pretrained=True" in bake.value and '"$MODEL"' in bake.value
    # The weights are fetched before the hub is switched off, and the switch is never undone.
    offline_at = min(i.line for i in final if i.keyword == "ENV" and "HF_HUB_OFFLINE=1" in i.value)
    assert bake.line < offline_at


def test_entrypoint_is_a_declared_console_script() -> None:
    (entrypoint,) = [i.value for i in _instructions() if i.keyword == "ENTRYPOINT"]
    assert entrypoint.startswith("["), "exec form, so SIGTERM reaches the consumer"
    command = entrypoint.strip("[]").split(",")[0].strip().strip('"')
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command == "bottleneck-consumer"
    assert command in scripts


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for ins in _instructions():
        if ins.keyword == "COPY" and "--from" not in ins.value:
            copied |= {src.rstrip("/").removeprefix("./") for src in ins.value.split()[:-1]}
    assert copied <= allowed, copied - allowed

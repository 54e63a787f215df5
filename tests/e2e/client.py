"""A small tandem.v1.Inference client for end-to-end tests, plus metric scraping."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import inference_pb2_grpc


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    messages: int = 0
    finals: list[pb.GenerateResponse] = field(default_factory=list)

    @property
    def final(self) -> pb.GenerateResponse:
        if len(self.finals) != 1:
            raise AssertionError(f"expected exactly one final message, got {len(self.finals)}")
        return self.finals[0]


def request(prompt: list[int], max_tokens: int, **fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tandem-tiny",
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        **fields,
    )


async def generate(
    stub: inference_pb2_grpc.InferenceStub,
    req: pb.GenerateRequest,
    timeout: float = 120.0,
    into: Completion | None = None,
) -> Completion:
    """Run one request to its end; ``into`` lets a caller watch the tokens arrive."""
    result = into if into is not None else Completion()
    async for msg in stub.Generate(req, timeout=timeout):
        result.tokens += msg.token_ids
        result.text += msg.text
        result.messages += 1
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            result.finals.append(msg)
    return result


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def metric(port: int, name: str) -> float:
    """The sum of a Prometheus metric's samples on a worker's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise AssertionError(f"metric {name} not exported on port {port}")
    return total


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


UP_KEY = re.compile(r"export TANDEM_API_KEY=(tdm_\S+)")
"""The admin key in `tandem up`'s "Tandem is up" line."""


def wait_up(process: subprocess.Popen, timeout_s: float = 180.0) -> str:
    """The "Tandem is up" line from a `tandem up` process's stdout (fails if it exits first)."""
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    for line in process.stdout:
        if "Tandem is up" in line:
            return line
        assert time.monotonic() < deadline, "tandem up did not come up in time"
    raise AssertionError(f"tandem up exited with {process.wait()} before it was up")

"""The committed gRPC stubs are current, and the API contract in them is the agreed one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.stubs import generate
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import inference_pb2_grpc as pb_grpc

INFERENCE_PROTO = Path("tandem/v1/inference.proto")
GENERATED = [
    "tandem/__init__.py",
    "tandem/v1/__init__.py",
    "tandem/v1/admin_pb2.py",
    "tandem/v1/admin_pb2.pyi",
    "tandem/v1/admin_pb2_grpc.py",
    "tandem/v1/inference_pb2.py",
    "tandem/v1/inference_pb2.pyi",
    "tandem/v1/inference_pb2_grpc.py",
    "tandem/v1/worker_pb2.py",
    "tandem/v1/worker_pb2.pyi",
    "tandem/v1/worker_pb2_grpc.py",
]


# --- staleness -------------------------------------------------------------------


def test_committed_stubs_are_current() -> None:
    stale = generate.stale_files()
    assert stale == [], f"stale stubs {stale}: run `python -m services.stubs.generate`"


def test_check_command_passes_on_committed_stubs(capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    """A private copy of protos/ to edit; the comparison must not depend on where it lies."""
    root = tmp_path / "protos"
    shutil.copytree(generate.PROTOS_ROOT, root)
    return root


def _edit(protos_root: Path, old: str, new: str) -> None:
    path = protos_root / INFERENCE_PROTO
    text = path.read_text()
    assert old in text, f"test edit no longer applies: {old!r} not in {INFERENCE_PROTO}"
    path.write_text(text.replace(old, new, 1))


def test_unchanged_copy_is_not_stale(protos_copy: Path) -> None:
    assert generate.stale_files(protos_copy) == []


def test_added_field_makes_stubs_stale(protos_copy: Path) -> None:
    _edit(protos_copy, "bool ignore_eos = 17;", "bool ignore_eos = 17;\n  bool echo = 18;")
    stale = generate.stale_files(protos_copy)
    assert "tandem/v1/inference_pb2.py" in stale
    assert "tandem/v1/inference_pb2.pyi" in stale


def test_rpc_comment_edit_makes_stubs_stale(protos_copy: Path) -> None:
    # RPC comments become the servicer's docstrings, so they are part of the output.
    _edit(protos_copy, "  // Lists the models", "  // Lists all the models")
    assert generate.stale_files(protos_copy) == ["tandem/v1/inference_pb2_grpc.py"]


def test_removed_proto_leaves_orphans_reported(protos_copy: Path) -> None:
    (protos_copy / INFERENCE_PROTO).with_name("extra.proto").write_text(
        'syntax = "proto3";\npackage tandem.v1;\nmessage Extra {}\n'
    )
    assert "tandem/v1/extra_pb2.py" in generate.stale_files(protos_copy)
    # The other direction: stubs generated from the copy hold a file protos/ lacks.
    stubs = protos_copy.parent / "stubs"
    generate.sync(protos_copy, stubs)
    assert "tandem/v1/extra_pb2.py" in generate.stale_files(stubs_root=stubs)


def test_generate_writes_the_expected_files(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == GENERATED


def test_sync_then_check_round_trip(protos_copy: Path) -> None:
    stubs = protos_copy.parent / "stubs"
    assert generate.sync(protos_copy, stubs) == GENERATED
    assert generate.sync(protos_copy, stubs) == []
    assert generate.stale_files(protos_copy, stubs) == []


def test_imports_are_anchored_under_services_stubs() -> None:
    for rel in GENERATED:
        text = (generate.STUBS_ROOT / rel).read_text()
        assert "from tandem" not in text and "import tandem" not in text, rel


# --- the contract ----------------------------------------------------------------


def test_package_is_tandem_v1() -> None:
    assert pb.DESCRIPTOR.package == "tandem.v1"
    assert pb.DESCRIPTOR.name == INFERENCE_PROTO.as_posix()


def _field(message: type[Message], name: str) -> FieldDescriptor:
    return message.DESCRIPTOR.fields_by_name[name]


@pytest.mark.parametrize(
    ("name", "type_", "repeated", "presence"),
    [
        ("model", "TYPE_STRING", False, False),
        ("prompt", "TYPE_STRING", False, False),
        ("prompt_token_ids", "TYPE_UINT32", True, False),
        ("messages", "TYPE_MESSAGE", True, False),
        ("max_tokens", "TYPE_INT32", False, True),
        ("min_tokens", "TYPE_INT32", False, True),
        ("temperature", "TYPE_FLOAT", False, True),
        ("top_p", "TYPE_FLOAT", False, True),
        ("top_k", "TYPE_INT32", False, True),
        ("seed", "TYPE_UINT64", False, True),
        ("stop", "TYPE_STRING", True, False),
        ("ignore_eos", "TYPE_BOOL", False, False),
        ("request_id", "TYPE_STRING", False, False),
    ],
)
def test_generate_request_fields(name: str, type_: str, repeated: bool, presence: bool) -> None:
    field = _field(pb.GenerateRequest, name)
    assert field.type == getattr(field, type_)
    assert field.is_repeated == repeated
    assert field.has_presence == presence


def test_generate_request_has_no_unexpected_fields() -> None:
    assert set(pb.GenerateRequest.DESCRIPTOR.fields_by_name) == {
        "model",
        "prompt",
        "prompt_token_ids",
        "messages",
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "ignore_eos",
        "request_id",
    }


def test_optional_fields_tell_unset_from_zero() -> None:
    request = pb.GenerateRequest(model="m", prompt="hi")
    assert not request.HasField("temperature")
    assert not request.HasField("max_tokens")
    # An explicit 0 is present: temperature 0 means greedy, max_tokens 0 is rejected,
    # whereas unset means the defaults (1.0 and 16).
    request.temperature = 0.0
    request.max_tokens = 0
    assert request.HasField("temperature") and request.temperature == 0.0
    assert request.HasField("max_tokens")
    request.ClearField("temperature")
    assert not request.HasField("temperature")


def test_max_tokens_is_signed_so_negatives_arrive_as_negatives() -> None:
    wire = pb.GenerateRequest(max_tokens=-1).SerializeToString()
    assert pb.GenerateRequest.FromString(wire).max_tokens == -1


def test_plain_fields_have_no_presence() -> None:
    with pytest.raises(ValueError):
        pb.GenerateRequest().HasField("ignore_eos")


def test_finish_reason_values() -> None:
    assert dict(pb.FinishReason.items()) == {
        "FINISH_REASON_UNSPECIFIED": 0,
        "FINISH_REASON_STOP": 1,
        "FINISH_REASON_LENGTH": 2,
        "FINISH_REASON_CANCELLED": 3,
        "FINISH_REASON_ERROR": 4,
    }


def test_generate_response_and_usage_fields() -> None:
    assert [f.name for f in pb.GenerateResponse.DESCRIPTOR.fields] == [
        "request_id",
        "token_ids",
        "text",
        "finish_reason",
        "usage",
        "serving",
    ]
    assert _field(pb.GenerateResponse, "token_ids").is_repeated
    assert [f.name for f in pb.Usage.DESCRIPTOR.fields] == [
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
    ]
    assert [f.name for f in pb.ModelCard.DESCRIPTOR.fields] == [
        "id",
        "max_context_length",
        "vocab_size",
    ]
    # usage is a message field: absent on every message but the last.
    assert not pb.GenerateResponse().HasField("usage")


def test_inference_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    assert service.full_name == "tandem.v1.Inference"
    methods = service.methods_by_name
    assert set(methods) == {"Generate", "ListModels"}
    assert methods["Generate"].server_streaming
    assert not methods["Generate"].client_streaming
    assert methods["Generate"].output_type.full_name == "tandem.v1.GenerateResponse"
    assert not methods["ListModels"].server_streaming
    assert not methods["ListModels"].client_streaming


class _EchoInference(pb_grpc.InferenceServicer):
    """Streams the prompt's token ids back one per message, then a final message."""

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        for token in request.prompt_token_ids:
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[token])
        yield pb.GenerateResponse(
            request_id=request.request_id,
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(completion_tokens=len(request.prompt_token_ids)),
        )


def test_stubs_serve_a_stream_over_a_real_channel() -> None:
    # The rewritten imports must give working client and server classes.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(_EchoInference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(model="m", prompt_token_ids=[5, 7], request_id="r1")
            responses = list(stub.Generate(request, timeout=10))
    finally:
        server.stop(grace=None)
    assert [list(r.token_ids) for r in responses] == [[5], [7], []]
    assert {r.request_id for r in responses} == {"r1"}
    assert [r.finish_reason for r in responses[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * 2
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 2

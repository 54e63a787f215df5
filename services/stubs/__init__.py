"""Python gRPC stubs for the protos under protos/ — generated, never edited by hand.

Regenerate after changing any .proto (and commit the result)::

    python -m services.stubs.generate

CI runs ``python -m services.stubs.generate --check`` (tests/stubs) and fails when
the committed stubs differ from what the protos generate. Every subdirectory here
is generated output (``tandem/v1/inference_pb2.py`` for ``protos/tandem/v1/inference.proto``);
import from it as an ordinary package::

    from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc
"""

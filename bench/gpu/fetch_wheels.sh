#!/usr/bin/env bash
# The cp312 wheels the GPU machine's image lacks, into .whl/ (git-ignored), for
#   bash bench/gpu/run_device_checks.sh
# run through the device tool with carry [".whl"]. Run here, from the repository root.
# The image (2026-11) has CUDA torch, transformers and grpcio 1.84 but not nixl or
# OpenTelemetry, and the generated health stubs want grpcio >= 1.85.1. nixl-cu13's
# nixl_ep_cu13/ extension (unused by Tandem, ~90 MB) is dropped to fit the 64 MiB the
# tool carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WHEELS=(
  nixl==1.5.1 nixl-cu13==1.5.1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-instrumentation==0.66b2
  opentelemetry-instrumentation-grpc==0.66b2 opentelemetry-semantic-conventions==0.66b2
  grpcio==1.85.3 grpcio-status==1.85.3 grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1 protobuf==7.36.2 googleapis-common-protos importlib-metadata
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
for wheel in .whl/nixl_cu13-*.whl; do
  zip -q -d "$wheel" 'nixl_ep_cu13/*' 2>/dev/null || true
done
du -sh .whl

#!/usr/bin/env bash
# A NIXL READ on the caller's thread against one through the agent thread (two hops), on
# one GPU in one call of the device tool, then the CUDA correctness checks:
#   bash bench/gpu/run_inline_pull_checks.sh   (JSONs in $OUT/results.tgz; OUT=/tmp/tandem-gpu)
# carry [".whl"] (bench/gpu/fetch_wheels.sh). Steps in order of what they decide, each with
# its own timeout, so a short lease still returns the transfer figures first.
set -uo pipefail
source bench/gpu/steps.sh

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, nixl, grpc; print('torch', torch.__version__, torch.cuda.get_device_name(), 'grpc', grpc.__version__)"

step "NIXL VRAM pull of a 2,048-token prompt: inline (nixl) vs threaded, beside a device memcpy"
timeout 90 python3 bench/kv_transfer/bench_transfer.py --device cuda --reps 30 \
  --json "$RES/kv_transfer_cuda_2048_1.json" 2>&1 | quiet | tail -18

step "prefill of that prompt (the denominator of the 10 % target)"
timeout 60 python3 bench/gpu/prefill_time.py --device cuda --tokens 2048 --reps 10 \
  --json "$RES/prefill_cuda.json"

step "where a pull spends its time (transport vs transport_threaded)"
timeout 60 python3 bench/kv_transfer/pull_overhead.py --device cuda --blocks 128 --reps 200 \
  --json "$RES/pull_overhead_cuda.json" 2>&1 | quiet

step "engine = transformers on CUDA"
TANDEM_TEST_DEVICE=cuda timeout 120 python3 -m pytest -p no:cacheprovider -q \
  tests/engine/test_engine_reference.py 2>&1 | tail -3

step "disaggregated serving on CUDA, KV in VRAM over NIXL (tests/e2e but the openai SDK's)"
TANDEM_E2E_DEVICE=cuda timeout 240 python3 -m pytest -p no:cacheprovider -q tests/e2e \
  --ignore=tests/e2e/test_tls_cluster.py --ignore=tests/e2e/test_up_gateway.py 2>&1 | tail -6

step "the 2,048-token pull again (a second sample of the same comparison)"
timeout 90 python3 bench/kv_transfer/bench_transfer.py --device cuda --reps 30 \
  --json "$RES/kv_transfer_cuda_2048_2.json" 2>&1 | quiet | tail -18

step "offline throughput on CUDA (against 1,111 / 1,131 output tok/s on 2026-11-27's H200)"
timeout 60 python3 -m services.cli.main bench throughput --model tandem-tiny \
  --num-prompts 64 --input-len 512 --output-len 128 --device cuda --dtype bfloat16 \
  --json "$RES/throughput_cuda.json" 2>&1 | tail -2

step "256 MiB pulls (32,768 tokens): the inline READ hands off after INLINE_WAIT_S"
timeout 150 python3 bench/kv_transfer/bench_transfer.py --device cuda --prompt-tokens 32768 \
  --reps 5 --json "$RES/kv_transfer_cuda_32768.json" 2>&1 | quiet | tail -18

step done

#!/usr/bin/env bash
# The two KV pool orders side by side on one GPU, in one call of the device tool:
#   bash bench/gpu/run_kv_layout_checks.sh   (JSONs in $OUT/results.tgz; OUT=/tmp/tandem-gpu)
# carry [".whl"] (bench/gpu/fetch_wheels.sh). Steps in order of what they decide, each
# with its own timeout, so a short lease still returns the transfer figures first.
set -uo pipefail
source bench/gpu/steps.sh
LAYOUTS=(layer-major slot-major)

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, nixl, grpc; print('torch', torch.__version__, torch.cuda.get_device_name(), 'grpc', grpc.__version__)"

step "NIXL VRAM pull of a 2,048-token prompt beside a device memcpy, each order"
for layout in "${LAYOUTS[@]}"; do
  timeout 90 python3 bench/kv_transfer/bench_transfer.py --device cuda --kv-layout "$layout" \
    --reps 20 --json "$RES/kv_transfer_cuda_2048_$layout.json" 2>&1 | quiet | tail -15
done

step "prefill of that prompt, each order (the denominator of the 10 % target)"
for layout in "${LAYOUTS[@]}"; do
  timeout 60 python3 bench/gpu/prefill_time.py --device cuda --tokens 2048 --reps 10 \
    --kv-layout "$layout" --json "$RES/prefill_cuda_$layout.json"
done

step "where a pull spends its time, each order"
for layout in "${LAYOUTS[@]}"; do
  timeout 60 python3 bench/kv_transfer/pull_overhead.py --device cuda --blocks 128 --reps 100 \
    --kv-layout "$layout" --json "$RES/pull_overhead_cuda_$layout.json" 2>&1 | quiet
done

step "engine = transformers on CUDA (both orders: llama-slot-major is one case)"
TANDEM_TEST_DEVICE=cuda timeout 120 python3 -m pytest -p no:cacheprovider -q \
  tests/engine/test_engine_reference.py 2>&1 | tail -3

step "disaggregated serving on CUDA, slot-major workers, KV in VRAM over NIXL"
TANDEM_E2E_DEVICE=cuda TANDEM_E2E_KV_LAYOUT=slot-major timeout 150 python3 -m pytest \
  -p no:cacheprovider -q -x tests/e2e/test_disaggregated.py 2>&1 | tail -3

step "offline throughput on CUDA, each order, alternating (twice when time allows)"
for rep in 1 2; do
  [ "$rep" = 2 ] && [ "$SECONDS" -gt 360 ] && break
  for layout in "${LAYOUTS[@]}"; do
    timeout 60 python3 -m services.cli.main bench throughput --model tandem-tiny \
      --num-prompts 64 --input-len 512 --output-len 128 --device cuda --dtype bfloat16 \
      --kv-layout "$layout" --json "$RES/throughput_cuda_${layout}_$rep.json" 2>&1 | tail -2
  done
done

step "256 MiB pulls (32,768 tokens), each order"
for layout in "${LAYOUTS[@]}"; do
  timeout 60 python3 bench/kv_transfer/bench_transfer.py --device cuda --kv-layout "$layout" \
    --prompt-tokens 32768 --reps 10 --json "$RES/kv_transfer_cuda_32768_$layout.json" 2>&1 \
    | quiet | tail -15
done

step done

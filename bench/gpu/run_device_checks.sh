#!/usr/bin/env bash
# Every check that needs a GPU, as one script for a lent GPU machine (the device tool):
#   bash bench/gpu/run_device_checks.sh      (results under $OUT, default /tmp/tandem-gpu)
# The machine's image has CUDA torch, transformers and grpcio but not nixl or
# OpenTelemetry: their wheels travel in .whl/ (see bench/gpu/README.md).
set -uo pipefail
OUT=${OUT:-/tmp/tandem-gpu}
mkdir -p "$OUT"
source bench/gpu/machine_env.sh
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, nixl, grpc; print('torch', torch.__version__, torch.cuda.get_device_name(), 'grpc', grpc.__version__)"

step NVML figures a worker heartbeats
python3 -c "from services.worker.gpu import GpuMonitor; print(GpuMonitor().read())"

step engine against transformers on CUDA
TANDEM_TEST_DEVICE=cuda timeout 180 python3 -m pytest -p no:cacheprovider -q -x \
  tests/engine/test_engine_reference.py 2>&1 | tail -4

step prefill time of a 2048-token prompt
timeout 120 python3 bench/gpu/prefill_time.py --device cuda --tokens 2048 --json "$OUT/prefill_cuda.json"

step NIXL VRAM transfer beside a device memcpy
timeout 150 python3 bench/kv_transfer/bench_transfer.py --device cuda --reps 20 \
  --json "$OUT/kv_transfer_cuda_2048.json" 2>&1 | tail -16
timeout 150 python3 bench/kv_transfer/bench_transfer.py --device cuda --prompt-tokens 32768 \
  --reps 10 --json "$OUT/kv_transfer_cuda_32768.json" 2>&1 | tail -16

step host-memory NIXL on this many-core host: one READ over 1, 2 and 4 agents
# (on the 2-core CPU machine two lanes lost to one through Tandem's pull; see
# bench/kv_transfer/README.md, sixth session)
nproc
timeout 60 python3 bench/kv_transfer/parallel_read.py --lanes 1 2 4 \
  --json "$OUT/parallel_read_cpu.json" 2>&1 | grep -v 'NIXL INFO'
timeout 120 python3 bench/kv_transfer/bench_transfer.py --device cpu --reps 20 \
  --json "$OUT/kv_transfer_cpu_2048.json" 2>&1 | tail -16

step where one NIXL VRAM READ spends its time, without Tandem around it
# main thread, a new thread, a new thread with the device current (Tandem's agent thread);
# then with a notification (what Tandem's READs carried until 2026-11-26: +0.9 ms)
for mode in main plain device-current; do
  timeout 60 python3 bench/kv_transfer/nixl_floor.py --device cuda --reader-thread $mode \
    --json "$OUT/nixl_floor_cuda_$mode.json" 2>&1 | grep -v 'NIXL INFO'
done
timeout 60 python3 bench/kv_transfer/nixl_floor.py --device cuda --notify 2>&1 | grep -v 'NIXL INFO'

step where a KVReader.pull spends its time above its READ, layer by layer
timeout 90 python3 bench/kv_transfer/pull_overhead.py --device cuda --blocks 128 \
  --json "$OUT/pull_overhead_cuda.json" 2>&1 | grep -v 'NIXL INFO'

step disaggregated serving end to end on CUDA, KV in VRAM over NIXL
TANDEM_E2E_DEVICE=cuda timeout 300 python3 -m pytest -p no:cacheprovider -q -x \
  tests/e2e/test_disaggregated.py 2>&1 | tail -6

step a full decode pool on the GPU: waiting for room against prefilling again
timeout 240 python3 bench/disagg/room_wait.py --device cuda --num-prompts 80 \
  --request-rate 20 --out "$OUT/room-wait" 2>&1 | tail -14

step throughput on CUDA against transformers
timeout 180 python3 -m services.cli.main bench throughput --model tandem-tiny --num-prompts 64 \
  --input-len 512 --output-len 128 --device cuda --dtype bfloat16 --baseline transformers \
  --json "$OUT/throughput_cuda.json" --plot "$OUT/throughput_cuda.png" 2>&1 | tail -8
step done

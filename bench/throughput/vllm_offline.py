"""vLLM's offline throughput on the same workload as `tandem bench throughput`.

Run with a Python that has vLLM's CPU build (it is not a Tandem dependency):

    /path/to/vllm-venv/bin/python bench/throughput/vllm_offline.py MODEL_DIR \
        --num-prompts 32 --input-len 512 --output-len 128 --json out.json

Prompts are random token ids from the same seeded generator Tandem's
benchmark uses (services/bench/workload.py), sent as token ids so lengths
cannot drift; greedy, ignore_eos, max_tokens = output length.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time


def prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(num)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="model directory (or Hugging Face id) for vLLM to load")
    p.add_argument(
        "--num-prompts", type=int, default=32, help="prompts to generate for (default 32)"
    )
    p.add_argument(
        "--input-len", type=int, default=512, help="prompt length in tokens (default 512)"
    )
    p.add_argument(
        "--output-len",
        type=int,
        default=128,
        help="tokens generated per prompt, EOS ignored (default 128)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random prompt token ids, as in tandem bench throughput (default 0)",
    )
    p.add_argument("--json", help="also write the result JSON to this file (default: stdout only)")
    args = p.parse_args()
    from vllm import LLM, SamplingParams, TokensPrompt

    # vLLM reserves gpu_memory_utilization of host memory for its KV cache on CPU.
    llm = LLM(
        model=args.model, dtype="bfloat16", max_model_len=2048, seed=0, gpu_memory_utilization=0.3
    )
    vocab = llm.get_tokenizer().vocab_size
    work = [
        TokensPrompt(prompt_token_ids=t)
        for t in prompts(args.num_prompts, args.input_len, vocab, args.seed)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7, 8])], params)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(work, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "engine": "vllm",
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "requests_s": len(outs) / wall,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

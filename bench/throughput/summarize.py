"""Summarise compare_vllm.sh's runs into results.md: output tok/s and ratios per run."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(out: Path) -> None:
    rows, ratios_vllm, ratios_hf = [], [], []
    for tandem_file in sorted(out.glob("tandem-run*.json")):
        run = tandem_file.stem.removeprefix("tandem-")
        t = json.loads(tandem_file.read_text())
        v = json.loads((out / f"vllm-{run}.json").read_text())
        tandem_tps = t["tandem"]["output_tokens_per_s"]
        hf_tps = t["baseline"]["output_tokens_per_s"]
        vllm_tps = v["output_tok_s"]
        ratios_vllm.append(tandem_tps / vllm_tps)
        ratios_hf.append(tandem_tps / hf_tps)
        rows.append(
            f"| {run} | {tandem_tps:.0f} | {vllm_tps:.0f} | {hf_tps:.0f} | "
            f"{tandem_tps / vllm_tps:.2f}x | {tandem_tps / hf_tps:.2f}x |"
        )
    text = "\n".join(
        [
            "| run | tandem tok/s | vLLM tok/s | transformers tok/s | tandem/vLLM | tandem/HF |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"median tandem/vLLM {statistics.median(ratios_vllm):.2f}x, "
            f"tandem/transformers {statistics.median(ratios_hf):.2f}x",
        ]
    )
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

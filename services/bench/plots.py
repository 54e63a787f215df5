"""Bar chart of output tokens/s: tandem beside its baseline."""

from __future__ import annotations

from pathlib import Path

from services.bench.throughput import ThroughputResult


def plot_output_throughput(result: ThroughputResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    runs = [f for f in (result.tandem, result.baseline) if f is not None]
    names = [f.name for f in runs]
    values = [f.output_tokens_per_s for f in runs]
    config = result.config
    fig, ax = plt.subplots(figsize=(5, 4))
    try:
        bars = ax.bar(names, values, color=["tab:blue", "tab:gray"][: len(runs)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel("output tokens/s")
        title = (
            f"{config.num_prompts} prompts x {config.input_len} in / {config.output_len} out"
            f"\n{result.dtype} on {result.device}"
        )
        if result.output_throughput_ratio is not None:
            title += f", tandem/{result.baseline.name} = {result.output_throughput_ratio:.2f}x"
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(values) * 1.15)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)

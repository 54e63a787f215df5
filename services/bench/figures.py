"""What one timed pass of a throughput run measured, and the rates derived from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figures:
    """Counts and wall time of one timed pass (tandem or a baseline)."""

    name: str
    """Who ran the pass: "tandem" or the baseline's name."""
    num_requests: int
    """Requests completed."""
    prompt_tokens: int
    """Prompt tokens processed, summed over requests."""
    output_tokens: int
    """Tokens generated, summed over requests (counted from the outputs, not assumed)."""
    wall_s: float
    """Seconds from submitting the first request to the last one finishing."""

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tokens_per_s(self) -> float:
        """Prompt plus output tokens per second."""
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    def rates(self) -> dict[str, float]:
        return {
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
        }

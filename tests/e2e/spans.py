"""Reading the spans a service's console trace exporter wrote into its log."""

from __future__ import annotations

import json
from pathlib import Path


def console_spans(log: Path) -> list[dict]:
    """The spans in ``log`` (one indented JSON object each among other log lines; the
    children run unbuffered, so a span is there once it ended)."""
    text = log.read_text(errors="replace")
    decoder, found = json.JSONDecoder(), []
    at = text.find("{\n")
    while at != -1:
        try:
            span, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            end = at + 1
        else:
            if isinstance(span, dict) and "context" in span:
                found.append(span)
        at = text.find("{\n", end)
    return found

"""ModelRunner's start: the model is built on meta and handed the checkpoint's tensors."""

from __future__ import annotations

import json
import subprocess
import sys

# A fresh interpreter: the test process may have loaded these modules for other tests.
START = """
import json, sys
from services.engine.engine import LLMEngine
model = LLMEngine("tandem-tiny").runner.model
tensors = [*model.parameters(), *model.buffers()]
print(json.dumps({
    "devices": sorted({t.device.type for t in tensors}),
    "rotary": model.rotary.cos.device.type,
    "loaded": [m for m in ("torch._dynamo", "sympy") if m in sys.modules],
}))
"""


def test_a_start_builds_nothing_on_meta_and_loads_no_compiler() -> None:
    """Any op on a meta tensor (random init, ``to_empty``) imports torch._dynamo and sympy:
    4 s of a worker's start on a slow CPU. None of it is needed to load weights."""
    done = subprocess.run(
        [sys.executable, "-c", START], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"devices": ["cpu"], "rotary": "cpu", "loaded": []}

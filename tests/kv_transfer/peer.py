"""A KVTransfer peer in its own process, for the two-process tests.

    python -m tests.kv_transfer.peer --num-blocks 64 --transport nixl --pin req-1=3,4,5,9

Fills its pool with ``helpers.pattern(num_blocks, seed)``, pins the given blocks under the
given request ids, serves KVTransfer on 127.0.0.1:PORT and prints one JSON line
(``PEER READY {"port": ..., "agent": ...}``). Exits when its stdin closes, so it never outlives the
test that started it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading

from services.kv_transfer.factory import make_transport
from services.kv_transfer.service import PinCheck, servicer
from services.rpc.server import start_server
from tests.kv_transfer.helpers import fill_pattern, layout_of, make_kv


def parse_pins(values: list[str]) -> dict[str, list[int]]:
    pins: dict[str, list[int]] = {}
    for v in values:
        rid, _, ids = v.partition("=")
        pins[rid] = [int(b) for b in ids.split(",") if b]
    return pins


async def serve(args: argparse.Namespace) -> None:
    kv = make_kv(args.num_blocks, args.block_size, args.layout)
    fill_pattern(kv, args.seed)
    transport = make_transport(args.transport, kv, args.worker_id)
    pins = parse_pins(args.pin)

    def pinned(request_id: str, block_ids: list[int]) -> PinCheck:
        return PinCheck.of(pins.get(request_id), block_ids)

    layout = layout_of(kv, args.model_id)
    server = await start_server(
        [servicer(layout, transport, pinned, args.worker_id)], port=args.port
    )
    payload = await transport.handshake_payload()
    info = {"port": server.port, "agent": payload.nixl_agent}
    print(f"PEER READY {json.dumps(info)}", flush=True)
    await server.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-blocks", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--transport", default="nixl")
    p.add_argument("--layout", default="slot-major")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model-id", default="tandem-tiny")
    p.add_argument("--worker-id", default="peer")
    p.add_argument("--pin", action="append", default=[], help="REQUEST_ID=ID,ID,...")
    args = p.parse_args()

    def exit_when_stdin_closes() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()

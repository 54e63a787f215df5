"""Moving KV-cache blocks between workers; shared by prefill and decode workers.

errors (what fails), layout (what must match, where a block's bytes lie), transport (the
interface and what a handshake tells), nixl_transport with agent_thread (NIXL READs),
grpc_transport (the KVTransfer.ReadBlocks byte stream), factory (pick one), service (the
KVTransfer server), client (handshake and pull by address).
"""

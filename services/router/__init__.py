"""The router: worker registry, placement policies and the Generate flow.

Workers register and heartbeat here (tandem.v1.Registry); clients (through the
gateway) call tandem.v1.Inference here. For each request the router validates
and tokenizes the prompt, picks a prefill and a decode worker, runs the
two-step exchange and relays the stream, resuming elsewhere when a worker dies.

Nothing in this package imports torch: the router loads tokenizers, never models.

Modules, in the order a request meets them: ``config`` (RouterConfig),
``registry`` (who serves what, and how loaded), ``policies`` (which worker),
``admission`` (validate and tokenize), ``progress`` (what the client has
received; resumed requests), ``orchestrator`` (the Generate flow),
``channels`` (one gRPC channel per worker), ``service`` and ``server``.

What a worker must do to be routed to:

- Register (tandem.v1.Registry/Register) with worker_id (unique, stable across
  restarts), role, address (host:port of its PrefillWorker or DecodeWorker
  service), model (the name clients use), layout (model_id and block_size must
  equal those of every other worker of that model), max_context_length and
  vocab_size. Then Heartbeat every RegisterResponse.heartbeat_interval_ms with
  its WorkerLoad; on NOT_FOUND, register again. Silence longer than the
  router's timeout (3 intervals by default) removes it, and cancels its calls.
- Prefill receives PrefillRequest{request with prompt_token_ids set and prompt
  empty, request_id "<client id>#<n>" unique per attempt, sampling fields as
  the client set them; lease_ms}. It returns first_token_id, first_text,
  cached_tokens and either kv (KVHandle: worker_id, address, request_id,
  block_ids, num_tokens) or a finish_reason when the first token ends it.
- Decode receives DecodeRequest{the same request, first_token_id and kv from
  the prefill (both unset in aggregated mode), kv_timeout_ms}. It streams
  GenerateResponse messages that never repeat first_token_id, then one final
  message (STOP or LENGTH) with usage and ServingInfo: kv_transfer_bytes,
  kv_blocks_reused, and kv_transport ("nixl"/"grpc" when it used the
  prefill's KV, "" when it prefilled locally; the router then reports no
  prefill worker). The router sets request_id, usage, worker ids and retries.
- Failing: UNAVAILABLE (or a CANCELLED final message, when shutting down)
  makes the router resume the request elsewhere over prompt + tokens sent,
  with max_tokens and min_tokens reduced, and so does NOT_FOUND (the worker
  serves another model: a stale registration's address); any other status is
  the client's.
  A cancelled call must free the request's blocks.
"""

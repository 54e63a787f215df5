"""gRPC plumbing every Tandem service shares: server start/stop, status mapping."""

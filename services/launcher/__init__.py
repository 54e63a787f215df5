"""Start Tandem's services as local processes (``tandem up`` and end-to-end tests)."""

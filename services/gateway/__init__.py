"""The policy gateway: Tandem's public door (identity, authorization, limits, metering)."""

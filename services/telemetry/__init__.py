"""Tracing and metrics shared by every service."""

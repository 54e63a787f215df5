"""The e2e fixtures (private model cache, offline reference engine) serve these tests too."""

from tests.e2e.conftest import reference_engine, tandem_home

__all__ = ["reference_engine", "tandem_home"]

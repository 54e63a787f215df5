"""Which callers may use which models, read from a TOML policy file.

The rule (see deploy/policy.example.toml, which documents the format): a caller
may use a model when one of its roles or teams is listed for the model, or it
holds the admin role; an API key is also limited to the models it was minted
for. Unlisted models are admin-only: a typo in the file denies, never allows.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.engine.errors import TandemError


class PolicyError(TandemError, ValueError):
    """The policy file is missing or malformed; the message names the entry."""

    grpc_code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class Caller:
    """What authorization needs to know about an authenticated caller."""

    roles: frozenset[str] = frozenset()
    teams: frozenset[str] = frozenset()
    key_models: frozenset[str] | None = None
    """For an API key, the models it was minted for; None for a token."""


@dataclass(frozen=True)
class ModelRule:
    roles: frozenset[str] = frozenset()
    """Roles that may use the model."""
    teams: frozenset[str] = frozenset()
    """Teams that may use the model."""


@dataclass(frozen=True)
class Policy:
    admin_role: str
    """Holders of this role may use every model and call the Admin service."""
    models: Mapping[str, ModelRule] = field(default_factory=dict)
    limits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Default limits per scope ("key", "user", "team"): field name → value."""

    def is_admin(self, caller: Caller) -> bool:
        return self.admin_role in caller.roles

    def allows(self, caller: Caller, model: str) -> bool:
        """May ``caller`` use ``model``? Side-effect free."""
        if caller.key_models is not None and model not in caller.key_models:
            return False
        if self.is_admin(caller):
            return True
        rule = self.models.get(model)
        if rule is None:
            return False
        return bool(rule.roles & caller.roles or rule.teams & caller.teams)

    def visible_models(self, caller: Caller, served: Iterable[str]) -> list[str]:
        """The served models ``caller`` may use, in the order given."""
        return [m for m in served if self.allows(caller, m)]


LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month")
SCOPES = ("key", "user", "team")


def load_policy(path: Path) -> Policy:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"policy file {path} is not valid TOML: {e}") from None
    return parse_policy(raw, str(path))


def parse_policy(raw: Mapping[str, Any], source: str = "policy") -> Policy:
    admin = raw.get("admin_role")
    if not isinstance(admin, str) or not admin:
        raise PolicyError(f"{source}: admin_role must be a non-empty string")
    models = {name: _rule(name, entry, source) for name, entry in raw.get("models", {}).items()}
    limits = {
        scope: _limits(scope, entry, source) for scope, entry in raw.get("limits", {}).items()
    }
    return Policy(admin, models, limits)


def _rule(name: str, entry: Any, source: str) -> ModelRule:
    if not isinstance(entry, dict):
        raise PolicyError(f"{source}: models.{name} must be a table")
    unknown = set(entry) - {"roles", "teams"}
    if unknown:
        raise PolicyError(f"{source}: models.{name} has unknown keys {sorted(unknown)}")
    return ModelRule(
        roles=_names(entry.get("roles", []), f"models.{name}.roles", source),
        teams=_names(entry.get("teams", []), f"models.{name}.teams", source),
    )


def _limits(scope: str, entry: Any, source: str) -> Mapping[str, int]:
    if scope not in SCOPES:
        raise PolicyError(f"{source}: limits.{scope}: scope must be one of {SCOPES}")
    if not isinstance(entry, dict):
        raise PolicyError(f"{source}: limits.{scope} must be a table")
    out = {}
    for name, value in entry.items():
        if name not in LIMIT_FIELDS:
            raise PolicyError(f"{source}: limits.{scope}.{name}: expected one of {LIMIT_FIELDS}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PolicyError(f"{source}: limits.{scope}.{name} must be a positive integer")
        out[name] = value
    return out


def _names(value: Any, where: str, source: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{source}: {where} must be a list of non-empty strings")
    return frozenset(value)

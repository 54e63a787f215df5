"""The policy file: who may use which model."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.policy import Caller, PolicyError, load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "policy.example.toml"


def test_the_example_policy_loads_and_means_what_it_says() -> None:
    policy = load_policy(EXAMPLE)
    user = Caller(roles=frozenset({"tandem-user"}))
    researcher = Caller(teams=frozenset({"ml-research"}))
    outsider = Caller(roles=frozenset({"viewer"}), teams=frozenset({"sales"}))
    admin = Caller(roles=frozenset({"tandem-admin"}))
    served = ["tandem-tiny", "llama-3.1-8b-instruct", "unlisted"]
    assert policy.visible_models(user, served) == ["tandem-tiny"]
    assert policy.visible_models(researcher, served) == ["tandem-tiny", "llama-3.1-8b-instruct"]
    assert policy.visible_models(outsider, served) == []
    assert policy.visible_models(admin, served) == served  # unlisted: admins only
    assert policy.limits["team"]["tokens_per_day"] == 5_000_000


def test_an_api_key_is_limited_to_its_models_even_for_admins() -> None:
    policy = load_policy(EXAMPLE)
    key = Caller(teams=frozenset({"ml-research"}), key_models=frozenset({"tandem-tiny"}))
    assert policy.allows(key, "tandem-tiny")
    assert not policy.allows(key, "llama-3.1-8b-instruct")
    admin_key = Caller(roles=frozenset({"tandem-admin"}), key_models=frozenset())
    assert not policy.allows(admin_key, "tandem-tiny")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({}, "admin_role"),
        ({"admin_role": "a", "models": {"m": {"roles": "x"}}}, "models.m.roles"),
        ({"admin_role": "a", "models": {"m": {"groups": []}}}, "unknown keys"),
        ({"admin_role": "a", "limits": {"org": {}}}, "limits.org"),
        ({"admin_role": "a", "limits": {"team": {"tokens_per_week": 5}}}, "tokens_per_week"),
        ({"admin_role": "a", "limits": {"team": {"tokens_per_day": 0}}}, "positive integer"),
    ],
)
def test_malformed_policies_are_refused_naming_the_entry(raw: dict, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        parse_policy(raw)


def test_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("admin_role = ")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(bad)

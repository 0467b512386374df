"""Policy registry: names, module paths, entry points, and config errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

import policies
from policies.base import UnknownPolicyError
from router.errors import ConfigError

BUILT_INS = {"round_robin", "random", "pow2", "least_load", "ray_prefix", "sglang", "dynamo",
             "llmd", "preble", "session", "cache_aware"}


def test_every_built_in_policy_is_registered():
    assert BUILT_INS <= set(policies.available())


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownPolicyError) as exc:
        policies.get("sglangg")
    assert "sglang" in str(exc.value) and "cache_aware" in str(exc.value)


def test_unknown_option_and_wrong_type_name_the_field():
    with pytest.raises(ConfigError) as exc:
        policies.get("sglang", cache_treshold=0.4)
    assert exc.value.field == "sglang.cache_treshold"
    with pytest.raises(ConfigError) as exc:
        policies.get("sglang", balance_abs_threshold=1.5)
    assert exc.value.field == "sglang.balance_abs_threshold"
    with pytest.raises(ConfigError) as exc:
        policies.get("sglang", cache_threshold=True)
    assert exc.value.field == "sglang.cache_threshold"


def _write_package(root, name):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from policies import Policy, PolicyConfig

        class FirstListed(Policy):
            \"\"\"Always the first candidate.\"\"\"

            @dataclass(frozen=True, slots=True)
            class Config(PolicyConfig):
                skip: int = 0

            def rank(self, request, view):
                return [[view.replicas[self.config.skip % len(view.replicas)]]]
    """))
    return pkg


def test_module_path_loads_a_third_party_policy(tmp_path, monkeypatch):
    _write_package(tmp_path, "thirdparty_path_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = policies.get("thirdparty_path_pkg:FirstListed", skip=1)
    assert policy.config.skip == 1
    with pytest.raises(ConfigError):
        policies.get("thirdparty_path_pkg:FirstListed", skip="one")
    with pytest.raises(UnknownPolicyError):
        policies.get("thirdparty_path_pkg:Missing")


def test_entry_point_group_registers_a_policy(tmp_path, monkeypatch):
    _write_package(tmp_path, "thirdparty_ep_pkg")
    dist = tmp_path / "thirdparty_ep_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-ep-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvroute.policies]\nfirst_listed = thirdparty_ep_pkg:FirstListed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "first_listed" in policies.available()
        policy = policies.get("first_listed")
        assert policy.name == "first_listed"
    finally:
        from policies import base
        base._REGISTRY.pop("first_listed", None)
        sys.modules.pop("thirdparty_ep_pkg", None)


def test_a_broken_plug_in_is_named_when_asked_for_and_breaks_nothing_else(tmp_path, monkeypatch):
    (tmp_path / "broken_ep_pkg.py").write_text("raise RuntimeError('half-installed')\n")
    (tmp_path / "wrong_ep_pkg.py").write_text("NotAPolicy = 42\n")
    dist = tmp_path / "broken_ep_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-ep-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvroute.policies]\nbroken = broken_ep_pkg:Policy\n"
                                           "not_a_policy = wrong_ep_pkg:NotAPolicy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from policies import base
    try:
        assert "broken" not in policies.available() and "cache_aware" in policies.available()
        assert policies.get("round_robin").name == "round_robin"
        with pytest.raises(ConfigError, match="half-installed") as exc:
            policies.get("broken")
        assert exc.value.field == "policy"
        with pytest.raises(ConfigError, match="not a Policy subclass"):
            policies.get("not_a_policy")
        # A module path whose import fails (not with ImportError) is named too.
        with pytest.raises(ConfigError, match="RuntimeError: half-installed"):
            policies.get("broken_ep_pkg:Policy")
    finally:
        base._BROKEN.pop("broken", None)
        base._BROKEN.pop("not_a_policy", None)
        sys.modules.pop("broken_ep_pkg", None)

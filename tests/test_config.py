"""Config loading (unit, no network) and the check-config command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import ConfigError, Settings, load_settings, redacted, settings_from_dict
from gateway.testing.harness import deep_merge, gateway_config, install_test_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "tollway.yaml"
DEMO_KEY = "sk-tw-demo-key"


def base() -> dict[str, Any]:
    return gateway_config("http://127.0.0.1:9/v1")


def error_of(data: Any) -> str:
    with pytest.raises(ConfigError) as ei:
        settings_from_dict(data)
    return str(ei.value)


def test_test_config_is_valid() -> None:
    s = settings_from_dict(base())
    assert isinstance(s, Settings)
    assert s.providers["azure"].api_base == "http://127.0.0.1:9"
    assert s.providers["up"].api_key is not None
    assert s.providers["up"].api_key.get_secret_value() == install_test_env().upstream


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"bogus": 1}, "bogus"),
        ({"server": {"bogus": 1}}, "server.bogus"),
        ({"providers": {"up": {"bogus": 1}}}, "providers.up.bogus"),
        ({"providers": {"up": {"timeouts": {"bogus": 1}}}}, "providers.up.timeouts.bogus"),
        ({"auth": {"bogus": True}}, "auth.bogus"),
        ({"models": {"gpt-test": {"bogus": 1}}}, "models.gpt-test.bogus"),
        ({"logging": {"bogus": 1}}, "logging.bogus"),
    ],
)
def test_unknown_key_names_its_path(overrides: dict[str, Any], path: str) -> None:
    msg = error_of(deep_merge(base(), overrides))
    assert f"{path}: unknown key" in msg, msg


def test_unknown_key_in_list_item_names_its_path() -> None:
    data = base()
    data["models"]["gpt-test"]["deployments"][0]["bogus"] = 1
    msg = error_of(data)
    assert "models.gpt-test.deployments.0.bogus" in msg, msg


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    data = deep_merge(base(), {"providers": {"up": {"bogus": 1}}})
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as ei:
        load_settings(f)
    assert "providers.up.bogus" in str(ei.value)
    assert str(f) in str(ei.value)


@pytest.mark.parametrize(
    "where",
    [
        ("providers", "up", "api_key"),
        ("auth", "keys", 0, "key"),
    ],
)
def test_literal_secret_rejected(where: tuple[Any, ...]) -> None:
    data = base()
    node: Any = data
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = "sk-literal-secret-value-1234"
    msg = error_of(data)
    assert ".".join(str(p) for p in where) in msg, msg
    assert "sk-literal-secret-value-1234" not in msg
    assert "environment" in msg.lower()


def test_secret_with_text_around_reference_rejected() -> None:
    data = deep_merge(base(), {"providers": {"up": {"api_key": "Bearer ${TOLLWAY_TEST_KEY_A}"}}})
    assert "providers.up.api_key" in error_of(data)


def test_missing_env_var_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_TEST_SURELY_UNSET", raising=False)
    data = deep_merge(base(), {"providers": {"up": {"api_key": "${TOLLWAY_TEST_SURELY_UNSET}"}}})
    msg = error_of(data)
    assert "TOLLWAY_TEST_SURELY_UNSET" in msg
    assert "providers.up.api_key" in msg


def test_missing_env_var_in_plain_field_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_TEST_NO_BASE", raising=False)
    data = deep_merge(base(), {"providers": {"up": {"api_base": "${TOLLWAY_TEST_NO_BASE}"}}})
    assert "TOLLWAY_TEST_NO_BASE" in error_of(data)


def test_env_default_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_TEST_SURELY_UNSET", raising=False)
    data = deep_merge(
        base(), {"providers": {"up": {"api_key": "${TOLLWAY_TEST_SURELY_UNSET:-sk-fallback-1}"}}}
    )
    s = settings_from_dict(data)
    key = s.providers["up"].api_key
    assert key is not None and key.get_secret_value() == "sk-fallback-1"


def test_auth_keys_mode_without_keys_rejected() -> None:
    data = base()
    del data["admin"]
    data["auth"] = {"mode": "keys", "keys": []}
    assert "auth" in error_of(data)
    data["auth"] = {"mode": "keys"}
    assert "auth" in error_of(data)
    # With an admin key, keys can be created through the admin API: that is a valid config.
    data = base()
    data["auth"] = {"mode": "keys", "keys": []}
    settings_from_dict(data)


def test_auth_none_must_be_explicit() -> None:
    data = base()
    del data["auth"]
    assert "auth" in error_of(data)
    data["auth"] = {"mode": "none"}
    assert settings_from_dict(data).auth.mode == "none"


def test_deployment_unknown_provider_rejected() -> None:
    data = deep_merge(base(), {"models": {"x": {"deployments": [{"provider": "nope", "model": "m"}]}}})
    msg = error_of(data)
    assert "nope" in msg and "models.x" in msg


def test_azure_needs_api_version() -> None:
    data = deep_merge(base(), {"providers": {"azure": {"api_version": None}}})
    assert "api_version" in error_of(data)


def test_redacted_hides_every_secret() -> None:
    keys = install_test_env()
    dumped = yaml.safe_dump(redacted(settings_from_dict(base())))
    for secret in (keys.team_a, keys.team_b, keys.upstream, keys.azure, keys.openai):
        assert secret not in dumped


def _check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_config_cli_redacts() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOLLWAY_DEMO_KEY"}
    proc = _check_config(EXAMPLE, env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert DEMO_KEY not in out
    printed = yaml.safe_load(proc.stdout)
    assert set(printed["models"]) == {"gpt-4o-mini", "text-embedding-3-small"}
    assert printed["auth"]["keys"][0]["key"] != DEMO_KEY
    assert "*" in printed["auth"]["keys"][0]["key"]


def test_check_config_cli_redacts_env_value() -> None:
    env = {**os.environ, "TOLLWAY_DEMO_KEY": "sk-from-env-very-secret-99"}
    proc = _check_config(EXAMPLE, env)
    assert proc.returncode == 0, proc.stderr
    assert "sk-from-env-very-secret-99" not in proc.stdout + proc.stderr


def test_check_config_cli_bad_config(tmp_path: Path) -> None:
    data = deep_merge(base(), {"providers": {"up": {"bogus": 1}}})
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    proc = _check_config(f, dict(os.environ))
    assert proc.returncode != 0
    assert "providers.up.bogus" in proc.stderr
    assert "Traceback" not in proc.stderr

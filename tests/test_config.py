"""Config loading (unit, no network) and the check-config command."""

from __future__ import annotations

import os
import re
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


# ---- check-config runs the checks create_app makes (not only the settings' own) ------------------


def _write(tmp_path: Path, data: dict[str, Any], name: str = "c.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(data))
    return f


def test_check_config_cli_unpriced_model(tmp_path: Path) -> None:
    data = base()
    data["models"]["gpt-test"].pop("price")
    data["models"]["gpt-test"]["deployments"][0]["model"] = "no-such-model-anyone-prices-7"
    store_path = Path(data["store"]["path"])
    proc = _check_config(_write(tmp_path, data), dict(os.environ))
    assert proc.returncode != 0, proc.stdout
    assert "models without a price: models.gpt-test" in proc.stderr, proc.stderr
    assert "price: {free: true}" in proc.stderr  # says how to fix it
    assert "config OK" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not store_path.exists()  # the store was not opened
    # and the app refuses it the same way (what `serve` would hit)
    from gateway.app import create_app

    with pytest.raises(ConfigError, match="models without a price"):
        create_app(settings_from_dict(data))


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        ([{"name": "access"}, {"name": "no_such_plugin"}], "unknown built-in plugin 'no_such_plugin'"),
        ([{"name": "metrics"}], "the access plugin"),
        ([{"name": "exact_cache"}, {"name": "access"}], "exact_cache must come after access"),
        ([{"name": "access"}, {"name": "semantic_cache"}, {"name": "exact_cache"}],
         "semantic_cache must come after exact_cache"),
        ([{"name": "access"}, {"path": "no_such_module_tw:Plugin"}],
         "cannot load 'no_such_module_tw:Plugin'"),
        ([{"name": "access"}, {"path": "gateway.pipeline"}], "must look like 'package.module:Class'"),
        ([{"name": "access"}, {"path": "gateway.settings:Settings"}], "is not a gateway.pipeline.Plugin"),
        ([{"name": "access"}, {"path": "gateway.plugins.metrics:MetricsPlugin", "options": {"bogus": 1}}],
         "plugins.1.options"),
    ],
)
def test_check_config_cli_plugin_errors(tmp_path: Path, plugins: list[Any], message: str) -> None:
    data = {**base(), "plugins": plugins}
    settings_from_dict(data)  # valid as settings: only the app-level checks catch it
    proc = _check_config(_write(tmp_path, data), dict(os.environ))
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_config_accepts_what_the_app_accepts(tmp_path: Path) -> None:
    data = {**base(), "plugins": [{"name": "metrics"}, {"name": "auth"}, {"name": "exact_cache"}]}
    proc = _check_config(_write(tmp_path, data), dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stderr


# ---- redaction of values that can hold secrets but are not Secret fields --------------------------


def test_redacted_hides_webhook_plugin_options_and_url_credentials() -> None:
    data = deep_merge(
        base(),
        {
            "budgets": {"alerts": {"webhook_url": "https://hooks.example.com/services/T0K3N-webhook-77"}},
            "providers": {
                "up": {"api_base": "https://apiuser:api-pass-s3cret-55@llm.example.com:8443/v1"},
                "oai": {"api_base": "https://tok-only-user-66@llm2.example.com/v1"},
            },
            "store": {"backend": "redis", "url": "redis://:redis-pass-s3cret-44@127.0.0.1:6379/0",
                      "path": None},
        },
    )
    data["plugins"] = [
        {"name": "metrics"},
        {"name": "access"},
        {"path": "mypkg.plugins:Thing", "options": {"token": "opt-s3cret-33", "nested": {"k": "opt-n-22"},
                                                      "n": 5}},
    ]
    out = redacted(settings_from_dict(data))
    dumped = yaml.safe_dump(out)
    for secret in ("T0K3N-webhook-77", "api-pass-s3cret-55", "tok-only-user-66", "redis-pass-s3cret-44",
                   "opt-s3cret-33", "opt-n-22"):
        assert secret not in dumped, secret
    # what is not secret stays readable
    assert out["budgets"]["alerts"]["webhook_url"].startswith("https://hooks.example.com/")
    assert out["providers"]["up"]["api_base"] == "https://apiuser:**********@llm.example.com:8443/v1"
    assert out["providers"]["oai"]["api_base"] == "https://**********@llm2.example.com/v1"
    assert out["providers"]["azure"]["api_base"] == "http://127.0.0.1:9"
    assert out["store"]["url"] == "redis://:**********@127.0.0.1:6379/0"
    assert set(out["plugins"][2]["options"]) == {"token", "nested", "n"}
    assert all(v == "**********" for v in out["plugins"][2]["options"].values())
    assert out["plugins"][2]["path"] == "mypkg.plugins:Thing"


def test_redacted_leaves_unset_and_plain_values() -> None:
    out = redacted(settings_from_dict(base()))
    assert out["budgets"]["alerts"]["webhook_url"] is None
    assert out["providers"]["up"]["api_base"] == "http://127.0.0.1:9/v1"


# ---- the README's config reference is a valid config -----------------------------------------------


def _readme_config_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match is not None, "no ```yaml block in the README's Configuration section"
    return match.group(1)


def test_readme_config_reference_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    block = _readme_config_block()
    for name in set(re.findall(r"\$\{(\w+)", block)):
        monkeypatch.setenv(name, f"sk-readme-{name.lower()}-0001")
    f = tmp_path / "readme.yaml"
    f.write_text(block, encoding="utf-8")
    settings = load_settings(f)  # as `tollway serve` reads a file: YAML parsing, then settings_from_dict
    # the keys the reference must document
    gpt = settings.models["gpt-4o-mini"]
    assert gpt.owned_by == "openai"
    assert gpt.retry is not None
    assert [f.model for f in gpt.fallbacks] == ["claude-sonnet"]
    assert gpt.fallbacks[0].on == ["rate_limit", "server_error", "timeout", "unavailable"]
    # and what `serve` checks on top (prices, plugins): what check-config runs
    from gateway.app import check_config

    prices = check_config(settings)
    assert set(prices) == set(settings.models)

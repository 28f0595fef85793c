"""`${ENV}` references in config strings: `${NAME}` and `${NAME:-default}`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, SecretStr

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_WHOLE_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}$")


def _expand(value: str, environ: Mapping[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set")

    return _ENV_REF.sub(repl, value)


def _env_str(value: Any) -> Any:
    if isinstance(value, str):
        return _expand(value, os.environ)
    return value


def _secret_ref(value: Any) -> Any:
    """Secrets must be written as `${ENV_VAR}` (optionally `${ENV_VAR:-default}`), never inline."""
    if isinstance(value, SecretStr):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string of the form ${ENV_VAR}")
    if not _WHOLE_REF.match(value):
        raise ValueError("secrets must be environment references such as ${OPENAI_API_KEY}, not literals")
    return SecretStr(_expand(value, os.environ))


EnvStr = Annotated[str, BeforeValidator(_env_str)]
Secret = Annotated[SecretStr, BeforeValidator(_secret_ref)]

"""Typed, strict model of the Tollway config file; `${ENV}` references resolved at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.envref import EnvStr, Secret
from gateway.store.settings import StoreSettings


class ConfigError(Exception):
    """The config file cannot be loaded; the message names the bad key's path."""




class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(Strict):
    host: EnvStr = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    keepalive_timeout_s: float = Field(75.0, gt=0)
    shutdown_timeout_s: float = Field(30.0, ge=0)
    stream_keepalive_s: float = Field(15.0, gt=0)
    """Send an SSE comment this often while a streaming upstream is silent."""
    loop_lag_interval_s: float = Field(0.02, ge=0, le=10)
    """Sample the event loop's lag this often (metric tollway_event_loop_lag_seconds); 0: off."""


class Timeouts(Strict):
    connect_s: float = Field(5.0, gt=0)
    read_s: float = Field(120.0, gt=0)
    """Idle read: the longest gap allowed between two upstream reads."""
    first_byte_s: float | None = Field(None, gt=0)
    """Time to first byte, from sending the request: a non-streaming answer's headers and the
    start of its body; a stream's first content (OpenAI: its first `data:` event; Anthropic: its
    first content block — `message_start` and `ping` do not count, so pings cannot keep a stream
    that never starts alive). A timeout is a retryable 504. None: `read_s`."""
    total_s: float = Field(600.0, gt=0)
    """Whole non-streaming request; streams are bounded by the first-byte and idle read timeouts."""

    @property
    def first_byte(self) -> float:
        """The effective time-to-first-byte limit in seconds."""
        return self.read_s if self.first_byte_s is None else self.first_byte_s


class MockSettings(Strict):
    ttft_ms: float = Field(0.0, ge=0)
    tokens_per_s: float = Field(0.0, ge=0)
    """0 means as fast as possible."""
    reply_tokens: int = Field(16, ge=1, le=100_000)
    embedding_dims: int = Field(16, ge=1, le=8192)


ProviderKind = Literal["openai", "openai_compatible", "azure", "anthropic", "mock"]


class ProviderSettings(Strict):
    kind: ProviderKind
    api_base: EnvStr | None = None
    api_key: Secret | None = None
    headers: dict[str, EnvStr] = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_connections: int = Field(0, ge=0)
    """0: unlimited pooled connections to this provider."""
    # openai_compatible: how the key is sent
    auth_header: str = "Authorization"
    auth_scheme: str | None = "Bearer"
    supports_base64_embeddings: bool = True
    """False: ask the upstream for floats and encode base64 in the gateway."""
    output_cap_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    """The field a chat completion carries the gateway's own output cap in (the model's
    `max_output_tokens`, added when the client sent no cap). Default: `max_completion_tokens`
    for kinds openai and azure (OpenAI's reasoning models reject `max_tokens`), `max_tokens`
    otherwise (most OpenAI-compatible servers know only that). A cap the client sent itself is
    sent as the client wrote it; legacy completions always use `max_tokens`."""

    @property
    def cap_field(self) -> str:
        if self.output_cap_field is not None:
            return self.output_cap_field
        return "max_completion_tokens" if self.kind in ("openai", "azure") else "max_tokens"
    # azure
    api_version: EnvStr | None = None
    # anthropic
    anthropic_version: str = "2023-06-01"
    """Pinned: under 2026-10-21 Anthropic rejects temperature/top_p/top_k (wire-format §8.1)."""
    default_max_tokens: int = Field(4096, ge=1)
    """Anthropic requires max_tokens; used when the request has none."""
    # provider-wide account quota, enforced across replicas (0: none)
    rpm: int = Field(0, ge=0)
    tpm: int = Field(0, ge=0)
    max_queue_s: float = Field(2.0, ge=0)
    """How long a request may wait for this provider's quota before failing over or failing."""
    # mock
    mock: MockSettings = Field(default_factory=MockSettings)

    @model_validator(mode="after")
    def _check_kind(self) -> ProviderSettings:
        if self.kind in ("openai", "openai_compatible", "azure", "anthropic") and not self.api_base:
            if self.kind == "openai":
                object.__setattr__(self, "api_base", "https://api.openai.com/v1")
            elif self.kind == "anthropic":
                object.__setattr__(self, "api_base", "https://api.anthropic.com")
            else:
                raise ValueError(f"api_base is required for kind {self.kind}")
        if self.kind == "azure" and not self.api_version:
            raise ValueError("api_version is required for kind azure (e.g. 2024-10-21)")
        if self.kind in ("openai", "anthropic") and self.api_key is None:
            raise ValueError(f"api_key is required for kind {self.kind}")
        if self.api_base is not None:
            object.__setattr__(self, "api_base", self.api_base.rstrip("/"))
        return self


class DeploymentSettings(Strict):
    provider: str
    model: str
    """The model name the upstream knows (for azure: the deployment name)."""
    weight: float = Field(1.0, gt=0)
    rpm: int = Field(0, ge=0)
    """Requests per minute this deployment may receive, across replicas (0: no limit)."""
    tpm: int = Field(0, ge=0)
    max_concurrency: int = Field(0, ge=0)
    """In-flight requests per gateway process (0: no limit)."""
    timeouts: Timeouts | None = None
    """Overrides the provider's timeouts for this deployment."""


FallbackOn = Literal["rate_limit", "server_error", "timeout", "unavailable", "context_length"]
_DEFAULT_FALLBACK_ON: tuple[FallbackOn, ...] = ("rate_limit", "server_error", "timeout", "unavailable")


class FallbackSettings(Strict):
    model: str
    on: list[FallbackOn] = Field(default_factory=lambda: list(_DEFAULT_FALLBACK_ON))
    """Which failures of the model lead here: `context_length` sends too-long prompts to a
    larger-context model; the others fire when every deployment failed or is open."""

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        """YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean True: take it as `on`."""
        if isinstance(data, dict) and True in data:
            data = dict(data)
            value = data.pop(True)
            if "on" in data:
                raise ValueError("`on` is given twice")
            data["on"] = value
        return data


class RetrySettings(Strict):
    max_attempts: int = Field(3, ge=1, le=20)
    """Upstream attempts per request, across deployments and fallbacks."""
    backoff_base_s: float = Field(0.1, gt=0)
    backoff_max_s: float = Field(2.0, gt=0)
    max_retry_after_s: float = Field(10.0, ge=0)
    """A longer retry-after from the upstream makes the router fail over instead of waiting."""
    deadline_s: float = Field(120.0, gt=0)
    """Overall time for all attempts (streams: until their first byte)."""


class BreakerSettings(Strict):
    window_s: float = Field(30.0, gt=0)
    min_requests: int = Field(10, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    consecutive_failures: int = Field(5, ge=1)
    open_s: float = Field(15.0, gt=0)
    """How long an open breaker rejects before letting one probe through."""


class RoutingSettings(Strict):
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    ewma_alpha: float = Field(0.3, gt=0, le=1)
    """Weight of the newest sample in the time-to-first-token average (lowest_latency)."""


ApiEndpoint = Literal["chat", "completions", "embeddings"]
_ALL_ENDPOINTS: tuple[ApiEndpoint, ...] = ("chat", "completions", "embeddings")


class PriceSettings(Strict):
    """USD per million tokens; overrides genai-prices. `free: true` for models that cost nothing."""

    input_per_mtok: float | None = Field(None, ge=0)
    output_per_mtok: float | None = Field(None, ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)
    cache_write_per_mtok: float | None = Field(None, ge=0)
    """Prompt tokens written to the provider's prompt cache (Anthropic); default: the input price."""
    free: bool = False

    @model_validator(mode="after")
    def _check(self) -> PriceSettings:
        if not self.free and self.input_per_mtok is None:
            raise ValueError("give input_per_mtok (and output_per_mtok), or free: true")
        return self


class ModelCacheSettings(Strict):
    """Per-model exact-cache overrides (`models.NAME.cache`); unset fields follow `cache:`."""

    enabled: bool | None = None
    """None: follow `cache.enabled`; False never caches this model; True caches it even when
    the cache is disabled by default."""
    ttl_s: float | None = Field(None, gt=0)
    """Lifetime of this model's entries (None: `cache.default_ttl_s`)."""
    allow_temperature: bool = False
    """Cache requests that sample (temperature > 0, or no temperature: the API default is 1)."""
    allow_n: bool = False
    """Cache requests asking for several choices (n > 1)."""
    allow_tools: bool = False
    """Cache requests that offer tools (their answers may be tool calls with side effects)."""
    semantic: bool | None = None
    """None/True: the semantic cache (when its plugin is listed) serves this model; False: exact only."""
    semantic_threshold: float | None = Field(None, gt=0, le=1)
    """Cosine similarity a semantic hit needs for this model (None: `cache.semantic.threshold`)."""


class SemanticCacheSettings(Strict):
    """The semantic cache (plugin `semantic_cache`, opt-in: list it after `exact_cache`)."""

    threshold: float = Field(0.85, gt=0, le=1)
    """Default cosine similarity of the last user messages for a hit (per model: `semantic_threshold`)."""
    index_dir: str | None = None
    """Where the index is saved at shutdown and loaded at start (None: in memory only)."""
    max_entries: int = Field(100_000, ge=1)
    """Entries per gateway process; past it, new answers are not added to the index."""
    candidates: int = Field(4, ge=1, le=64)
    """Nearest neighbours checked against the guards per lookup."""
    sync_interval_s: float = Field(0.5, gt=0)
    """On Redis: how often a replica adds the entries other replicas indexed to its own index."""
    search_threads: int = Field(1, ge=1, le=64)
    """FAISS (OpenMP) threads per search. 1 keeps a core for the event loop; FAISS's default (one per
    core) costs several times the CPU per lookup on a small machine."""


class CacheSettings(Strict):
    """The exact response cache (plugin `exact_cache`).

    Entries live in the store, partitioned per team: a team only ever reads its own answers,
    unless `shared_partition` puts every team in one partition (only for gateways whose teams
    may see each other's answers)."""

    enabled: bool = True
    default_ttl_s: float = Field(3600.0, gt=0)
    shared_partition: bool = False
    max_entry_bytes: int = Field(1024 * 1024, ge=1024)
    """Responses larger than this (as stored JSON) are not cached."""
    coalesce_wait_s: float = Field(30.0, ge=0)
    """How long identical in-flight misses wait for the first one's answer before calling the
    upstream themselves (0: no coalescing)."""
    semantic: SemanticCacheSettings = Field(default_factory=SemanticCacheSettings)


class ModelSettings(Strict):
    cache: ModelCacheSettings = Field(default_factory=ModelCacheSettings)
    deployments: list[DeploymentSettings] = Field(min_length=1)
    owned_by: str = "tollway"
    price: PriceSettings | None = None
    """None: looked up in genai-prices by the deployments' model names; startup fails if unknown."""
    max_output_tokens: int = Field(4096, ge=1)
    """Reservation cap when the client sends no max_tokens; then also sent upstream as max_tokens."""
    strategy: Literal["weighted", "least_inflight", "lowest_latency"] = "weighted"
    fallbacks: list[FallbackSettings] = Field(default_factory=list)
    retry: RetrySettings | None = None
    """Overrides routing.retry for this model."""
    endpoints: list[ApiEndpoint] = Field(default_factory=lambda: list(_ALL_ENDPOINTS))


class ClientKey(Strict):
    """A key declared in config; seeded into the store at startup (never overwritten there)."""

    key: Secret
    team: str = Field(min_length=1)
    name: str | None = None


class AuthSettings(Strict):
    mode: Literal["keys", "none"] = "keys"
    """`none` must be written explicitly: the gateway is never open by accident."""
    keys: list[ClientKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> AuthSettings:
        seen: set[str] = set()
        for k in self.keys:
            raw = k.key.get_secret_value()
            if len(raw) < 8:
                raise ValueError("client keys must be at least 8 characters")
            if raw in seen:
                raise ValueError("duplicate client key")
            seen.add(raw)
        return self


class AdminSettings(Strict):
    key: Secret | None = None
    """Bearer key for /admin; without it the admin API answers 403 to everyone."""


class AlertSettings(Strict):
    thresholds: list[float] = Field(default_factory=lambda: [0.8])
    """Fractions of a budget at which to warn, once per period each."""
    webhook_url: EnvStr | None = None
    check_interval_s: float = Field(5.0, gt=0)

    @field_validator("thresholds")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < t <= 1 for t in v):
            raise ValueError("thresholds are fractions in (0, 1]")
        return sorted(v)


class BudgetSettings(Strict):
    lease_ttl_s: float = Field(900.0, gt=0)
    """How long a reservation holds budget if its request never settles (a crash)."""
    on_store_failure: Literal["closed", "open"] = "closed"
    """Store unreachable: `closed` rejects with 503; `open` admits keys seen recently."""
    rate_limit_on_store_failure: Literal["closed", "open"] = "open"
    cache_hit_cost_fraction: float = Field(0.0, ge=0, le=1)
    alerts: AlertSettings = Field(default_factory=AlertSettings)


class MetricsSettings(Strict):
    enabled: bool = True


class LoggingSettings(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False
    log_prompts: bool = False
    """Prompt and completion text are never logged unless this is true."""


class PluginRef(Strict):
    name: str | None = None
    """A built-in plugin name (auth, metrics)…"""
    path: str | None = None
    """…or an external plugin as `module:Class`."""
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one(self) -> PluginRef:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of name or path")
        return self


class Settings(Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings
    providers: dict[str, ProviderSettings] = Field(min_length=1)
    models: dict[str, ModelSettings] = Field(min_length=1)
    plugins: list[PluginRef] = Field(
        default_factory=lambda: [
            PluginRef(name="metrics"), PluginRef(name="access"), PluginRef(name="exact_cache")
        ]
    )
    """Order matters: exact_cache after access, so cache hits still pass auth, limits and budgets."""
    cache: CacheSettings = Field(default_factory=CacheSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name in v:
            if not name.strip():
                raise ValueError("model names cannot be empty")
        return v

    @model_validator(mode="after")
    def _refs(self) -> Settings:
        if self.auth.mode == "keys" and not self.auth.keys and self.admin.key is None:
            raise ValueError(
                "auth.mode is 'keys' but there are no keys in auth.keys and no admin.key to create "
                "them with (say auth.mode: none to run open)"
            )
        for mname, m in self.models.items():
            for i, f in enumerate(m.fallbacks):
                if f.model not in self.models or f.model == mname:
                    raise ValueError(f"models.{mname}.fallbacks.{i}.model: unknown model {f.model!r}")
            for i, d in enumerate(m.deployments):
                if d.provider not in self.providers:
                    raise ValueError(
                        f"models.{mname}.deployments.{i}.provider: unknown provider {d.provider!r}"
                    )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def settings_from_dict(data: Any, source: str = "<dict>") -> Settings:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_settings(path: str | Path) -> Settings:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {p}: {e}") from None
    return settings_from_dict(data, str(p))


_HIDDEN = "**********"


def _hide_userinfo(url: str | None) -> str | None:
    """`url` with a password (or a bare user part, which may be a token) replaced by _HIDDEN."""
    if not url:
        return url
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:{_HIDDEN}" if colon else _HIDDEN
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret hidden, and every value that may hold one:
    provider header values, credentials in URLs, the alert webhook's path (its token), every
    plugin option."""
    data = settings.model_dump(mode="json")
    for p in data.get("providers", {}).values():
        p["headers"] = {k: _HIDDEN for k in p.get("headers", {})}
        p["api_base"] = _hide_userinfo(p.get("api_base"))
    data["store"]["url"] = _hide_userinfo(data["store"]["url"])
    alerts = data["budgets"]["alerts"]
    if alerts.get("webhook_url"):
        hook = urlsplit(alerts["webhook_url"])
        host = hook.netloc.rpartition("@")[2]
        alerts["webhook_url"] = f"{hook.scheme}://{host}/{_HIDDEN}" if hook.scheme and host else _HIDDEN
    for ref in data.get("plugins", []):
        ref["options"] = {k: _HIDDEN for k in ref.get("options") or {}}
    return data

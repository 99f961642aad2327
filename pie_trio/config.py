"""Server configuration: one dataclass, filled from defaults < a TOML file < environment < flags.

Every field carries its own help text and parser, so the TOML keys, the `PIE_TRIO_*` environment
variables and the `pie-trio serve` flags are all generated from this one list and cannot drift
apart. A TOML file uses the field names as top-level keys (`http_port = 8080`); the environment
uses `PIE_TRIO_<FIELD>` (`PIE_TRIO_HTTP_PORT=8080`); flags use `--http-port 8080`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "PIE_TRIO_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the setting."""


# ---------------------------------------------------------------------------------------------
# Value parsers: each accepts the TOML value or the environment/flag string.


def parse_size(value: Any) -> int:
    """Bytes from an int or a string with an optional unit: 512, "64KiB", "2 GB", "1.5GiB"."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)\s*", str(value), re.I)
    if not match:
        raise ConfigError(f"expected a size like 512MiB, got {value!r}")
    number, unit = float(match.group(1)), match.group(2).lower().rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(number * scale)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected true/false, got {value!r}")


def parse_port(value: Any) -> int | None:
    """A TCP port; 0 picks a free one, "off" (or -1) disables the listener."""
    if value is None or str(value).strip().lower() in ("off", "none", "-1"):
        return None
    port = int(value)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} out of range 0..65535")
    return port


def parse_api_keys(value: Any) -> dict[str, str]:
    """Tenant → API key, from a TOML table or "tenant:key,tenant:key"."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list | tuple):
        pairs = [_split_key(str(item)) for item in value]
    else:
        pairs = [_split_key(item) for item in str(value).split(",") if item.strip()]
    keys: dict[str, str] = {}
    for tenant, key in pairs:
        if not str(tenant) or not str(key):
            raise ConfigError("an API key entry needs a tenant name and a key")
        keys[str(tenant)] = str(key)
    return keys


def parse_names(value: Any) -> list[str]:
    """A list of names, from a TOML list or "alice,bob"."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _split_key(item: str) -> tuple[str, str]:
    tenant, sep, key = item.strip().partition(":")
    if not sep:
        raise ConfigError(f"API key entries are TENANT:KEY, got {item!r}")
    return tenant, key


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_or_none(value: Any) -> Any:
        if value is None or str(value).strip().lower() in ("", "none", "auto"):
            return None
        return parse(value)

    return parse_or_none


def _positive(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`kind` (int, float or parse_size), refusing zero and negative values."""
    def parse_positive(value: Any) -> Any:
        number = kind(value)
        if not number > 0:
            raise ConfigError(f"expected a positive value, got {value!r}")
        return number

    return parse_positive


def _fraction(value: Any) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ConfigError(f"expected a fraction in (0, 1], got {value!r}")
    return number


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse_choice(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse_choice


def setting(default: Any, help: str, parse: Callable[[Any], Any] = str, **kw: Any) -> Any:
    """A dataclass field with its help text and parser attached as metadata."""
    meta = {"help": help, "parse": parse, **kw}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Everything `pie-trio serve` needs to know; see docs/server.md for the full story."""

    host: str = setting("127.0.0.1", "address to listen on (HTTP, WebSocket and TCP)")
    http_port: int = setting(8080, "HTTP + WebSocket port (0 picks a free port)", parse_port,
                             aliases=("--port",))  # as vLLM, SGLang and llama-server spell it
    tcp_port: int | None = setting(
        8081, "msgpack-over-TCP port (0 picks a free port, 'off' disables)", parse_port
    )
    model: str = setting(
        "default", "model: 'default' (SmolLM2-135M-Instruct), a .gguf file or a HF directory"
    )
    device: str | None = setting(None, "torch device (default: cuda when present, else cpu)",
                                 _optional(str))
    dtype: str | None = setting(None, "weight dtype: bfloat16, float16, float32 (default: auto)",
                                _optional(str))
    weights: str = setting(
        "auto", "projection weights: int4 (a GGUF's Q4_0/Q4_1 blocks, CPU), bf16, fp32 or auto "
        "(int4 on CPU for such files unless a dtype is given)",
        _choice("auto", "int4", "bf16", "fp32"))
    kv_memory: int | None = setting(
        None, "bytes for the paged KV cache, e.g. 512MiB (default: auto)", _optional(parse_size))
    model_process: bool = setting(
        False, "run the model in a process of its own, so that its Python does not hold the "
        "GIL the inferlets' threads need (docs/model.md, 'Model in its own process')",
        parse_bool)
    server_nice: int | None = setting(
        None, "niceness added to the server's threads once the model runs in a process of its "
        "own (default 19 there, 0 otherwise): the runtime's work then uses the CPU a forward "
        "leaves idle instead of stalling it (docs/model.md, 'Model in its own process')",
        _optional(int))
    page_size: int = setting(16, "tokens per KV page", int)
    tensor_parallel: int = setting(
        1, "split the model over N worker processes (torch.distributed: NCCL on CUDA, one GPU "
        "each; gloo on the CPU); its KV heads and MLP columns must divide by N (docs/model.md, "
        "'Tensor parallelism')", _positive(int))
    kv_policy: str = setting(
        "preempt", "when KV pages run out: preempt (the newest instances' pages wait in host "
        "memory while older ones go on) or refuse (the allocation fails at once)",
        _choice("preempt", "refuse"))
    prefix_caching: bool = setting(
        True, "keep the KV of prompts' full pages by content hash for later requests with the "
        "same start (the OpenAI API path; docs/control.md, 'Automatic prefix caching')",
        parse_bool)
    batch_policy: str = setting("adaptive", "when a forward batch fires: adaptive, k, t, kort",
                                _choice("adaptive", "k", "t", "kort"))
    max_instances: int = setting(256, "most inferlet instances running at once (all tenants)", int)
    instance_memory: int = setting("256MiB", "linear memory limit of one inferlet", parse_size)
    instance_cpu_time: float = setting(
        2.0, "seconds of CPU an inferlet may use without calling the host (stops spin loops)",
        float)
    instance_wall_time: float = setting(
        600.0, "seconds an inferlet may run from launch to end", float)
    # -- hostile input: the runtime's limits (docs/runtime.md, "Hostile input: limits") -----
    instance_cpu_total: float | None = setting(
        60.0, "seconds of CPU an inferlet may use in all, host work for it included "
        "('none': no limit)", _optional(float))
    instance_host_call_share: float = setting(
        0.1, "fraction of wall time an inferlet may spend in host calls that do not wait "
        "(past it, it sleeps: the GIL is shared)", float)
    instance_host_call_total_share: float = setting(
        0.25, "the same fraction for all inferlets past their own share together", float)
    instance_outstanding_bytes: int = setting(
        "64MiB", "host memory an inferlet's submitted requests and responses not yet taken may "
        "hold (estimated)", parse_size)
    instance_inbox_bytes: int = setting(
        "16MiB", "client messages delivered to an inferlet and not yet received", parse_size)
    instance_topic_bytes: int = setting(
        "16MiB", "an inferlet's pub/sub subscriptions and the broadcasts buffered for it",
        parse_size)
    program_max_functions: int = setting(
        20_000, "most functions an uploaded module may define", int)
    program_max_code_size: int = setting(
        "8MiB", "largest code section an uploaded module may have", parse_size)
    program_compile_timeout: float = setting(
        30.0, "seconds compiling one module may take", float)
    program_compile_memory: int = setting(
        "1GiB", "memory compiling one module may use (its compiler process)", parse_size)
    program_compile_workers: int = setting(2, "modules compiled at once", int)
    program_store_programs: int = setting(1024, "most programs stored", int)
    program_store_bytes: int = setting(
        "1GiB", "most bytes of programs stored (modules and compiled code)", parse_size)
    program_max_loaded: int = setting(
        64, "programs kept compiled in memory besides those running", int)
    tenant_programs: int = setting(128, "most programs one tenant may have stored", int)
    tenant_program_bytes: int = setting(
        "256MiB", "most bytes of programs one tenant may have stored", parse_size)
    auth: bool | None = setting(
        None, "require an API key (default: on exactly when api_keys are configured)",
        _optional(parse_bool))
    api_keys: dict[str, str] = setting(
        {}, "API keys as TENANT:KEY (repeat the flag, or comma-separate in the environment)",
        parse_api_keys, repeat=True, flag="--api-key")
    # -- hostile input: what one client or tenant may hold (docs/server.md, "Hostile input") --
    public_health: bool = setting(
        True, "answer GET /health without an API key when auth is on", parse_bool)
    public_metrics: bool = setting(
        False, "answer GET /metrics without an API key when auth is on", parse_bool)
    operators: list[str] = setting(
        [], "tenants that may remove any tenant's KV exports, comma-separated", parse_names)
    max_connections: int = setting(
        1024, "most WebSocket + TCP client connections at once", _positive(int))
    max_connections_per_peer: int = setting(
        64, "most WebSocket + TCP client connections from one IP address", _positive(int))
    auth_timeout: float = setting(
        10.0, "seconds a connection may stay unauthenticated when auth is on", _positive(float))
    frame_timeout: float = setting(
        30.0, "seconds one client message may take to arrive once it has begun", _positive(float))
    send_timeout: float = setting(
        60.0, "seconds a client may take to accept one write before it is disconnected",
        _positive(float))
    outbox_size: int = setting(
        "8MiB", "bytes of responses and events queued for one connection before its "
        "instances wait", _positive(parse_size))
    upload_buffer_per_session: int = setting(
        "128MiB", "bytes of unfinished uploads one connection may hold", _positive(parse_size))
    upload_buffer_total: int = setting(
        "256MiB", "bytes of unfinished uploads all connections together may hold",
        _positive(parse_size))
    max_instances_per_tenant: int = setting(
        64, "most instances one tenant may run at once (every front-end together)", _positive(int))
    tenant_kv_share: float | None = setting(
        None, "fraction of the KV pages one tenant may hold (default: 0.5 when several "
        "tenants have API keys, else 1)", _optional(_fraction))
    max_persistent_exports: int = setting(
        64, "most persistent KV exports one tenant may own", _positive(int))
    max_chat_messages: int = setting(
        1024, "most messages in one chat completion request", _positive(int))
    # -- tool I/O: outbound HTTP from inferlets (docs/agents.md, "The tool policy") ---------
    tool_io: bool = setting(
        False, "let inferlets make HTTP requests (the http_request op) to tool_allow hosts",
        parse_bool)
    tool_allow: list[str] = setting(
        [], "hosts inferlets may reach, comma-separated: HOST[:PORT], *.DOMAIN[:PORT] or "
        "ADDRESS[/BITS][:PORT] ([v6]:PORT); loopback only when listed as an address",
        parse_names)
    tool_timeout: float = setting(
        30.0, "seconds one tool HTTP request may take, redirects included", _positive(float))
    tool_max_response_size: int = setting(
        "1MiB", "largest tool HTTP response body", _positive(parse_size))
    tool_max_concurrent: int = setting(
        16, "most tool HTTP requests one inferlet may have in flight", _positive(int))
    tool_max_redirects: int = setting(
        5, "most redirects one tool HTTP request follows (each re-checked)", int)
    program_cache_dir: str | None = setting(
        None, "directory for uploaded programs and compiled modules (default: memory only)",
        _optional(str))
    max_upload_size: int = setting("64MiB", "largest program a client may upload", parse_size)
    max_frame_size: int = setting(
        "4MiB", "largest client message (WebSocket message or TCP frame)", parse_size)
    log_level: str = setting("info", "debug, info, warning or error",
                             _choice("debug", "info", "warning", "error"))
    log_format: str = setting("text", "text (key=value) or json", _choice("text", "json"))

    def __post_init__(self) -> None:
        # Defaults written in their readable form ("256MiB") are parsed like any other value.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and f.metadata["parse"] is not str:
                setattr(self, f.name, _parse(f, value))

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) if self.auth is None else self.auth

    def validate(self) -> Config:
        if self.auth_enabled and not self.api_keys:
            raise ConfigError("auth is on but no api_keys are configured")
        if self.page_size <= 0:
            raise ConfigError("page_size must be positive")
        if self.max_frame_size < 512 * 1024:
            raise ConfigError("max_frame_size must be at least 512KiB (upload chunks are "
                              "256 KiB)")
        if self.max_instances <= 0:
            raise ConfigError("max_instances must be positive")
        if self.instance_cpu_time <= 0 or self.instance_wall_time <= 0:
            raise ConfigError("instance_cpu_time and instance_wall_time must be positive")
        return self

    # -- sources --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Config:
        """Defaults, then the TOML file at `path`, then `PIE_TRIO_*` variables, then overrides."""
        config = cls()
        if path:
            config = config.merged(read_toml(path), source=path)
        config = config.merged(from_env(os.environ if env is None else env), source="environment")
        if overrides:
            config = config.merged(overrides, source="flags")
        return config.validate()

    def merged(self, values: Mapping[str, Any], source: str) -> Config:
        """A copy with `values` (raw, unparsed) applied; unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"{source}: unknown setting {key!r}; known: {', '.join(fields)}")
            changes[name] = _parse(fields[name], raw, source)
        return dataclasses.replace(self, **changes)


def _parse(f: dataclasses.Field[Any], raw: Any, source: str = "default") -> Any:
    try:
        return f.metadata["parse"](raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: bad value for {f.name}: {exc}") from None


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def from_env(env: Mapping[str, str]) -> dict[str, str]:
    names = {f.name for f in dataclasses.fields(Config)}
    values = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in names:
            values[key[len(ENV_PREFIX):].lower()] = value
    return values


def settings() -> list[dataclasses.Field[Any]]:
    """The fields of Config, for generating flags and docs."""
    return list(dataclasses.fields(Config))

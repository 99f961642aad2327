"""`serve`: the whole server in one trio nursery.

    model runner ─ stack (executor ─ controller ─ runtime) ─┬─ hypercorn (HTTP, /ws)
                                                            └─ TCP listener

Start-up goes bottom-up: the stack (`pie_trio/stack.py`), then the front ends on it. Shutdown
(SIGTERM/SIGINT, or the `shutdown` event) drains: stop accepting, end every instance (reason
`evicted`) and let each client see its `terminated` event, close WebSockets with 1001, stop
hypercorn, then leave the stack, which stops its layers top-down.
"""

from __future__ import annotations

import gc
import logging
import signal
from dataclasses import dataclass
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from pie_trio.config import Config, ConfigError
from pie_trio.server.app import App
from pie_trio.server.openai_api import PROGRAM as OPENAI_PROGRAM
from pie_trio.server.state import ServerState
from pie_trio.server.tcp import serve_tcp
from pie_trio.server.websocket import HypercornConfig
from pie_trio.server.websocket import install as install_websocket_guard
from pie_trio.stack import (
    SERVER_NICE,
    ControlLimits,
    ExportPolicy,
    InstanceLimits,
    ProgramLimits,
    ProgramStore,
    ServedRunner,
    Stack,
    Tenancy,
    ToolPolicy,
    close_runner,
    load_runner,
    open_stack,
    yield_cpu_to_model,
)

log = logging.getLogger("pie_trio.server")

DRAIN_TIMEOUT = 5.0  # seconds for instances to end and clients to hear about it
HTTP_GRACE = 2.0  # then seconds for hypercorn's remaining HTTP connections to finish
APP_QUEUE = 2  # inbound messages hypercorn queues per connection while the app is busy


@dataclass(frozen=True)
class Addresses:
    """Where a started server listens (ports resolved when the config asked for port 0)."""

    host: str
    http_port: int
    tcp_port: int | None

    @property
    def http(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def ws(self) -> str:
        return f"ws://{_url_host(self.host)}:{self.http_port}/ws"

    @property
    def tcp(self) -> str | None:
        return None if self.tcp_port is None else f"tcp://{_url_host(self.host)}:{self.tcp_port}"


def load_configured_runner(config: Config) -> ServedRunner:
    """The configured model (`tiny`, undocumented, is the random-weight test model), split
    over `config.tensor_parallel` worker processes when that is above 1."""
    return load_runner(config.model, device=config.device, dtype=config.dtype,
                       kv_memory=config.kv_memory, page_size=config.page_size,
                       weights=config.weights, model_process=config.model_process,
                       tensor_parallel=config.tensor_parallel)


def _yield_cpu(config: Config) -> None:
    """With the model in a process of its own, lower this process's priority below it."""
    apart = config.model_process and config.tensor_parallel == 1
    increment = config.server_nice
    if increment is None:
        increment = SERVER_NICE if apart else 0
    if increment > 0 and not apart:
        log.warning("server_nice applies only with model_process (one model process): a "
                    "lowered thread holding the GIL would stall the forward here; not applied")
    elif increment > 0:
        nice = yield_cpu_to_model(increment)
        log.info("server threads at niceness %s, the model's process at its own", nice)


async def serve(config: Config, *, runner: ServedRunner | None = None,
                shutdown: trio.Event | None = None, handle_signals: bool = True,
                task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a server until SIGTERM/SIGINT (when `handle_signals`) or until `shutdown` is set.

    `runner` lets a caller share an already loaded model (tests); otherwise the configured
    model is loaded in a worker thread. Reports the listening `Addresses` through task_status.
    """
    shutdown = trio.Event() if shutdown is None else shutdown
    async with trio.open_nursery() as everything:
        if handle_signals:  # first, so that a signal while the model loads is handled too
            everything.start_soon(_set_on_signal, shutdown, everything.cancel_scope)
        loaded = runner is None
        if runner is None:
            log.info("loading model=%s", config.model)
            runner = await trio.to_thread.run_sync(load_configured_runner, config,
                                                   abandon_on_cancel=True)
            # What is alive now (model, tokenizer, modules) lives until exit: keep the cyclic
            # GC's full passes from walking it; each would otherwise stall every instance for
            # ~0.3 s.
            gc.collect()
            gc.freeze()
            _yield_cpu(config)
        try:
            await _serve_components(config, runner, shutdown, task_status)
        finally:
            if loaded:  # a model process stops last, once the stack has let go of it
                close_runner(runner)
        everything.cancel_scope.cancel()
    log.info("stopped")


async def _serve_components(config: Config, runner: ServedRunner, shutdown: trio.Event,
                            task_status: trio.TaskStatus[Addresses]) -> None:
    """The front ends on the stack; leaving the stack stops the runtime first (its instances
    release their pages through a controller and an executor that are still running)."""
    async with open_stack(
            runner, programs=_program_store(config), instance_limits=_limits(config),
            max_instances=config.max_instances,
            max_instances_per_owner=config.max_instances_per_tenant, policy=config.batch_policy,
            control_limits=ControlLimits(topic_bytes=config.instance_topic_bytes,
                                         kv_policy=config.kv_policy,
                                         prefix_cache=config.prefix_caching),
            tenancy=_tenancy(config, runner.info.num_pages),
            tools=tool_policy(config)) as stack:
        state = ServerState(config, stack.runtime, runner.info, runner.tokenizer,
                            stats=lambda: _component_stats(stack))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_prepare_builtin, stack.runtime.programs)
            await _serve_front_ends(state, shutdown, task_status)
            nursery.cancel_scope.cancel()


async def _serve_front_ends(state: ServerState, shutdown: trio.Event,
                            task_status: trio.TaskStatus[Addresses]) -> None:
    config = state.config
    http_stop = trio.Event()
    async with trio.open_nursery() as front_ends:
        binds = await front_ends.start(
            lambda task_status: hypercorn.trio.serve(
                App(state), _hypercorn_config(config), shutdown_trigger=http_stop.wait,
                task_status=task_status))
        tcp_port = None
        if config.tcp_port is not None:
            tcp_port = await front_ends.start(serve_tcp, state, config.host, config.tcp_port)
        addresses = Addresses(config.host, _port_of(binds[0]), tcp_port)
        log.info("listening http=%s ws=%s tcp=%s model=%s", addresses.http, addresses.ws,
                 addresses.tcp or "off", state.model_info.name)
        task_status.started(addresses)
        await shutdown.wait()
        log.info("draining instances=%d sessions=%d", len(state.running), len(state.sessions))
        await state.drain(DRAIN_TIMEOUT)
        # Sessions close themselves once their instances have reported their end; give them
        # the time to flush, then stop hypercorn (which waits HTTP_GRACE for the rest).
        await state.wait_sessions_closed(DRAIN_TIMEOUT)
        http_stop.set()


async def _prepare_builtin(programs: ProgramStore) -> None:
    """Compile the OpenAI API's inferlet in the background, so the first request does not
    wait for it (a request arriving sooner waits on the store's lock, then finds it ready)."""
    if OPENAI_PROGRAM in programs.builtins:
        await trio.to_thread.run_sync(programs.get, OPENAI_PROGRAM)
    else:
        log.warning("builtin=%s missing: the OpenAI API will answer 500", OPENAI_PROGRAM)


async def _set_on_signal(shutdown: trio.Event, everything: trio.CancelScope) -> None:
    """The first SIGTERM/SIGINT drains gracefully; a second one stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if shutdown.is_set():
                log.warning("signal=%s again: stopping without draining", name)
                everything.cancel()
            else:
                log.info("signal=%s: draining", name)
                shutdown.set()


def _tenancy(config: Config, pages_total: int) -> Tenancy:
    """What one tenant may hold in the control layer (docs/server.md, "Hostile input"); the
    stack tells it each instance's tenant (the server launches every instance for its tenant)."""
    share = config.tenant_kv_share
    if share is None:  # the quota protects tenants from each other: one alone uses everything
        share = 0.5 if config.auth_enabled and len(config.api_keys) > 1 else 1.0
    quota = None if share >= 1.0 else max(1, int(pages_total * share))
    return Tenancy(page_quota=quota, exports=ExportPolicy(
        max_persistent=config.max_persistent_exports, operators=frozenset(config.operators)))


def tool_policy(config: Config) -> ToolPolicy:
    """The tool I/O settings as the control layer's policy; a bad allow-list entry is a
    configuration error."""
    try:
        return ToolPolicy(enabled=config.tool_io, allow=tuple(config.tool_allow),
                          timeout=config.tool_timeout,
                          max_response_bytes=config.tool_max_response_size,
                          max_concurrent=config.tool_max_concurrent,
                          max_redirects=config.tool_max_redirects)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _hypercorn_config(config: Config) -> hypercorn.config.Config:
    install_websocket_guard()  # refuses oversized and slow WebSocket messages early
    hc = HypercornConfig()
    hc.bind = [f"{_url_host(config.host)}:{config.http_port}"]
    hc.websocket_max_message_size = config.max_frame_size  # larger messages close with 1009
    hc.frame_timeout = config.frame_timeout  # slower ones with 1008
    hc.max_app_queue_size = APP_QUEUE  # bounds what a connection holds while its session waits
    hc.graceful_timeout = HTTP_GRACE
    hc.accesslog = None  # requests are counted in /metrics
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


def _program_store(config: Config) -> ProgramStore:
    limits = ProgramLimits(
        max_functions=config.program_max_functions, max_code_bytes=config.program_max_code_size,
        compile_timeout=config.program_compile_timeout,
        compile_memory=config.program_compile_memory,
        compile_workers=config.program_compile_workers,
        max_programs=config.program_store_programs, max_stored_bytes=config.program_store_bytes,
        max_loaded=config.program_max_loaded, owner_max_programs=config.tenant_programs,
        owner_max_bytes=config.tenant_program_bytes)
    return ProgramStore(config.program_cache_dir, memory_only=config.program_cache_dir is None,
                        max_bytes=config.max_upload_size, limits=limits)


def _limits(config: Config) -> InstanceLimits:
    return InstanceLimits(memory_bytes=config.instance_memory, cpu_time=config.instance_cpu_time,
                  wall_time=config.instance_wall_time, cpu_total=config.instance_cpu_total,
                  host_call_share=config.instance_host_call_share,
                  host_call_total_share=config.instance_host_call_total_share,
                  max_outstanding_bytes=config.instance_outstanding_bytes,
                  max_inbox_bytes=config.instance_inbox_bytes)


# The controller's counters /metrics publishes under their own names (server/metrics.py).
CONTROL_STATS = ("preemptions", "restores", "swap_bytes", "prefix_cache_pages",
                 "prefix_cache_query_tokens", "prefix_cache_hit_tokens")


def _component_stats(stack: Stack) -> dict[str, Any]:
    control = stack.controller.stats()
    passed_on = {key: control[key] for key in CONTROL_STATS if key in control}
    return {"kv_pages_in_use": control["pages_in_use"], "kv_pages_total": control["pages_total"],
            "ticks": stack.executor.stats.ticks,
            "forward_batch_sizes": dict(stack.executor.stats.forward_calls),
            "kv_pages_swapped": control.get("swapped_pages"),
            "embed_slots_in_use": control["slots_in_use"], "trio_tasks": task_count(),
            **passed_on}


def task_count() -> int:
    """Every task of this trio run (a leak of tasks shows here; soak.py watches it)."""
    root = trio.lowlevel.current_root_task()
    if root is None:
        return 0
    count, nurseries = 0, list(root.child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            count += 1
            nurseries.extend(task.child_nurseries)
    return count + 1


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

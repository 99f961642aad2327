"""A server in a background thread, for synchronous programs: tests, notebooks, benchmarks.

    with BackgroundServer(Config(http_port=0, tcp_port=0), runner=runner) as server:
        openai.OpenAI(base_url=server.addresses.http + "/v1", api_key="-")...

The thread runs its own trio loop with the whole server in it; leaving the block drains the
server exactly as SIGTERM would, and waits for the thread to finish.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import trio

from pie_trio.config import Config
from pie_trio.server.serve import Addresses, serve
from pie_trio.stack import ServedRunner

START_TIMEOUT = 300.0  # seconds: loading a large model can take a while


class BackgroundServer:
    def __init__(self, config: Config, runner: ServedRunner | None = None):
        self.config = config
        self.runner = runner
        self.addresses: Addresses | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="pie-trio-server", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("the server did not start")
        if self._error is not None:
            raise RuntimeError("the server failed to start") from self._error
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Drain and stop the server, then wait for its thread."""
        if self._token is not None and self._shutdown is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()
        if self._error is not None and self.addresses is not None:
            raise RuntimeError("the server failed") from self._error

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported to the thread that started us
            self._error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            self.addresses = await nursery.start(partial(
                serve, self.config, runner=self.runner, shutdown=self._shutdown,
                handle_signals=False))
            self._ready.set()

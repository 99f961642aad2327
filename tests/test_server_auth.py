"""Authentication and ownership: every forbidden action is refused with the right error, and the
owner's instance carries on untouched."""

from __future__ import annotations

import httpx
import msgpack
import pytest
import trio
import trio_websocket
from test_server_support import ECHO_WAT, KEYS, background_server, wasm

from pie_trio.client import ServerError, connect
from pie_trio.model.tiny import tiny_runner

ECHO = wasm(ECHO_WAT)


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner(), api_keys=KEYS) as server:
        yield server


async def refused(url: str, key: str | None, kind: str, **fields) -> str:
    """The error code the server answers `kind` with, on a fresh connection."""
    async with connect(url, key) as client:
        with pytest.raises(ServerError) as error:
            await client.request(kind, **fields)
        return error.value.code


async def http_status(url: str, method: str, path: str, headers: dict) -> int:
    async with httpx.AsyncClient(base_url=url) as http:
        body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
        response = await http.request(method, path, headers=headers,
                                      json=body if method == "POST" else None)
        assert "error" in response.json()
        return response.status_code


async def unauthenticated_launch(server, _victim):
    return await refused(server.addresses.ws, None, "launch_instance", program="x")


async def unauthenticated_query(server, _victim):
    return await refused(server.addresses.tcp, None, "query", what="instances")


async def unauthenticated_upload(server, _victim):
    return await refused(server.addresses.ws, None, "upload_begin", hash="0" * 64, size=8)


async def unauthenticated_signal(server, victim):
    return await refused(server.addresses.tcp, None, "signal_instance", instance=victim,
                         message="hi")


async def wrong_key(server, _victim):
    return await refused(server.addresses.ws, None, "authenticate", token="key-mallory")


async def empty_key(server, _victim):
    return await refused(server.addresses.tcp, None, "authenticate", token="")


async def foreign_signal_ws(server, victim):
    return await refused(server.addresses.ws, KEYS["bob"], "signal_instance", instance=victim,
                         message="boo")


async def foreign_signal_tcp(server, victim):
    return await refused(server.addresses.tcp, KEYS["bob"], "signal_instance", instance=victim,
                         message="boo")


async def foreign_terminate(server, victim):
    return await refused(server.addresses.ws, KEYS["bob"], "terminate_instance", instance=victim)


async def switch_tenant(server, _victim):
    return await refused(server.addresses.tcp, KEYS["bob"], "authenticate", token=KEYS["alice"])


async def bad_header_then_launch(server, _victim):
    headers = [(b"authorization", b"Bearer key-mallory")]
    async with trio_websocket.open_websocket_url(server.addresses.ws,
                                                 extra_headers=headers) as ws:
        await ws.send_message(msgpack.packb({"id": 1, "type": "launch_instance", "program": "x"}))
        return msgpack.unpackb(await ws.get_message())["error"]


async def http_models_without_key(server, _victim):
    return await http_status(server.addresses.http, "GET", "/v1/models", {})


async def http_completion_wrong_key(server, _victim):
    return await http_status(server.addresses.http, "POST", "/v1/completions",
                             {"Authorization": "Bearer key-mallory"})


async def http_chat_not_bearer(server, _victim):
    return await http_status(server.addresses.http, "POST", "/v1/chat/completions",
                             {"Authorization": f"Basic {KEYS['alice']}"})


FORBIDDEN = [
    (unauthenticated_launch, "unauthenticated"),
    (unauthenticated_query, "unauthenticated"),
    (unauthenticated_upload, "unauthenticated"),
    (unauthenticated_signal, "unauthenticated"),
    (wrong_key, "auth_failed"),
    (empty_key, "auth_failed"),
    (foreign_signal_ws, "not_found"),
    (foreign_signal_tcp, "not_found"),
    (foreign_terminate, "not_found"),
    (switch_tenant, "bad_request"),
    (bad_header_then_launch, "unauthenticated"),
    (http_models_without_key, 401),
    (http_completion_wrong_key, 401),
    (http_chat_not_bearer, 401),
]


@pytest.mark.parametrize(("action", "expected"), FORBIDDEN, ids=[f.__name__ for f, _ in FORBIDDEN])
async def test_forbidden_action_is_refused(server, action, expected):
    async with connect(server.addresses.ws, KEYS["alice"]) as alice:
        victim = await alice.launch(await alice.upload(ECHO))
        assert await action(server, victim.id) == expected
        # The owner's instance is untouched: it still answers, and ends only by its owner.
        await victim.signal("still mine")
        with trio.fail_after(30):
            assert (await victim.next_event()).text == "still mine"
        await victim.terminate()
        with trio.fail_after(30):
            assert [e.reason async for e in victim.events()] == ["killed"]


async def test_tenants_see_only_their_instances(server):
    async with (connect(server.addresses.ws, KEYS["alice"]) as alice,
                connect(server.addresses.tcp, KEYS["bob"]) as bob):
        mine = await alice.launch(await alice.upload(ECHO))
        theirs = await bob.launch(await bob.upload(ECHO))
        assert [r["instance"] for r in await alice.instances()] == [mine.id]
        assert [r["instance"] for r in await bob.instances()] == [theirs.id]
        # The HTTP API takes the same keys.
        async with httpx.AsyncClient(base_url=server.addresses.http) as http:
            ok = await http.get("/v1/models", headers={"Authorization": f"Bearer {KEYS['bob']}"})
            assert ok.status_code == 200
        await mine.terminate()
        await theirs.terminate()


async def test_authorization_header_authenticates_a_websocket(server):
    headers = [(b"authorization", f"Bearer {KEYS['bob']}".encode())]
    async with trio_websocket.open_websocket_url(server.addresses.ws,
                                                 extra_headers=headers) as ws:
        await ws.send_message(msgpack.packb({"id": 1, "type": "query", "what": "instances"}))
        reply = msgpack.unpackb(await ws.get_message())
        assert reply["ok"] is True and isinstance(reply["result"], list)

"""Detach and attach over real sockets (tiny model): the backlog survives a disconnect and comes
back in order, other tenants cannot attach, a detached guest waits instead of losing output,
an instance that ended detached still reports its end, and ended ones are kept bounded."""

from __future__ import annotations

import time

import pytest
import trio
from test_server_support import ECHO_WAT, GREET_WAT, KEYS, background_server, wasm

from pie_trio.client import ServerError, connect
from pie_trio.model.tiny import tiny_runner
from pie_trio.server.detached import DetachedInstances

ECHO = wasm(ECHO_WAT)
GREET = wasm(GREET_WAT)


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner(num_pages=64), api_keys=KEYS) as server:
        yield server


@pytest.fixture(params=["ws", "tcp"])
def url(request, server) -> str:
    return server.addresses.ws if request.param == "ws" else server.addresses.tcp


async def texts(instance, count: int) -> list[str | None]:
    with trio.fail_after(30):
        return [(await instance.next_event()).text for _ in range(count)]


async def row_of(client, instance_id: str) -> dict | None:
    rows = [r for r in await client.instances() if r["instance"] == instance_id]
    return rows[0] if rows else None


async def wait_for_row(client, instance_id: str, **expected) -> dict:
    """Poll the listing until the instance's row has the expected values."""
    with trio.fail_after(30):
        while True:
            row = await row_of(client, instance_id)
            if row is not None and all(row.get(k) == v for k, v in expected.items()):
                return row
            await trio.sleep(0.01)


async def test_detach_disconnect_attach_gets_backlog_then_live_output(url, server):
    """The must-show case: detach, disconnect, attach from a new connection."""
    async with connect(url, KEYS["alice"]) as first:
        instance = await first.launch(await first.upload(ECHO))
        await instance.signal("before")
        assert await texts(instance, 1) == ["before"]
        await instance.detach()
        assert (await instance.next_event()).kind == "detached"  # its last event here
        assert instance.detached and [e async for e in instance.events()] == []
        for word in ("one", "two", "three"):
            await instance.signal(word)
        await wait_for_row(first, instance.id, state="detached", backlog=3)
    # The connection is gone; the detached instance runs on, its output held.
    async with connect(server.addresses.tcp, KEYS["alice"]) as second:
        assert (await wait_for_row(second, instance.id))["state"] == "detached"
        attached = await second.attach(instance.id)
        assert attached.backlog == 3
        assert await texts(attached, 3) == ["one", "two", "three"]  # the backlog, in order
        assert (await row_of(second, instance.id))["state"] == "attached"
        await attached.signal("live")
        assert await texts(attached, 1) == ["live"]
        await attached.terminate()
        end = [e async for e in attached.events()][-1]
        assert (end.kind, end.reason) == ("terminated", "killed")


async def test_an_attached_instance_still_ends_with_its_client(server):
    async with connect(server.addresses.ws, KEYS["alice"]) as watcher:
        async with connect(server.addresses.tcp, KEYS["alice"]) as client:
            program = await client.upload(ECHO)
            detached = await client.launch(program, detached=True)
            attached = await client.launch(program)
            await client.detach(detached.id)  # detaching a detached instance changes nothing
        with trio.fail_after(30):
            while await row_of(watcher, attached.id) is not None:
                await trio.sleep(0.01)  # ended: client_gone
        assert (await row_of(watcher, detached.id))["state"] == "detached"
        await watcher.terminate(detached.id)


async def test_detach_from_another_connection_tells_the_first(server):
    async with connect(server.addresses.ws, KEYS["alice"]) as owner, \
            connect(server.addresses.tcp, KEYS["alice"]) as other:
        instance = await owner.launch(await owner.upload(ECHO))
        with pytest.raises(ServerError) as refused:
            await other.attach(instance.id)
        assert refused.value.code == "already_attached"
        await other.detach(instance.id)
        with trio.fail_after(30):
            assert [e.kind async for e in instance.events()] == ["detached"]
        taken = await other.attach(instance.id)
        with pytest.raises(ServerError) as refused:
            await owner.attach(instance.id)
        assert refused.value.code == "already_attached"
        await taken.signal("here")
        assert await texts(taken, 1) == ["here"]
        await taken.terminate()


async def test_another_tenant_cannot_attach_or_detach(server):
    async with connect(server.addresses.ws, KEYS["alice"]) as alice, \
            connect(server.addresses.tcp, KEYS["bob"]) as bob:
        instance = await alice.launch(await alice.upload(ECHO), detached=True)
        assert await row_of(bob, instance.id) is None
        for action in (bob.attach, bob.detach, bob.terminate):
            with pytest.raises(ServerError) as refused:
                await action(instance.id)
            with pytest.raises(ServerError) as missing:
                await action("no-such-instance")
            # Exactly as for an id that does not exist: nothing tells bob it does.
            assert refused.value.code == missing.value.code == "not_found"
            assert refused.value.message == missing.value.message.replace(
                "no-such-instance", instance.id)
        attached = await alice.attach(instance.id)
        await attached.terminate()
        assert (await attached.next_event()).reason == "killed"


async def test_a_full_backlog_makes_the_guest_wait_and_loses_nothing(server):
    """Policy when the backlog fills: the guest's next send waits (output_backlog_bytes, 1 MiB
    by default); every message arrives, in order, once a client attaches."""
    chunk = 50_000
    words = [f"{i:04d}" + "x" * (chunk - 4) for i in range(40)]  # 2 MB, twice the backlog
    async with connect(server.addresses.tcp, KEYS["alice"]) as client:
        instance = await client.launch(await client.upload(ECHO), detached=True)
        for word in words:
            await instance.signal(word)
        # The guest echoes until about 1 MiB waits, then waits itself.
        row = await wait_for_row(client, instance.id)
        with trio.fail_after(30):
            while row["backlog"] < 2**20 // chunk:
                await trio.sleep(0.01)
                row = await wait_for_row(client, instance.id)
        await trio.sleep(0.3)
        assert (await row_of(client, instance.id))["backlog"] < len(words)
        attached = await client.attach(instance.id)
        received = await texts(attached, len(words))
        assert [text[:4] for text in received] == [word[:4] for word in words]
        assert received == words
        await attached.terminate()


async def test_attach_after_the_end_gets_the_output_and_the_end(url):
    async with connect(url, KEYS["bob"]) as client:
        instance = await client.launch(await client.upload(GREET), detached=True)
        row = await wait_for_row(client, instance.id, state="ended")
        assert row["backlog"] == 5
    async with connect(url, KEYS["bob"]) as client:
        attached = await client.attach(instance.id)
        with trio.fail_after(30):
            events = [(e.kind, e.text) async for e in attached.events()]
        assert events == [("message", "Hello, "), ("message", "world!"),
                          ("stdout", "printed\n"), ("return", "Hello, world!"),
                          ("terminated", None)]
        assert attached.result.reason == "finished"
        assert await row_of(client, instance.id) is None  # collected: gone for good
        with pytest.raises(ServerError) as refused:
            await client.attach(instance.id)
        assert refused.value.code == "not_found"


async def test_launch_detached_must_be_a_bool(server):
    async with connect(server.addresses.ws, KEYS["alice"]) as client:
        with pytest.raises(ServerError) as refused:
            await client.request("launch_instance", program="x", detached="yes")
        assert refused.value.code == "bad_request" and "detached" in refused.value.message


def test_shutdown_ends_detached_instances_without_waiting_out_the_drain():
    with background_server(tiny_runner(num_pages=16)) as server:
        async def launch_detached() -> str:
            async with connect(server.addresses.tcp) as client:
                return (await client.launch(await client.upload(ECHO), detached=True)).id

        trio.run(launch_detached)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 4  # the drain timeout is 5 s


class Record:
    """A stand-in for the server's instance record."""

    def __init__(self, instance_id: str, tenant: str):
        self.id = instance_id
        self.tenant = tenant
        self.has_ended = False


async def test_ended_detached_instances_are_kept_bounded():
    kept = DetachedInstances[Record](keep=2, keep_seconds=60.0)
    records = [Record(f"i{n}", "alice") for n in range(3)] + [Record("b", "bob")]
    for record in records:
        kept.add(record)
    ended: list[str] = []
    for record in records:
        record.has_ended = True
        kept.settle(lambda r: ended.append(r.id))
        await trio.sleep(0.001)  # distinct end times
    assert ended == ["i0", "i1", "i2", "b"]
    assert [r.id for r in kept.ended("alice")] == ["i1", "i2"]  # the oldest went
    assert kept.get("i0", "alice") is None and kept.get("b", "alice") is None
    assert kept.get("b", "bob") is not None
    brief = DetachedInstances[Record](keep=2, keep_seconds=0.005)
    brief.add(record := Record("x", "alice"))
    brief.settle(lambda r: None)
    await trio.sleep(0.01)
    brief.settle(lambda r: None)
    assert len(brief) == 1  # not ended: kept, whatever its age
    record.has_ended = True
    brief.settle(lambda r: None)
    assert [r.id for r in brief.ended("alice")] == ["x"]
    await trio.sleep(0.01)
    brief.settle(lambda r: None)
    assert len(brief) == 0  # past its keeping

"""Tool I/O (`http_request`, pie_trio/control/tools.py) against the local tool service: an
allowed call reaches the service and its answer comes back; a host not on the allow-list, a
redirect that leaves it, an oversize response, a timeout and one request too many each end in an
error naming the rule, and the instance keeps running; with tool I/O off every call is refused;
closing an instance mid-request cancels the request (the service sees the client hang up) and
leaves no task behind."""

from __future__ import annotations

import pytest
import trio
from control_support import error, ok, request
from test_runtime_support import live_trio_tasks, running_stack
from tool_support import open_tool_service

from pie_trio.config import Config, ConfigError
from pie_trio.control.tools import AllowRule, ToolPolicy
from pie_trio.server.serve import tool_policy

LOCAL = ToolPolicy(enabled=True, allow=("127.0.0.1",))


async def _with_instance(runner, policy: ToolPolicy, check) -> None:
    async with open_tool_service() as service, running_stack(runner, tools=policy) as stack:
        ctl = stack.controller.attach("agent")
        try:
            await check(ctl, service)
        finally:
            await ctl.close()


async def test_an_allowed_call_reaches_the_tool_service(tiny_runner):
    async def check(ctl, service):
        answer = await ok(ctl, "http_request", url=f"{service.url}/search?q=capital+France",
                          parse_json=True)
        assert answer["status"] == 200
        assert answer["json"]["results"][0]["title"] == "paris"
        assert ["content-type", "application/json"] in answer["headers"]
        assert service.calls("search")[0]["argument"] == "capital France"
        echo = await ok(ctl, "http_request", method="POST", url=f"{service.url}/echo",
                        json={"x": [1, 2]}, headers={"X-Tool": "yes"}, parse_json=True)
        assert echo["json"]["method"] == "POST" and echo["json"]["body"] == '{"x": [1, 2]}'
        assert echo["json"]["headers"]["x-tool"] == "yes"
        assert echo["json"]["headers"]["host"] == service.url.removeprefix("http://")

    await _with_instance(tiny_runner, LOCAL, check)


async def test_refusals_name_their_rule_and_the_instance_keeps_running(tiny_runner):
    policy = ToolPolicy(enabled=True, allow=("127.0.0.1",), max_response_bytes=1000)

    async def check(ctl, service):
        port = service.url.rsplit(":", 1)[1]
        assert "not on the allow-list (setting tool_allow)" in await error(
            ctl, "http_request", url=f"http://127.0.0.2:{port}/search?q=x")
        assert "not on the allow-list" in await error(
            ctl, "http_request", url="http://example.invalid/")
        leaving = f"{service.url}/redirect?to=http://127.0.0.2:{port}/search"
        assert "'127.0.0.2' port " + port in await error(ctl, "http_request", url=leaving)
        assert "setting tool_max_response_size" in await error(
            ctl, "http_request", url=f"{service.url}/bytes?n=5000")
        assert "within 0.2 s (field timeout_ms)" in await error(
            ctl, "http_request", url=f"{service.url}/slow?ms=5000", timeout_ms=200)
        assert "only http and https" in await error(ctl, "http_request", url="file:///etc/passwd")
        assert "header 'host'" in await error(ctl, "http_request", url=service.url,
                                              headers={"Host": "evil"})
        # Still serving: a redirect that stays on the list is followed, other ops answer.
        staying = f"{service.url}/redirect?to=/calc%3Fexpr%3D6*7"
        answer = await ok(ctl, "http_request", url=staying, parse_json=True)
        assert answer["json"] == {"result": 42} and answer["url"].endswith("/calc?expr=6*7")
        assert await ok(ctl, "ping", payload="alive") == "alive"
        with trio.fail_after(5):
            while service.aborted < 1:  # the timed-out request's connection was closed
                await trio.sleep(0.02)

    await _with_instance(tiny_runner, policy, check)


async def test_a_listed_name_may_not_reach_loopback_unless_listed(tiny_runner):
    by_name = ToolPolicy(enabled=True, allow=("localhost",))

    async def check(ctl, service):
        port = service.url.rsplit(":", 1)[1]
        message = await error(ctl, "http_request", url=f"http://localhost:{port}/search")
        assert "special address not listed (setting tool_allow)" in message

    await _with_instance(tiny_runner, by_name, check)
    wrong_port = ToolPolicy(enabled=True, allow=("127.0.0.1:1",))

    async def check_port(ctl, service):
        assert "not on the allow-list" in await error(ctl, "http_request", url=service.url)

    await _with_instance(tiny_runner, wrong_port, check_port)


async def test_with_tool_io_off_every_call_is_refused(tiny_runner):
    async def check(ctl, service):
        for url in (f"{service.url}/search?q=x", "http://127.0.0.2/"):
            message = await error(ctl, "http_request", url=url)
            assert message == "http_request: tool I/O is disabled on this server (setting tool_io)"
        assert service.log == []

    await _with_instance(tiny_runner, ToolPolicy(allow=("127.0.0.1",)), check)


async def test_redirect_and_concurrency_caps(tiny_runner):
    policy = ToolPolicy(enabled=True, allow=("127.0.0.1",), max_concurrent=2, max_redirects=1,
                        timeout=0.5)

    async def check(ctl, service):
        loop = f"{service.url}/redirect?to=/redirect%3Fto%3D/search"
        assert "(setting tool_max_redirects)" in await error(ctl, "http_request", url=loop)
        answers: list[dict] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(_collect, ctl, f"{service.url}/slow?ms=2000", answers)
        messages = [a["error"] for a in answers]
        assert sum("(setting tool_max_concurrent)" in m for m in messages) == 1, messages
        assert sum("(setting tool_timeout)" in m for m in messages) == 2, messages

    await _with_instance(tiny_runner, policy, check)


async def _collect(ctl, url: str, answers: list[dict]) -> None:
    answers.append(await request(ctl, "http_request", url=url))


async def test_closing_an_instance_cancels_its_requests(tiny_runner):
    async with open_tool_service() as service, running_stack(tiny_runner, tools=LOCAL) as stack:
        baseline = live_trio_tasks()
        ctl = stack.controller.attach("agent")
        answers: list[dict] = []
        for _ in range(3):
            ctl.start_request({"op": "http_request", "url": f"{service.url}/slow?ms=30000"},
                              answers.append)
        with trio.fail_after(5):
            while service.in_flight < 3:
                await trio.sleep(0.01)
            await ctl.close()
            assert answers == [{"error": "instance closed"}] * 3
            while service.aborted < 3 or service.in_flight:
                await trio.sleep(0.01)
        assert ctl.usage()["pending"] == 0
        await trio.sleep(0.05)
        assert live_trio_tasks() <= baseline


def test_allow_list_entries_and_config():
    assert AllowRule.parse("api.example:443").names("api.example", 443)
    assert not AllowRule.parse("api.example:443").names("api.example", 80)
    assert AllowRule.parse("*.example").names("a.b.example", 80)
    assert not AllowRule.parse("*.example").names("example", 80)
    rule = AllowRule.parse("[::1]:8080")
    assert rule.network is not None and rule.port == 8080
    assert AllowRule.parse("10.0.0.0/8").network is not None
    with pytest.raises(ValueError, match="bad port"):
        AllowRule.parse("host:http")
    config = Config.load(env={"PIE_TRIO_TOOL_IO": "on",
                              "PIE_TRIO_TOOL_ALLOW": "127.0.0.1:8900,*.tools.example"},
                         overrides={"tool_max_response_size": "64KiB", "tool_timeout": "2.5"})
    policy = tool_policy(config)
    assert policy.enabled and policy.allow == ("127.0.0.1:8900", "*.tools.example")
    assert policy.max_response_bytes == 64 << 10 and policy.timeout == 2.5
    assert not tool_policy(Config()).enabled
    with pytest.raises(ConfigError, match="tool_allow"):
        tool_policy(Config.load(overrides={"tool_allow": "bad host!"}))

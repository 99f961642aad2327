"""The command line: every verb's help, settings precedence, and the client verbs against a real
server (tiny model)."""

from __future__ import annotations

import io
import queue
import threading
import time

import pytest
import trio
from test_server_support import ECHO_WAT, GREET_WAT, background_server, program_hash, wasm

from pie_trio.cli import build_parser, main
from pie_trio.cli.serve import config_from_args
from pie_trio.client import connect
from pie_trio.model.tiny import tiny_runner

CLIENT_VERBS = ["run", "upload", "ps", "attach", "detach", "kill", "models"]


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner()) as server:
        yield server


def test_help_explains_every_verb_and_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    overview = capsys.readouterr().out
    for verb in ["serve", *CLIENT_VERBS]:
        assert verb in overview
        with pytest.raises(SystemExit) as done:
            main([verb, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        for action in build_parser()._subparsers._group_actions[0].choices[verb]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{verb} {action.option_strings} has no help"
                assert action.option_strings[-1] in text


def test_settings_precedence(tmp_path, monkeypatch):
    config_file = tmp_path / "pie.toml"
    config_file.write_text('http_port = 9000\ntcp_port = 9001\nkv_memory = "1GiB"\n'
                           'page_size = 32\n[api_keys]\nalice = "k1"\n')
    monkeypatch.setenv("PIE_TRIO_TCP_PORT", "off")
    monkeypatch.setenv("PIE_TRIO_PAGE_SIZE", "8")
    args = build_parser().parse_args(["serve", "--config", str(config_file), "--page-size", "64",
                                      "--api-key", "bob:k2", "--max-upload-size", "2MiB"])
    config = config_from_args(args)
    assert config.http_port == 9000  # file
    assert config.tcp_port is None  # environment over file
    assert config.page_size == 64  # flag over environment over file
    assert config.kv_memory == 2**30
    assert config.max_upload_size == 2 * 2**20
    assert config.api_keys == {"bob": "k2"} and config.auth_enabled


def test_port_is_an_alias_of_http_port():
    """`--port`, as vLLM, SGLang and llama-server spell it."""
    for flag in ("--port", "--http-port"):
        config = config_from_args(build_parser().parse_args(["serve", flag, "9100"]))
        assert config.http_port == 9100


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--http-port", "99999"], "out of range"),
    (["serve", "--batch-policy", "sometimes"], "expected one of"),
    (["serve", "--auth", "on"], "no api_keys"),
    (["serve", "--kv-memory", "lots"], "size"),
])
def test_bad_settings_are_named(capsys, argv, message):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "pie-trio serve" in error


def test_upload_then_run_streams_output(server, tmp_path, capsys):
    greet = tmp_path / "greet.wasm"
    greet.write_bytes(wasm(GREET_WAT))
    assert main(["upload", str(greet), "--server", server.addresses.ws]) == 0
    assert capsys.readouterr().out.strip() == program_hash(greet.read_bytes())

    assert main(["run", str(greet), "--server", server.addresses.tcp, "--", "--flag", "x"]) == 0
    out = capsys.readouterr().out
    assert out == "Hello, world!printed\n"  # streamed messages, then its stdout


def test_run_reports_failures(server, capsys):
    assert main(["run", "no-such-program", "--server", server.addresses.ws]) == 1
    assert "unknown_program" in capsys.readouterr().err
    assert main(["run", "x", "--server", "tcp://127.0.0.1:1"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_models(server, capsys):
    assert main(["models", "--server", server.addresses.ws]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "PAGE_SIZE", "VOCAB_SIZE", "MAX_POSITION"]
    assert "tiny-random-llama" in out


def test_ps_and_kill_an_instance_of_another_connection(server, capsys):
    launched: queue.Queue = queue.Queue()
    ends: list = []

    async def hold_echo() -> None:
        async with connect(server.addresses.tcp) as client:
            instance = await client.launch(await client.upload(wasm(ECHO_WAT)))
            launched.put(instance.id)
            with trio.fail_after(60):
                ends.extend([event.reason async for event in instance.events()])

    holder = threading.Thread(target=trio.run, args=(hold_echo,))
    holder.start()
    instance_id = launched.get(timeout=60)
    try:
        assert main(["ps", "--server", server.addresses.ws]) == 0
        table = capsys.readouterr().out
        assert instance_id in table and "tcp" in table
        assert main(["kill", instance_id, "--server", server.addresses.ws]) == 0
        assert main(["kill", "not-an-instance", "--server", server.addresses.ws]) == 1
        assert "no instance" in capsys.readouterr().err
    finally:
        holder.join(timeout=60)
    assert ends == ["killed"]



async def running_instances(url: str) -> list[str]:
    async with connect(url) as client:
        return [row["instance"] for row in await client.instances()]


def test_run_input_sends_stdin_lines_to_the_instance(server, tmp_path, capsys, monkeypatch):
    echo = tmp_path / "echo.wasm"
    echo.write_bytes(wasm(ECHO_WAT))
    before = set(trio.run(running_instances, server.addresses.tcp))
    monkeypatch.setattr("sys.stdin", io.StringIO("first line\nsecond line\n"))
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(
        main(["run", str(echo), "--input", "--server", server.addresses.ws])))
    runner.start()
    out = ""
    try:
        deadline = time.monotonic() + 60  # a guard against hanging, not a measurement
        while "second line" not in out and time.monotonic() < deadline:
            time.sleep(0.01)
            out += capsys.readouterr().out
        assert out == "first linesecond line"  # each line went in and came back out
        (instance_id,) = set(trio.run(running_instances, server.addresses.tcp)) - before
        assert main(["kill", instance_id, "--server", server.addresses.tcp]) == 0
    finally:
        runner.join(timeout=60)
    assert codes == [1]  # killed, not finished
    assert "instance ended: killed" in capsys.readouterr().err


def test_run_detached_then_ps_and_attach(server, tmp_path, capsys):
    greet = tmp_path / "greet.wasm"
    greet.write_bytes(wasm(GREET_WAT))
    assert main(["run", "--detach", str(greet), "--server", server.addresses.ws]) == 0
    instance_id = capsys.readouterr().out.strip()
    deadline = time.monotonic() + 60  # a guard against hanging, not a measurement
    row: list[str] = []
    while row[2:3] != ["ended"]:  # it finished while detached; its end waits for an attach
        assert time.monotonic() < deadline
        assert main(["ps", "--server", server.addresses.tcp]) == 0
        header, *lines = capsys.readouterr().out.splitlines()
        assert header.split()[:3] == ["INSTANCE", "PROGRAM", "STATE"]
        row = next((line.split() for line in lines if line.startswith(instance_id)), [])
    assert main(["detach", instance_id, "--server", server.addresses.tcp]) == 0  # it is already
    assert main(["attach", instance_id, "--server", server.addresses.tcp]) == 0
    assert capsys.readouterr().out == "Hello, world!printed\n"  # kept, though it had ended
    assert main(["attach", instance_id, "--server", server.addresses.ws]) == 1
    assert "no instance" in capsys.readouterr().err


def test_detach_lets_a_run_go_and_the_instance_run_on(server, tmp_path, capsys):
    echo = tmp_path / "echo.wasm"
    echo.write_bytes(wasm(ECHO_WAT))
    before = set(trio.run(running_instances, server.addresses.tcp))
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(
        main(["run", str(echo), "--server", server.addresses.ws])))
    runner.start()
    try:
        deadline = time.monotonic() + 60  # a guard against hanging, not a measurement
        while not set(trio.run(running_instances, server.addresses.tcp)) - before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (instance_id,) = set(trio.run(running_instances, server.addresses.tcp)) - before
        assert main(["detach", instance_id, "--server", server.addresses.tcp]) == 0
    finally:
        runner.join(timeout=60)
    assert codes == [0]
    assert f"pie-trio attach {instance_id}" in capsys.readouterr().err
    assert instance_id in trio.run(running_instances, server.addresses.tcp)  # it runs on
    assert main(["kill", instance_id, "--server", server.addresses.tcp]) == 0


def test_run_local_runs_in_process(tmp_path, capsys, monkeypatch):
    """--local: the whole stack in this process (the tiny model stands in for the default)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("pie_trio.cli.local._load_model", lambda *_: tiny_runner())
    greet = tmp_path / "greet.wasm"
    greet.write_bytes(wasm(GREET_WAT))
    assert main(["run", "--local", str(greet), "--", "some", "args"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello, world!\n"
    assert "[stdout] printed" in captured.err and "[terminated: finished]" in captured.err
    assert main(["run", "--local", "--input", str(greet)]) == 1
    assert "cannot be combined" in capsys.readouterr().err

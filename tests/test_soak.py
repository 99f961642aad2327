"""The soak script's short mode: a minute of mixed load and injected faults against a real
`pie-trio serve` process (the tiny model), then SIGTERM. Every client must get a response or a
close reason, nothing may leak, and the server must exit 0 (scripts/soak.py, docs/server.md)."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import blake3
import wasmtime

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
TIMEOUT = 420  # a minute of load, plus start, warm-up, settling and shutdown on a busy machine


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_fresh_uploads_are_valid_and_new_programs():
    soak = load_soak()
    base = soak.TEXT_COMPLETION.read_bytes()
    fresh = [soak.with_custom_section(base, random.randbytes(n)) for n in (0, 32, 200)]
    for module in fresh:
        wasmtime.Module.validate(wasmtime.Engine(), module)
    assert len({blake3.blake3(module).hexdigest() for module in [base, *fresh]}) == 4


def test_pages_the_prefix_cache_keeps_are_not_held_by_clients():
    soak = load_soak()
    metrics = soak.parse_metrics(
        "# HELP x\npie_trio_kv_pages_in_use 5.0\npie_trio_prefix_cache_pages 5.0\n"
        'pie_trio_sessions 0.0\npie_trio_instance_terminations_total{reason="trap"} 2.0\n'
        'pie_trio_instance_terminations_total{reason="finished"} 3.0\n')
    assert metrics["pie_trio_instance_terminations_total"] == 5.0
    assert soak.held(metrics) == {}
    assert soak.held({**metrics, "pie_trio_sessions": 1.0}) == {"sessions": 1.0}


def test_short_soak_loses_nothing_and_leaks_nothing():
    result = subprocess.run([sys.executable, str(SOAK), "--short", "--tiny", "--json"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    report = result.stderr[-6000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    summary = record["summary"]
    assert summary["lost"] == 0, report
    assert summary["violations"] == 0, report
    assert record["leaks"] == [], report
    assert record["end_state"]["instances_running"] == 0, report
    cached = record["end_state"]["prefix_cache_pages"] or 0  # a bounded cache, not a leak
    assert record["end_state"]["kv_pages_in_use"] == cached, report
    assert record["shutdown"]["returncode"] == 0, report
    assert record["frames"]["sent"] >= record["frames"]["target"] > 0, report
    assert summary["served"] > 0 and summary["faults_answered"] > 0, report
    for drained in ("drain:openai", "drain:ws", "drain:tcp"):
        assert drained in summary["by_kind"], report
    # The allocation pressure preempted, and the task count was watched (it is a leak bound).
    assert record["kv_policy"] == "preempt" and record["preemptions"] > 0, report
    assert record["trio_tasks"]["after"] is not None, report
    assert record["ok"] and result.returncode == 0, report

"""Grammar-constrained decoding (control/grammar.py): the compile cache, invalid grammars, the
masks a matcher computes, the grammar ops and constrained forwards over the real executor, and
the constrained-decoding inferlet on the real model, where every output must parse and
validate against its schema, regex or grammar.

The real-model test generates greedily and briefly: small schemas with bounded strings."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
import test_inferlets_build
import trio
from control_support import error, ok
from test_runtime_support import finish, running_stack

from pie_trio.control.controller import Controller, ControlLimits
from pie_trio.control.fields import ControlError
from pie_trio.control.grammar import GrammarCompiler, GrammarError, InstanceGrammars
from pie_trio.executor.executor import Executor
from pie_trio.model.tiny import tiny_runner as make_tiny_runner

built_modules = test_inferlets_build.built_modules  # the build fixture, shared with this module


@pytest.fixture(scope="module")
def runner():
    return make_tiny_runner()


@pytest.fixture(scope="module")
def compiler(runner) -> GrammarCompiler:
    """One compiler for the module's unit tests: its tokenizer takes a second to build."""
    return GrammarCompiler(runner.tokenizer, runner.info.vocab_size, runner.info.stop_tokens,
                           cache_size=3)


def allowed(mask: bytes) -> set[int]:
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
    return set(np.nonzero(bits)[0].tolist())


def matcher_for(compiler: GrammarCompiler, grammar) -> Any:
    grammars = InstanceGrammars(compiler.vocab_size, max_grammars=4, max_matchers=4)
    return grammars.matcher(grammars.create_matcher(grammars.add_grammar(grammar)))


# -- the compiler ----------------------------------------------------------------------------


async def test_grammars_compile_once_per_content_in_a_bounded_cache(compiler):
    source = "start: /[a-c]+/"  # a Lark grammar, and a regex for that very text
    first = await compiler.compile("lark", source)
    assert await compiler.compile("lark", source) is first
    assert await compiler.compile("regex", source) is not first  # the kind is part of the key
    for pattern in ("x", "y", "z"):
        await compiler.compile("regex", pattern)
    assert len(compiler) == 3  # the oldest were dropped ...
    again = await compiler.compile("lark", source)
    assert again is not first and again.key == first.key  # ... and compile anew


@pytest.mark.parametrize("kind, source, message", [
    ("regex", "a(b", "invalid regex: "),
    ("lark", "start: foo", "invalid lark: "),
    ("lark", "start: \"unterminated", "invalid lark: "),
    ("json_schema", "{not json", "invalid json_schema: not JSON"),
    ("json_schema", "[1, 2]", "invalid json_schema: a schema must be"),
    ("json_schema", '{"type": "frob"}', "invalid json_schema: "),
    ("json_schema", '{"type": "string", "format": "no-such-format"}', "invalid json_schema: "),
])
async def test_invalid_grammars_are_errors_naming_the_kind(compiler, kind, source, message):
    with pytest.raises(GrammarError) as caught:
        await compiler.compile(kind, source)
    assert str(caught.value).startswith(message)
    assert len(str(caught.value)) > len(message)  # llguidance's reason follows


async def test_unknown_kinds_and_oversized_sources_are_refused(compiler):
    with pytest.raises(ControlError, match="unknown grammar kind 'ebnf'"):
        await compiler.compile("ebnf", "start: x")
    with pytest.raises(GrammarError, match="larger than"):
        await compiler.compile("regex", "a" * (compiler.max_source_bytes + 1))


# -- masks -----------------------------------------------------------------------------------


async def test_a_mask_allows_exactly_the_tokens_that_keep_the_text_in_the_language(compiler,
                                                                                  runner):
    """For `(yes|no)`, allowed tokens are the non-empty prefixes of "yes" or "no", by bytes;
    after "yes" only the model's stop tokens remain."""
    vocab = runner.tokenizer.token_bytes()
    stop = set(runner.info.stop_tokens)
    expected = {t for t, b in enumerate(vocab)
                if b and t not in stop and (b"yes".startswith(b) or b"no".startswith(b))}
    matcher = matcher_for(compiler, await compiler.compile("regex", "(yes|no)"))
    mask = matcher.mask()
    assert len(mask) == (runner.info.vocab_size + 7) // 8
    assert allowed(mask) == expected
    for token in runner.tokenizer.encode("yes"):
        assert token in allowed(matcher.mask())
        done = matcher.advance(token)
    assert done and matcher.done
    assert allowed(matcher.mask()) == stop


async def test_a_json_mask_follows_the_schema(compiler, runner):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    matcher = matcher_for(compiler, await compiler.compile("json_schema", json.dumps(schema)))
    vocab = runner.tokenizer.token_bytes()
    text = b""
    for token in runner.tokenizer.encode('{"ok": tr'):
        assert token in allowed(matcher.mask())
        matcher.advance(token)
        text += vocab[token]
    mask = allowed(matcher.mask())
    assert all(b"ue}".startswith(vocab[t]) for t in mask), [vocab[t] for t in mask]
    assert runner.tokenizer.encode("ue")[0] in mask
    assert not matcher.done and not set(runner.info.stop_tokens) & mask


async def test_matchers_are_independent_copies_and_consume_stops_at_a_refused_token(compiler,
                                                                                     runner):
    grammar = await compiler.compile("regex", "[0-9]+")
    a, b = matcher_for(compiler, grammar), matcher_for(compiler, grammar)
    digits = runner.tokenizer.encode("12")
    assert a.consume(digits + runner.tokenizer.encode("x")) == len(digits)
    assert allowed(b.mask()) != allowed(a.mask())  # b is still at the start: no stop token yet
    assert not set(runner.info.stop_tokens) & allowed(b.mask())
    assert set(runner.info.stop_tokens) <= allowed(a.mask())


async def test_instance_grammars_are_bounded_and_ids_are_never_reused(compiler):
    grammars = InstanceGrammars(compiler.vocab_size, max_grammars=1, max_matchers=1)
    with pytest.raises(ControlError, match="grammar 0 is not held"):
        grammars.create_matcher(0)
    grammar = await compiler.compile("regex", "a")
    first = grammars.add_grammar(grammar)
    with pytest.raises(ControlError, match="already holds 1 grammars"):
        grammars.add_grammar(grammar)
    matcher = grammars.create_matcher(first)
    with pytest.raises(ControlError, match="already holds 1 matchers"):
        grammars.create_matcher(first)
    grammars.free_grammar(first)
    grammars.matcher(matcher).mask()  # a matcher outlives its grammar's id
    grammars.free_matcher(matcher)
    assert grammars.add_grammar(grammar) == first + 1
    with pytest.raises(ControlError, match="matcher 0 is not held"):
        grammars.free_matcher(matcher)
    grammars.clear()
    assert len(grammars) == 0


# -- the ops and constrained forwards --------------------------------------------------------


@pytest.fixture
async def controller(runner):
    async with trio.open_nursery() as nursery:
        executor = Executor(runner)
        await nursery.start(executor.run)
        limits = ControlLimits(max_grammars=4, max_matchers=3)
        controller = Controller(executor, runner.info, runner.tokenizer, limits)
        await nursery.start(controller.run)
        yield controller
        nursery.cancel_scope.cancel()


async def constrained_generate(ctl, runner, matcher: int, prompt: list[int],
                               max_tokens: int) -> tuple[list[int], list[bool]]:
    """Greedy decoding under `matcher`, one forward per token; (tokens, done after each)."""
    page_size = runner.info.page_size
    pages = await ok(ctl, "alloc_pages", count=4)
    tokens, dones, inputs, length = [], [], prompt, 0
    while len(tokens) < max_tokens and not (dones and dones[-1]):
        end = length + len(inputs)
        used = pages[:-(-end // page_size)]
        value = await ok(ctl, "forward", pages=used,
                         last_page_len=end - (len(used) - 1) * page_size,
                         positions=list(range(length, end)), tokens=inputs,
                         outputs=[len(inputs) - 1], sampler={"matcher": matcher})
        tokens += value["tokens"]
        dones.append(value["done"])
        inputs, length = value["tokens"], end
    await ok(ctl, "free_pages", pages=pages)
    return tokens, dones


async def test_a_constrained_forward_masks_inside_the_batch_and_advances_the_matcher(
        controller, runner):
    """Even the tiny random model writes only what the grammar allows; the answer says when
    the grammar is complete."""
    ctl = controller.attach("a")
    grammar = await ok(ctl, "grammar_compile", kind="regex", source="[0-9]{3}-[a-z]{2}")
    matcher = await ok(ctl, "matcher_create", grammar=grammar)
    tokens, dones = await constrained_generate(ctl, runner, matcher, [1, 2, 3], 12)
    text = runner.tokenizer.decode(tokens)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", text), text
    assert dones[-1] and not any(dones[:-1])
    # Done: a further constrained forward may only sample a stop token.
    more, _ = await constrained_generate(ctl, runner, matcher, tokens[-1:], 1)
    assert more[0] in runner.info.stop_tokens


async def test_grammar_errors_are_responses_and_the_instance_goes_on(controller):
    ctl = controller.attach("a")
    message = await error(ctl, "grammar_compile", kind="regex", source="a(b")
    assert message.startswith("grammar_compile: invalid regex: ") and "unclosed group" in message
    message = await error(ctl, "grammar_compile", kind="json_schema", source='{"type": "x"}')
    assert message.startswith("grammar_compile: invalid json_schema: ")
    assert "unknown grammar kind" in await error(ctl, "grammar_compile", kind="gbnf", source="")
    grammar = await ok(ctl, "grammar_compile", kind="regex", source="ab")
    matcher = await ok(ctl, "matcher_create", grammar=grammar)
    assert await ok(ctl, "matcher_consume", matcher=matcher, tokens=[]) == {
        "consumed": 0, "done": False}
    assert "matcher 7 is not held" in await error(ctl, "matcher_free", matcher=7)
    assert "grammar 7 is not held" in await error(ctl, "matcher_create", grammar=7)
    assert "unknown field 'schema'" in await error(ctl, "grammar_compile", kind="regex",
                                                   schema="a")


async def test_constrained_forwards_refuse_what_cannot_work(controller):
    ctl = controller.attach("a")
    grammar = await ok(ctl, "grammar_compile", kind="regex", source="[a-z]+")
    matcher = await ok(ctl, "matcher_create", grammar=grammar)
    pages = await ok(ctl, "alloc_pages", count=1)
    base = {"pages": pages, "last_page_len": 2, "positions": [0, 1], "tokens": [5, 6]}
    assert "exactly one output, got 2" in await error(
        ctl, "forward", **base, outputs=[0, 1], sampler={"matcher": matcher})
    assert "not both" in await error(ctl, "forward", **base, outputs=[1],
                                     sampler={"matcher": matcher}, vocab_mask=b"\xff" * 6144)
    assert "matcher 9 is not held" in await error(ctl, "forward", **base, outputs=[1],
                                                  sampler={"matcher": 9})
    assert "'matcher' must be an int" in await error(ctl, "forward", **base, outputs=[1],
                                                     sampler={"matcher": "m"})


async def test_one_matcher_serves_one_forward_at_a_time(controller):
    """Two forwards naming the same matcher at once: the second's mask could not know the
    first one's token, so it is refused; on two queues both would race the same way."""
    ctl = controller.attach("a")
    grammar = await ok(ctl, "grammar_compile", kind="regex", source="[a-z]+")
    matcher = await ok(ctl, "matcher_create", grammar=grammar)
    pages = await ok(ctl, "alloc_pages", count=2)
    answers: list[dict] = []
    async with trio.open_nursery() as nursery:
        for page in pages:
            done = trio.Event()
            request = {"op": "forward", "pages": [page], "last_page_len": 1, "positions": [0],
                       "tokens": [5], "outputs": [0], "sampler": {"matcher": matcher}}
            ctl.start_request(request, lambda r, d=done: (answers.append(r), d.set()))
            nursery.start_soon(done.wait)
    assert sorted("ok" in a for a in answers) == [False, True], answers
    assert any("in use by another forward" in a.get("error", "") for a in answers)


async def test_grammars_and_matchers_are_bounded_per_instance_and_freed_on_close(controller):
    ctl = controller.attach("a")
    grammars = [await ok(ctl, "grammar_compile", kind="regex", source=f"x{i}") for i in range(4)]
    assert "already holds 4 grammars" in await error(ctl, "grammar_compile", kind="regex",
                                                     source="y")
    matchers = [await ok(ctl, "matcher_create", grammar=grammars[0]) for _ in range(3)]
    assert "already holds 3 matchers" in await error(ctl, "matcher_create", grammar=grammars[1])
    await ok(ctl, "matcher_free", matcher=matchers[0])
    await ok(ctl, "grammar_free", grammar=grammars[0])
    await ok(ctl, "matcher_create", grammar=grammars[1])
    assert controller.stats()["grammars_cached"] == 4
    await ctl.close()
    assert len(ctl.context.grammars) == 0


# -- the inferlet ----------------------------------------------------------------------------


async def _run_inferlet(stack, module, *args) -> tuple[Any, list[dict]]:
    program = stack.runtime.programs.add(module.read_bytes())
    outcome = await finish(await stack.launch(program, *args))
    assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
    return outcome, json.loads(outcome.return_value)


async def test_the_inferlet_generates_one_grammar_on_the_tiny_model(tiny_runner, built_modules):
    async with running_stack(tiny_runner) as stack:
        _, results = await _run_inferlet(stack, built_modules["constrained-decoding"],
                                         "--grammar", "regex:[0-9]{2}-[a-z]{3}", "--prompt", "Hi")
        _, failed = await _run_inferlet(stack, built_modules["constrained-decoding"],
                                        "--grammar", "lark:start: nowhere")
        stats = stack.controller.stats()
    assert re.fullmatch("[0-9]{2}-[a-z]{3}", results[0]["text"]) and results[0]["complete"]
    assert failed[0]["error"].startswith("grammar_compile: invalid lark: ")
    assert stats["pages_in_use"] == 0


def _string(n: int = 20) -> dict:
    return {"type": "string", "maxLength": n}


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


# (kind, source, prompt, Python regex a regex or Lark output must fully match)
JOBS: list[tuple[str, Any, str, str | None]] = [
    ("json_schema", _object({"name": _string(), "age": {"type": "integer", "minimum": 0,
                                                         "maximum": 150}}),
     "Describe a person as JSON.", None),
    ("json_schema", _object({"city": _string(), "country": _string()}),
     "What is the capital of France? Answer in JSON.", None),
    ("json_schema", _object({"answer": {"type": "boolean"}}),
     "Is the sky blue? Answer in JSON.", None),
    ("json_schema", _object({"color": {"enum": ["red", "green", "blue"]}}),
     "Pick a color. Answer in JSON.", None),
    ("json_schema", {"enum": ["cat", "dog", "bird"]}, "Which animal barks?", None),
    ("json_schema", {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                     "maxItems": 5}, "List three small prime numbers as a JSON array.", None),
    ("json_schema", {"type": "array", "items": _string(12), "maxItems": 3},
     "List some fruits as a JSON array.", None),
    ("json_schema", _object({"title": _string(30), "tags": {"type": "array",
                                                            "items": _string(10),
                                                            "maxItems": 3}}),
     "Describe a blog post as JSON.", None),
    ("json_schema", _object({"person": _object({"first": _string(), "last": _string()}),
                             "id": {"type": "integer", "minimum": 0, "maximum": 9999}}),
     "Give a user record as JSON.", None),
    ("json_schema", _object({"x": {"type": "number"}, "y": {"type": "number"}}),
     "Give a 2D point as JSON.", None),
    ("json_schema", _object({"status": {"const": "ok"}, "code": {"type": "integer",
                                                                "minimum": 100,
                                                                "maximum": 599}}),
     "Give an HTTP status as JSON.", None),
    ("json_schema", _object({"items": {"type": "array", "minItems": 1, "maxItems": 1,
                                       "items": _object({"sku": _string(4),
                                                         "qty": {"type": "integer",
                                                                 "minimum": 1,
                                                                 "maximum": 9}})}}),
     "Give a shopping order as JSON.", None),
    ("json_schema", {"type": "integer", "minimum": 1, "maximum": 10},
     "Rate pizza from 1 to 10.", None),
    ("json_schema", _object({"date": {"type": "string",
                                      "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
     "When did World War II end? Answer in JSON.", None),
    ("json_schema", _object({"name": _string(), "nickname": {"anyOf": [_string(),
                                                                       {"type": "null"}]}}),
     "Describe a dog as JSON.", None),
    ("regex", "(yes|no)", "Is water wet? Answer yes or no.", "(yes|no)"),
    ("regex", "[0-9]{3}-[0-9]{4}", "Make up a phone number.", "[0-9]{3}-[0-9]{4}"),
    ("regex", "[A-Z][a-z]{1,10}", "Name a planet.", "[A-Z][a-z]{1,10}"),
    ("regex", r"\d{1,3}(\.\d{1,3}){3}", "Give an IP address.", r"\d{1,3}(\.\d{1,3}){3}"),
    ("regex", "(red|green|blue), (red|green|blue)", "Name two colors.",
     "(red|green|blue), (red|green|blue)"),
    ("lark", 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,4}/\n', "What is 2 + 2?",
     r"The answer is [0-9]{1,4}\."),
    ("lark", 'start: item (", " item){0,3}\nitem: /[a-z]{1,10}/\n', "List some animals.",
     "[a-z]{1,10}(, [a-z]{1,10}){0,3}"),
]
INVALID = [("regex", "(unclosed", "invalid regex"),
           ("json_schema", {"type": "object", "properties": {"a": {"type": "frob"}}},
            "invalid json_schema")]


def _validate(value: Any, schema: dict) -> None:
    """JSON Schema validation for the keywords JOBS use (jsonschema when it is installed)."""
    try:
        import jsonschema
    except ImportError:
        _validate_subset(value, schema, "$")
    else:
        jsonschema.validate(value, schema)


TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _validate_subset(value: Any, schema: dict, where: str) -> None:
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return _validate_subset(value, option, where)
            except AssertionError as exc:
                errors.append(exc)
        raise AssertionError(f"{where}: matches no anyOf option: {errors}")
    kind = schema.get("type")
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "number":
        assert isinstance(value, int | float) and not isinstance(value, bool), where
    elif kind is not None:
        assert isinstance(value, TYPES[kind]), (where, value, kind)
    assert "enum" not in schema or value in schema["enum"], where
    assert "const" not in schema or value == schema["const"], where
    if isinstance(value, int | float):
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), where
    if isinstance(value, str):
        assert len(value) <= schema.get("maxLength", len(value)), where
        assert re.search(schema.get("pattern", ""), value), where
    if isinstance(value, list):
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
        for i, item in enumerate(value):
            _validate_subset(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        assert set(schema.get("required", ())) <= set(value), where
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(properties), where
        for key, item in value.items():
            _validate_subset(item, properties.get(key, {}), f"{where}.{key}")


def _grammar_args(jobs) -> list[str]:
    args = []
    for kind, source, *_ in jobs:
        text = source if isinstance(source, str) else json.dumps(source)
        args += ["--grammar", f"{kind}:{text}"]
    return args


@pytest.mark.slow
async def test_every_output_parses_and_validates_on_the_real_model(real_runner, built_modules):
    """22 grammars (objects, enums, arrays, nested objects, patterns, regexes, Lark) and two
    invalid ones in one instance, all generated side by side: each invalid grammar is an error
    result and every other output is complete and valid."""
    jobs = JOBS[:11] + [(kind, source, "Hello.", None) for kind, source, _ in INVALID] + JOBS[11:]
    prompts = [arg for job in jobs for arg in ("--prompt", job[2])]
    async with running_stack(real_runner) as stack:
        outcome, results = await _run_inferlet(
            stack, built_modules["constrained-decoding"], *_grammar_args(jobs), *prompts,
            "--chat", "--max-tokens", 40)
        stats = stack.controller.stats()
    assert len(results) == len(jobs) >= 20 + len(INVALID)
    assert [r["index"] for r in results] == list(range(len(jobs)))
    for (kind, source, _, pattern), result in zip(jobs, results, strict=True):
        invalid = [message for k, s, message in INVALID if (k, s) == (kind, source)]
        if invalid:
            assert result["error"].startswith(f"grammar_compile: {invalid[0]}"), result
            continue
        assert result.get("complete"), (source, result)
        text = result["text"]
        if kind == "json_schema":
            _validate(json.loads(text), source)
        else:
            assert re.fullmatch(pattern, text), (source, text)
    assert len([e for e in outcome.events if e["event"] == "message"]) == len(jobs)
    assert stats["pages_in_use"] == 0

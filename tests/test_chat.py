"""logo_engine.chat directly: message validation, prompt rendering, forced tool calls, the answer
parser (Hermes format and the tokenizer's response template), and stream hold-back."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import tiny

from logo_engine import InvalidRequestError, ToolCall
from logo_engine.chat import (
    TOOL_SYSTEM_PROMPT,
    ParsedAnswer,
    StreamFilter,
    has_chat_template,
    normalize_messages,
    parse_answer,
    parse_tool_calls,
    parse_with_response_template,
    render_prompt,
    template_supports_tools,
    tool_call_prefix,
    visible_text,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"units": {"type": "string"}, "city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
OPEN = '<tool_call>\n{"name": "'
FORCED_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": '


# --------------------------------------------------------------------------- messages
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", [{"role": "user", "content": "hi"}]),
        ([{"role": "system", "content": "s"}], [{"role": "system", "content": "s"}]),
        (
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": None}],
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}],
        ),
        (
            [{"role": "tool", "content": "3", "tool_call_id": "c"}],
            [{"role": "tool", "content": "3", "tool_call_id": "c"}],
        ),
    ],
)
def test_normalize_messages(prompt, expected):
    assert normalize_messages(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "empty"),
        ([], "empty list"),
        (b"bytes", "string or a list"),
        (3, "string or a list"),
        (["hi"], "mapping"),
        ([{"role": "narrator", "content": "x"}], "role 'narrator'"),
        ([{"role": "user", "content": 3}], "content must be a string"),
    ],
)
def test_normalize_messages_refuses(prompt, match):
    with pytest.raises(InvalidRequestError, match=match):
        normalize_messages(prompt)


# -------------------------------------------------------------------------- templates
@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()  # ChatML, no `tools` variable in its template


class _NoTemplate:
    chat_template = None


def test_template_probes(tok):
    assert has_chat_template(tok) and not has_chat_template(_NoTemplate())
    assert not template_supports_tools(tok)
    native = type("T", (), {"chat_template": {"default": "x", "tool_use": "{{ tools }}"}})()
    assert template_supports_tools(native)


def test_render_a_string_and_messages(tok):
    rendered = render_prompt(tok, "hello")
    assert rendered.text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.response_prefix == ""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert render_prompt(tok, messages).text == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_without_a_template():
    assert render_prompt(_NoTemplate(), "raw text").text == "raw text"  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="no chat template"):
        render_prompt(_NoTemplate(), [{"role": "user", "content": "x"}])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="tools need"):
        render_prompt(_NoTemplate(), "x", tools=[WEATHER])  # type: ignore[arg-type]


def test_tools_go_into_a_system_turn_and_history_is_written_as_text(tok):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    text = render_prompt(tok, history, tools=[WEATHER]).text
    system = "Be brief.\n\n" + TOOL_SYSTEM_PROMPT.format(tools=json.dumps(WEATHER))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
        f"<|im_start|>assistant\n{call}<|im_end|>\n<|im_start|>tool\nsunny<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # tool_choice="none": the tools are not shown at all.
    assert render_prompt(tok, "x", tools=[WEATHER], tool_choice="none").text == (
        render_prompt(tok, "x").text
    )


@pytest.mark.parametrize(
    ("tools", "choice", "prefix"),
    [
        ([WEATHER, TIME], None, ""),
        ([WEATHER, TIME], "auto", ""),
        ([WEATHER, TIME], "none", ""),
        ([WEATHER, TIME], "required", OPEN),
        ([WEATHER, TIME], "any", OPEN),
        # A named tool: its name, the arguments' brace and its first required parameter.
        ([WEATHER, TIME], "get_time", '<tool_call>\n{"name": "get_time", "arguments": {'),
        ([WEATHER, TIME], "get_weather", FORCED_WEATHER),
        # One tool and a forced call: that tool is forced, name included.
        ([WEATHER], "required", FORCED_WEATHER),
        ([WEATHER], "any", FORCED_WEATHER),
        ([], "required", ""),
    ],
)
def test_tool_call_prefix(tools, choice, prefix):
    assert tool_call_prefix(tools, choice) == prefix


def test_forced_prefix_ends_the_rendered_prompt(tok):
    rendered = render_prompt(tok, "x", tools=[WEATHER], tool_choice="required")
    assert rendered.response_prefix == FORCED_WEATHER
    # The forced opening continued by the model is a complete, parseable call.
    call = parse_answer(rendered.response_prefix + '"Oslo"}}\n</tool_call>').tool_calls[0]
    assert (call.name, call.arguments) == ("get_weather", {"city": "Oslo"})
    assert rendered.text.endswith("<|im_start|>assistant\n" + rendered.response_prefix)
    with pytest.raises(InvalidRequestError, match="not one of the tools"):
        tool_call_prefix([WEATHER], "get_time")
    with pytest.raises(InvalidRequestError, match="OpenAI function schema"):
        render_prompt(tok, "x", tools=[{"type": "function", "function": {}}])


# ----------------------------------------------------------------------- answer parser
def _call(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _shape(parsed: ParsedAnswer) -> tuple[str, list[tuple[str, dict]], list[tuple[Any, str]]]:
    return (
        parsed.content,
        [(c.name, c.arguments) for c in parsed.tool_calls],
        [(b.name, b.arguments) for b in parsed.invalid_tool_calls],
    )


BROKEN = '<tool_call>\n{"name": "get_weather", "argu'
PARSE_TABLE = [
    ("just text ", ("just text ", [], [])),  # no block: text unchanged, whitespace kept
    (_call("f", {"a": 1}), ("", [("f", {"a": 1})], [])),
    ("Sure. " + _call("f", {"a": "é"}) + " ", ("Sure.", [("f", {"a": "é"})], [])),
    (_call("f", {}) + "\n" + _call("g", {"b": [1]}), ("", [("f", {}), ("g", {"b": [1]})], [])),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}', ("", [("f", {"a": 1})], [])),  # unclosed
    ('<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', ("", [("f", {"a": 1})], [])),
    (  # arguments written as a JSON string
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        ("", [("f", {"a": 1})], []),
    ),
    ("Sure. " + BROKEN, ("Sure.", [], [("get_weather", BROKEN)])),
    (
        _call("f", {"a": 1}) + " then <tool_call>nonsense</tool_call> end",
        ("then  end", [("f", {"a": 1})], [(None, "<tool_call>nonsense</tool_call>")]),
    ),
    ('{"name": "f", "arguments": {"x": 2}}', ("", [("f", {"x": 2})], [])),  # a bare JSON call
    ('{"name": "f", "arguments": [1]}', ('{"name": "f", "arguments": [1]}', [], [])),
    ('{"not": "a call"}', ('{"not": "a call"}', [], [])),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_TABLE)
def test_parse_answer_table(text, expected):
    assert _shape(parse_answer(text)) == expected


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        ("<tool_call>{nope</tool_call>", "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', "no tool name"),
        ('<tool_call>{"name": "", "arguments": {}}</tool_call>', "no tool name"),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "not a JSON object"),
        ('<tool_call>{"name": "f", "arguments": "{x"}</tool_call>', "arguments are not valid JSON"),
    ],
)
def test_invalid_tool_calls_say_why(block, reason):
    (bad,) = parse_answer(block).invalid_tool_calls
    assert reason in bad.error and bad.arguments == block


def test_call_ids_are_unique_and_parse_tool_calls_is_the_same_parser():
    text = _call("f", {}) + _call("f", {})
    ids = [c.id for c in parse_answer(text).tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    content, calls = parse_tool_calls("Ok " + _call("g", {"a": 1}) + BROKEN)
    assert content == "Ok" and [c.name for c in calls] == ["g"]


# A response template in another format than Hermes: [CALL]{json}[/CALL].
RESPONSE_TEMPLATE = {
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "content": {},
        "tool_calls": {
            "open": "[CALL]",
            "close": "[/CALL]",
            "content": "json",
            "repeats": True,
            "transform": {"type": "function", "function": "{content}"},
        },
    },
}


@pytest.fixture()
def templated(tok):
    tok.response_template = RESPONSE_TEMPLATE
    yield tok
    tok.response_template = None


def test_the_tokenizer_response_template_is_used(templated):
    prefix = render_prompt(templated, "x", tools=[WEATHER]).text
    text = 'Sure. [CALL]{"name": "get_weather", "arguments": {"city": "Oslo"}}[/CALL]'
    parsed = parse_with_response_template(templated, text, prefix=prefix, tools=[WEATHER])
    assert _shape(parsed) == ("Sure.", [("get_weather", {"city": "Oslo"})], [])
    assert parsed.tool_calls[0].id.startswith("call_")
    # Hermes markup means nothing to this template: it is content.
    hermes = _call("get_weather", {})
    assert parse_with_response_template(templated, hermes, prefix=prefix).tool_calls == []
    # A call the template yields without a name is an invalid call, not a crash.
    nameless = parse_with_response_template(templated, '[CALL]{"x": 1}[/CALL]', prefix=prefix)
    assert nameless.tool_calls == [] and nameless.invalid_tool_calls[0].error == (
        "the tool call has no tool name"
    )


def test_an_answer_the_template_cannot_parse_is_read_as_hermes(templated):
    # Broken JSON inside the template's region makes parse_response raise.
    text = "[CALL]{oops[/CALL] " + _call("get_weather", {"city": "Rome"})
    parsed = parse_with_response_template(templated, text, prefix="")
    assert parsed == ParsedAnswer(
        "[CALL]{oops[/CALL]",
        [ToolCall(id=parsed.tool_calls[0].id, name="get_weather", arguments={"city": "Rome"})],
    )


# ------------------------------------------------------------------------ stream filter
@pytest.mark.parametrize(
    ("text", "visible"),
    [
        ("", ""),
        ("   ", ""),
        ("Hello", "Hello"),
        ("Hello <", "Hello "),
        ("Hello <tool", "Hello "),
        ("Hello <tool_call", "Hello "),
        ("Hello <tool_call>\n{", "Hello "),
        ("a < b", "a < b"),
        ("a <b>", "a <b>"),
        ("<tool_call>", ""),
        ('{"name": "f"', ""),
        ('  {"name"', ""),
        ("Sure. <tool_call>{} </tool_call> more", "Sure. "),
    ],
)
def test_visible_text(text, visible):
    assert visible_text(text) == visible


def test_visible_text_only_grows():
    answer = 'Let me check <b> then <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    shown = [visible_text(answer[:i]) for i in range(len(answer) + 1)]
    assert all(b.startswith(a) for a, b in itertools.pairwise(shown))
    assert shown[-1] == "Let me check <b> then "


def test_stream_filter_holds_markup_back_and_hands_out_the_rest_at_the_end():
    answer = "Let me check. " + _call("get_weather", {"city": "Oslo"})
    held = StreamFilter(hold_tool_calls=True)
    deltas = [held.push(answer[i : i + 3]) for i in range(0, len(answer), 3)]
    assert "".join(deltas) == held.shown == "Let me check. "
    assert held.final_delta(parse_answer(answer).content) == ""  # content "Let me check."
    plain = StreamFilter(hold_tool_calls=False)
    assert "".join(plain.push(answer[i : i + 5]) for i in range(0, len(answer), 5)) == answer
    # A bare JSON answer that turns out not to be a call is released at the end.
    bare = StreamFilter(hold_tool_calls=True)
    assert bare.push('{"no": "call"}') == ""
    assert bare.final_delta('{"no": "call"}') == '{"no": "call"}'


# ------------------------------------------------------------------- through the engines
def test_generations_carry_the_parsed_answer():
    from logo_engine.testing import ScriptedEngine

    engine = ScriptedEngine(["Sure. " + BROKEN])
    out = engine.generate("x", tools=[WEATHER])
    assert out.text == "Sure. " + BROKEN  # the raw text is kept as it was generated
    assert out.content == "Sure." and out.tool_calls == []
    assert [(b.name, b.arguments) for b in out.invalid_tool_calls] == [("get_weather", BROKEN)]
    plain = engine.generate("x")  # no tools: nothing is parsed
    assert plain.content == plain.text and not plain.invalid_tool_calls and not plain.tool_calls
    streamed = engine.stream("x", tools=[WEATHER])
    assert "".join(streamed) == out.text and streamed.generation.content == "Sure."


def test_logo_engine_parses_with_the_tokenizer_response_template(adapter_dir):
    from logo_engine import LoGoEngine

    tokenizer = tiny.tiny_tokenizer()
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir)
    text = 'Ok [CALL]{"name": "get_weather", "arguments": {"city": "Oslo"}}[/CALL]'
    request = engine._prepare("x", [WEATHER], None)
    assert request.tools == [WEATHER]
    assert engine._parse_answer(request, text).tool_calls == []  # Hermes: no call in there
    tokenizer.response_template = RESPONSE_TEMPLATE
    parsed = engine._parse_answer(request, text)
    assert _shape(parsed) == ("Ok", [("get_weather", {"city": "Oslo"})], [])
    assert engine._prepare("x", [WEATHER], "none").tools is None
    engine.close()

"""The stop-string logic of ``base.RowState`` directly, against a plain-string oracle: after each
decoded piece the text so far is searched for every stop string, and generation ends at the first
piece after which one occurs, cut before the earliest occurrence (so a stop that completes first
wins over one that would start earlier but is still incomplete, as in vLLM and transformers).
A stream never shows text that a later piece turns into (part of) a stop string."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logo_engine import InvalidRequestError
from logo_engine.base import RowState, SamplingParams


def oracle(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    """The answer cut as the decoder sees it, piece by piece, and whether a stop occurred."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [i for s in stops if (i := text.find(s)) != -1]
        if hits:
            return text[: min(hits)], True
    return text, False


def run(pieces: list[str], stops: tuple[str, ...]) -> tuple[RowState, list[str]]:
    """Push pieces as a decoder does, taking a delta after each; finish by length at the end."""
    row = RowState(stop=stops)
    deltas = []
    for piece in pieces:
        row.push(piece)
        deltas.append(row.take_delta())
        if row.done:
            break
    row.finish("length")
    deltas.append(row.take_delta())
    return row, deltas


@pytest.mark.parametrize(
    ("pieces", "stops", "text", "reason"),
    [
        (["Hello ", "wor", "ld"], ("world",), "Hello ", "stop"),  # a stop across pieces
        (["a", "b", "c", "d"], ("bc",), "a", "stop"),
        (["xab"], ("b", "ab"), "x", "stop"),  # the earliest start wins, not the first listed
        (["xa", "b"], ("b", "ab"), "x", "stop"),
        (["<<a", "<"], ("a", "<a<"), "<<", "stop"),  # "a" completes first: "<a<" never does
        (["<<a<"], ("a", "<a<"), "<", "stop"),  # both in one piece: the earliest start
        (["one", " two"], (), "one two", "length"),
        (["one", " two"], ("three",), "one two", "length"),
        (["END"], ("END",), "", "stop"),
    ],
)
def test_stop_table(pieces, stops, text, reason):
    row, deltas = run(pieces, stops)
    assert row.text == text and row.finish_reason == reason
    assert "".join(deltas) == text


def test_a_possible_stop_prefix_is_held_back_until_resolved():
    row = RowState(stop=("</s>",))
    row.push("answer <")
    assert row.take_delta() == "answer "  # "<" may start "</s>"
    row.push("/")
    assert row.take_delta() == ""
    row.push("b>")  # "</b>": not the stop after all
    assert row.take_delta() == "</b>"
    row.push(" </s> tail")
    assert row.done and row.finish_reason == "stop"
    assert row.take_delta() == " " and row.text == "answer </b> "


def test_token_counts_and_a_finished_row_ignore_later_pieces():
    row = RowState(stop=("!",))
    row.push("", n_tokens=1)  # a token that completes no character yet
    row.push("hi", n_tokens=1)
    row.push("!", n_tokens=1)
    row.push("more", n_tokens=1)
    assert row.completion_tokens == 3 and row.text == "hi"
    row.finish("length")
    assert row.finish_reason == "stop"  # the first reason stays


@settings(max_examples=300, deadline=None)
@given(
    answer=st.text("ab <>/", max_size=24),
    stops=st.lists(st.text("ab <>/", min_size=1, max_size=4), max_size=3).map(tuple),
    cuts=st.lists(st.integers(0, 24), max_size=8),
)
def test_any_split_gives_the_oracle_text(answer, stops, cuts):
    bounds = sorted({0, len(answer), *(c for c in cuts if c <= len(answer))})
    pieces = [answer[i:j] for i, j in itertools.pairwise(bounds)]
    row, deltas = run(pieces, stops)
    text, stopped = oracle(pieces, stops)
    assert row.text == text
    assert row.finish_reason == ("stop" if stopped else "length")
    shown = ""
    for delta in deltas:
        shown += delta
        assert text.startswith(shown)  # nothing shown is ever taken back
    assert shown == text


@pytest.mark.parametrize(
    ("stop", "expected"), [(None, ()), ("x", ("x",)), (["a", "b"], ("a", "b")), (("c",), ("c",))]
)
def test_sampling_params_normalise_stop(stop, expected):
    assert SamplingParams.build(8, None, None, None, stop).stop == expected


@pytest.mark.parametrize("stop", [[""], [3], 7])
def test_sampling_params_refuse_bad_stop(stop):
    with pytest.raises(InvalidRequestError, match="stop"):
        SamplingParams.build(8, None, None, None, stop)

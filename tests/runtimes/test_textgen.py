"""Incremental detokenization and stop strings (runtimes/textgen.py), on their own.

The properties a streamed answer needs: the deltas add up to the text of the
whole sequence, no delta carries half a character, and no delta carries any
part of a stop string, however the text is cut into chunks.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cachemesh.errors import InferenceInputError
from cachemesh.runtimes.textgen import (
    REPLACEMENT,
    IncrementalDecoder,
    StopStrings,
    parse_generate_request,
)
from tests.convert.models import CORPUS, train_tokenizer


@pytest.fixture(scope="module")
def byte_level():
    """Byte-level BPE learned on ASCII: any other character is several byte tokens."""
    return train_tokenizer()


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style tokenizer: spaces are '▁', dropped at a sequence's start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200,
                                                        special_tokens=["<unk>"]))
    return tok


def stream(decode, context: list[int], ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(decode, context)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_characters_split_across_byte_tokens_are_never_torn(byte_level):
    text = "the caf\u00e9 \u4e16\u754c \U0001f642 shards split \u00fc"
    ids = byte_level(text)["input_ids"]
    assert any(REPLACEMENT in byte_level.decode([i]) for i in ids), "no multi-token character"

    def decode(x):
        return byte_level.decode(x, skip_special_tokens=True)

    deltas = stream(decode, byte_level("a model")["input_ids"], ids)
    assert all(REPLACEMENT not in d for d in deltas), deltas
    assert "".join(deltas) == text
    # A character that never completes is flushed as the tokenizer shows it.
    decoder = IncrementalDecoder(decode)
    partial = byte_level("\u4e16")["input_ids"][:-1]
    assert "".join(decoder.push(i) for i in partial) == ""
    assert decoder.flush() == decode(partial)


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]),
                    max_size=40))
def test_deltas_add_up_to_the_decoded_text(byte_level, text):
    ids = byte_level(text)["input_ids"]
    deltas = stream(byte_level.decode, [], ids)
    assert "".join(deltas) == byte_level.decode(ids)
    assert all(REPLACEMENT not in d for d in deltas[:-1])


def test_the_prompt_gives_the_first_token_its_leading_space(metaspace):
    prompt = metaspace.encode("a model").ids
    continuation = metaspace.encode("a model cache pulls weights").ids[len(prompt):]
    assert metaspace.decode(continuation[:1]) == "cache"  # alone: the space is gone

    deltas = stream(metaspace.decode, prompt, continuation)
    assert "".join(deltas) == " cache pulls weights"
    # Without the prompt, the text starts as a sequence does.
    assert "".join(stream(metaspace.decode, [], continuation)) == "cache pulls weights"


def test_stop_strings_across_chunks():
    stops = StopStrings(["o w", "xyz"])
    out = [stops.feed(t) for t in ("hel", "lo", " ", "wo", "rld")]
    assert "".join(out) == "hell" and stops.stopped
    assert out[1] == "l"  # "o" is held back: it may start "o w"
    assert stops.flush() == ""
    stops = StopStrings(["xyz"])
    assert stops.feed("abcx") == "abc"
    assert stops.feed("y") == ""
    assert stops.flush() == "xy"  # generation ended: the held text was not a stop
    # The earliest stop wins, whichever is listed first.
    assert StopStrings(["cd", "b"]).feed("abcd") == "a"


@settings(max_examples=200, deadline=None)
# a stop completes (" ") while a longer one that starts earlier ("a  ") is pending
@example(text="aaa  ", stops=[" ", "a  "], cuts=[4])
@given(text=st.text("abc ", max_size=30), stops=st.lists(st.text("abc ", min_size=1,
                                                                  max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_chunking_never_changes_where_the_text_stops(text, stops, cuts):
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    want = text[:min(hits)] if hits else text
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher = StopStrings(stops)
    out = []
    for a, b in itertools.pairwise(bounds):
        piece = matcher.feed(text[a:b])
        out.append(piece)
        assert want.startswith("".join(out))  # nothing sent is ever taken back
    out.append(matcher.flush())
    assert "".join(out) == want
    assert matcher.stopped == bool(hits)


@pytest.mark.parametrize("payload, defaults", [
    ({"kind": "completion", "prompt": ""}, {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                                            "stop": [], "seed": None}),
    ({"kind": "completion", "prompt": "x", "stop": "\n", "max_tokens": 3, "temperature": 0,
      "top_p": 0.5, "seed": 9}, {"max_tokens": 3, "temperature": 0.0, "top_p": 0.5,
                                 "stop": ["\n"], "seed": 9}),
])
def test_defaults_are_openais(payload, defaults):
    request = parse_generate_request(payload)
    assert {k: getattr(request, k) for k in defaults} == defaults


def test_a_payload_must_be_an_object():
    with pytest.raises(InferenceInputError, match="JSON object"):
        parse_generate_request(["completion"])

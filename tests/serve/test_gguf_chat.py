"""A real model through the server: SmolLM2, converted from its GGUF, over the OpenAI API.

One server for the module serves the converted SmolLM2-135M-Instruct (``smollm2``,
the session's conversion) and a tiny Llama whose weights spell out one answer
(``speller``: ``tests.runtimes.llms.spelling_llama``), both through the real
``openai`` client. Greedy decoding makes every answer the same on every run,
so a streamed answer, joined, must equal the one sent whole, and no chunk may
carry U+FFFD (half a character).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cachemesh.serve.core.registry import ModelSpec
from tests.convert.gguf_models import Converted, smollm2
from tests.runtimes.llms import spelling_llama
from tests.serve.conftest import RunningServer, serve_settings

__all__ = ["smollm2"]  # the session fixture, shared here

pytestmark = pytest.mark.slow

REPLACEMENT = "\ufffd"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
# SmolLM2 answers this in kana, each character cut into two byte-level tokens.
KANA = [{"role": "user", "content": "Write the Japanese word for cat, in Japanese script."}]
SPELL = [{"role": "user", "content": "spell it"}]
SPELLED = "caf\u00e9\u4e16\u754c!"  # é: 2 byte tokens, 世 and 界: 3 each


@pytest.fixture(scope="module")
def server(smollm2: Converted, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    speller = spelling_llama(tmp_path_factory.mktemp("speller") / "speller", SPELL, SPELLED)
    specs = [ModelSpec(name="smollm2", source=str(smollm2.view), eager=True),
             ModelSpec(name="speller", source=str(speller), eager=True)]
    # The session's store: the converted files are blobs there already (no second copy).
    settings = serve_settings(Path(smollm2.settings.home), workers=1)
    with RunningServer(settings, specs) as running:
        running.wait_ready(timeout=120)
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def whole_and_streamed(client: openai.OpenAI, model: str, messages: list[dict[str, str]],
                       max_tokens: int) -> tuple[str, list[str]]:
    """The greedy answer sent whole, and the same request's streamed chunks."""
    reply = client.chat.completions.create(model=model, messages=messages,
                                           max_tokens=max_tokens, temperature=0)
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True)
        if c.choices]
    return reply.choices[0].message.content or "", chunks


def test_the_converted_model_knows_the_capital_of_france(client: openai.OpenAI):
    reply = client.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=32,
                                           temperature=0)
    answer = reply.choices[0].message.content
    assert "Paris" in answer, answer
    assert reply.choices[0].finish_reason == "stop"  # it ended its turn, <|im_end|>
    assert 0 < reply.usage.completion_tokens < 32 and reply.usage.prompt_tokens > 20


@pytest.mark.parametrize("messages, max_tokens", [(PARIS, 32), (KANA, 16)],
                         ids=["paris", "kana"])
def test_a_streamed_answer_joins_to_the_answer_sent_whole(client: openai.OpenAI, smollm2,
                                                          messages, max_tokens):
    whole, chunks = whole_and_streamed(client, "smollm2", messages, max_tokens)
    assert whole and "".join(chunks) == whole
    assert all(REPLACEMENT not in c for c in chunks), chunks
    assert REPLACEMENT not in whole
    if messages is KANA:
        # What makes this case worth testing: the answer's characters span several tokens.
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm2.view)
        ids = tokenizer(whole)["input_ids"]
        assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids), whole


def test_a_character_cut_across_tokens_is_streamed_whole(client: openai.OpenAI):
    from tests.convert.models import train_tokenizer

    tokenizer = train_tokenizer()  # the speller's: byte-level BPE learned on ASCII
    ids = tokenizer(SPELLED, add_special_tokens=False)["input_ids"]
    assert sum(REPLACEMENT in tokenizer.decode([i]) for i in ids) >= 6  # é, 世, 界 torn alone

    whole, chunks = whole_and_streamed(client, "speller", SPELL, 32)
    assert whole == SPELLED
    assert "".join(chunks) == SPELLED
    assert all(REPLACEMENT not in c for c in chunks), chunks
    # The model streamed token by token: the characters arrived in several chunks.
    assert len([c for c in chunks if c]) >= 5, chunks

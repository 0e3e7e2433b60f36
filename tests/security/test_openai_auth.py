"""The OpenAI endpoints behind the server's tokens, through the real ``openai`` client.

``/v1`` is inference-class (``serve/adapters/auth.py``): the client's ``api_key`` is its
bearer token; a protected bucket's models are seen with that bucket's token in
``X-Cachemesh-Bucket-Token`` (the client's ``default_headers``).
"""

from __future__ import annotations

import openai
import pytest

from tests.security.conftest import (
    BUCKET_TOKEN,
    CONTROL_TOKEN,
    INFERENCE_TOKEN,
    METRICS_TOKEN,
    SECRETS,
)

HELLO = [{"role": "user", "content": "hello tiny world"}]


def client(secured, api_key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=secured.url + "/v1", api_key=api_key, max_retries=0,
                         timeout=30, default_headers=headers or None)


def test_the_inference_token_opens_v1(secured):
    c = client(secured, INFERENCE_TOKEN)
    r = c.chat.completions.create(model="parrot", messages=HELLO, max_tokens=8)
    assert r.choices[0].message.content == "hello tiny world"
    chunks = list(c.chat.completions.create(model="parrot", messages=HELLO, max_tokens=8,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip() \
        == "hello tiny world"
    vectors = c.embeddings.create(model="parrot", input=["ab", "abc"], encoding_format="float")
    assert [d.embedding[0] for d in vectors.data] == [2.0, 3.0]
    assert client(secured, CONTROL_TOKEN).models.list().data  # control is good everywhere


@pytest.mark.parametrize("key,error", [
    ("not-a-token-of-this-server", openai.AuthenticationError),
    (METRICS_TOKEN, openai.PermissionDeniedError),
])
def test_other_keys_are_refused_without_leaking(secured, key, error):
    with pytest.raises(error) as err:
        client(secured, key).completions.create(model="parrot", prompt="hi", max_tokens=2)
    for secret in SECRETS:
        assert secret not in str(err.value)


def test_a_protected_bucket_shows_only_with_its_token(secured):
    plain = {m.id for m in client(secured, INFERENCE_TOKEN).models.list()}
    assert "parrot" in plain and "secret" not in plain
    with pytest.raises(openai.NotFoundError):
        client(secured, INFERENCE_TOKEN).models.retrieve("secret")
    both = {m.id for m in client(secured, INFERENCE_TOKEN,
                                 **{"X-Cachemesh-Bucket-Token": BUCKET_TOKEN}).models.list()}
    assert "secret" in both

"""The models commands' client: the control API's ControlClient, with the command line's
own hint on a 401 (the commands themselves, against a real server: tests/blackbox/)."""

from __future__ import annotations

import httpx
import pytest

from cachemesh import errors as e
from cachemesh.cli.models import TOKEN_HINT
from cachemesh.client import ControlClient


def refusing(token: str | None, hint: str | None) -> ControlClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(
        401, json={"error": "the bearer token is not valid"},
        headers={"WWW-Authenticate": 'Bearer realm="cachemesh", error="invalid_token"'}))
    return ControlClient("http://cachemesh.invalid", token=token, transport=transport,
                         unauthorized_hint=hint)


@pytest.mark.parametrize("token", [None, "a-token"])
def test_a_401_carries_the_command_lines_hint_whether_a_token_was_sent_or_not(token):
    with pytest.raises(e.UnauthorizedError) as info:
        refusing(token, TOKEN_HINT).list_models()
    assert str(info.value) == ("the bearer token is not valid (set CACHEMESH_API_TOKEN)"
                               " (HTTP 401)")
    assert info.value.invalid


def test_without_a_hint_the_client_says_its_own_only_when_no_token_was_sent():
    with pytest.raises(e.UnauthorizedError, match=r"valid \(HTTP 401\)$"):
        refusing("a-token", None).list_models()
    with pytest.raises(e.UnauthorizedError, match="the server wants a token"):
        refusing(None, None).list_models()

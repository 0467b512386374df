"""engines.protocol / engines.errors: body validation and the error type (no vLLM, no Ray)."""

from __future__ import annotations

import pickle

import pytest

from engines.errors import BadRequest, find_bad_request
from engines.protocol import parse_chat, parse_completion, routing_text, session_of


def test_chat_body_parses():
    p = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                           "text": "b"}]}],
                    "max_tokens": 3, "stream": True, "user": "u1", "cache_salt": "t"})
    assert p.messages == ({"role": "user", "content": "ab"},)
    assert p.sampling.max_tokens == 3 and p.stream and p.session_id == "u1" and p.cache_salt == "t"


@pytest.mark.parametrize("body,fragment", [
    ([], "JSON object"),
    ({}, "'messages' is required"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "x", "content": "a"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "a"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "a"}], "n": 2}, "n=1"),
])
def test_bad_chat_bodies_name_the_field(body, fragment):
    with pytest.raises(BadRequest) as info:
        parse_chat(body)
    assert info.value.status == 400 and fragment in info.value.message


def test_completion_prompts():
    assert parse_completion({"prompt": "hi"}).prompt == "hi"
    assert parse_completion({"prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    assert parse_completion({"prompt": ["hi"]}).prompt == "hi"
    for bad in ({}, {"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": [1, -2]}, {"prompt": [True]}):
        with pytest.raises(BadRequest):
            parse_completion(bad)


def test_session_precedence_and_routing_text():
    body = {"session_id": "s", "user": "u", "messages": [{"role": "system", "content": "S"},
                                                         {"role": "user", "content": "U"}]}
    assert session_of({"x-session-id": "h"}, body) == "h"
    assert session_of({}, body) == "s"
    assert session_of(None, {"user": "u"}) == "u"
    assert session_of(None, {}) is None
    assert routing_text(body) == "system: S\nuser: U\n"
    assert routing_text({"prompt": [1, 2]}) == "1 2"


def test_bad_request_survives_pickling_and_wrapping():
    err = pickle.loads(pickle.dumps(BadRequest(404, "no such model", param="model")))
    assert (err.status, err.message, err.param) == (404, "no such model", "model")
    assert err.to_openai()["error"]["code"] == 404

    class Wrapper(Exception):
        def __init__(self, cause):
            self.cause = cause

    assert find_bad_request(Wrapper(err)) is err
    assert find_bad_request(ValueError("x")) is None

"""The official `openai` Python client against a running llorch stack.

Starts nothing: the gateway's URL comes from LLORCH_GATEWAY_URL (clients/run.sh starts the
three real services and sets it). Run with `python -m pytest clients/python/test_openai.py`.
"""

import json
import os
import urllib.request
import uuid

import openai
import pytest

GATEWAY = os.environ["LLORCH_GATEWAY_URL"].rstrip("/")
PROMPT = "Hello."


@pytest.fixture(scope="module")
def client():
    # No key is checked; the client insists on one.
    return openai.OpenAI(base_url=f"{GATEWAY}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def post_json(path, body):
    req = urllib.request.Request(
        GATEWAY + path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read().decode()


def execute_text(prompt, max_tokens):
    """The text the worker API's /execute streams for the same greedy request."""
    body = {"job_id": f"ref-{uuid.uuid4()}", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0}
    events = [json.loads(line[len("data: "):])
              for line in post_json("/execute", body).splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "end", events[-1]
    return "".join(e["t"] for e in events if e["type"] == "token")


def prompt_ids(text):
    return json.loads(post_json("/tokenize", {"prompt": text}))["tokens"]


def test_models_lists_the_served_model_with_its_context(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].object == "model"
    assert models[0].model_extra["context_length"] == 1024


def test_greedy_completion_is_the_reference_text_with_usage(client, model):
    want = execute_text(PROMPT, 24)
    c = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert c.object == "text_completion"
    assert c.choices[0].text == want
    assert c.choices[0].finish_reason == "length"
    n = len(prompt_ids(PROMPT))
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (n, 24, n + 24)


def test_streamed_completion_is_the_same_text_with_usage(client, model):
    want = execute_text(PROMPT, 24)
    chunks = list(client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == want
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 24
    assert len(chunks) > 3, "streamed token by token"


def test_logprobs_have_the_openai_shape(client, model):
    c = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert len(lp.text_offset) == 6 and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 1 <= len(top) <= 3
        assert top[token] == logprob == max(top.values()), "greedy takes the top token"


def test_a_stop_string_cuts_the_text(client, model):
    full = execute_text(PROMPT, 24)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    c = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                  stop=[stop])
    assert c.choices[0].text == full[: full.index(stop)]
    assert c.choices[0].finish_reason == "stop"


def test_a_token_id_prompt_gives_the_text_prompt_result(client, model):
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=model, prompt=prompt_ids(PROMPT), max_tokens=8,
                                       temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage == by_text.usage


def test_extensions_pass_through_extra_body(client, model):
    # top_k=1 is greedy whatever the temperature.
    want = execute_text(PROMPT, 8)
    c = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=1.5,
                                  seed=7, extra_body={"top_k": 1})
    assert c.choices[0].text == want


@pytest.mark.parametrize("params", [
    {"temperature": 5},
    {"top_p": 1.5},
    {"logprobs": 6},
    {"presence_penalty": 3},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"n": 2},
    {"prompt": ""},
])
def test_bad_parameters_raise_bad_request(client, model, params):
    args = {"model": model, "prompt": PROMPT, "max_tokens": 4, **params}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["param"] == next(iter(params))


def test_a_context_overflow_names_both_numbers(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1023)
    assert e.value.code == "context_length_exceeded"
    assert "1023" in e.value.message and "1024" in e.value.message


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found"


def test_chat_is_refused_with_a_reason(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert "chat template" in e.value.message

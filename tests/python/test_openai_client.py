"""The official `openai` Python client against a running `minnow serve`.

Run by crates/serve/tests/openai_python.rs, which starts the server and sets
MINNOW_BASE_URL (".../v1"), MINNOW_API_KEY and MINNOW_MODEL_ID. Works under
pytest or as a plain script (`python3 test_openai_client.py`), which runs
every test_* function and ends with an "N passed, N failed" line.
"""

import json
import os
import sys
import urllib.request

import openai
import pydantic

BASE_URL = os.environ.get("MINNOW_BASE_URL", "http://127.0.0.1:8080/v1")
API_KEY = os.environ.get("MINNOW_API_KEY", "none")
MODEL = os.environ.get("MINNOW_MODEL_ID", "smollm2")


def client(key=API_KEY):
    # No retries: a 429 or 5xx must show up here, not be papered over.
    return openai.OpenAI(base_url=BASE_URL, api_key=key, max_retries=0, timeout=300)


def test_models_lists_the_served_model():
    ids = [m.id for m in client().models.list().data]
    assert ids == [MODEL], ids


def test_chat_completion():
    r = client().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=16,
    )
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content, r
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_text_completion():
    r = client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8


def test_streaming_chat_matches_non_streaming():
    messages = [{"role": "user", "content": "Write a haiku about rivers."}]
    whole = client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
    stream = client().chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert chunks > 2
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion():
    stream = client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    whole = client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert text == whole.choices[0].text


def test_n_equals_two():
    r = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name an animal."}],
        n=2,
        temperature=1.0,
        seed=7,
        max_tokens=8,
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content is not None for c in r.choices)


def test_logprobs():
    r = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say yes."}],
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert content, r
    for t in content:
        assert t.logprob <= 0.0
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy
    c = client().completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == c.choices[0].text


def test_errors_are_openai_exceptions():
    try:
        client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "temperature", e.body
        assert "temperature" in e.message
    else:
        raise AssertionError("temperature=5 was accepted")
    try:
        client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded", e.body
    else:
        raise AssertionError("context overflow was accepted")
    try:
        client(key="wrong-key").models.list()
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    else:
        raise AssertionError("a wrong key was accepted")


ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "quantity": {"type": "integer"},
        "city": {"type": "string"},
        "delivery_date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    },
    "required": ["customer", "quantity", "city", "delivery_date"],
    "additionalProperties": False,
}
ORDER_MESSAGE = (
    "Extract the order as JSON (customer, quantity, city, delivery_date as YYYY-MM-DD).\n\n"
    "Message: Hi, this is Ruth Adebayo from Lisbon. Please send 7 desk fans by 2026-03-14."
)


def check_order(o):
    assert set(o) == {"customer", "quantity", "city", "delivery_date"}, o
    assert isinstance(o["customer"], str) and isinstance(o["city"], str), o
    assert isinstance(o["quantity"], int) and not isinstance(o["quantity"], bool), o
    d = o["delivery_date"]
    assert len(d) == 10 and d[4] == "-" and d[7] == "-" and (d[:4] + d[5:7] + d[8:]).isdigit(), o


def test_response_format_json_schema():
    r = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ORDER_MESSAGE}],
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True}},
        temperature=0,
        max_tokens=120,
    )
    assert r.choices[0].finish_reason == "stop", r
    check_order(json.loads(r.choices[0].message.content))
    # /metrics counts the constrained request and the keys it forced.
    base = BASE_URL.rsplit("/v1", 1)[0]
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        metrics = dict(
            line.split()[:2] for line in resp.read().decode().splitlines() if line and not line.startswith("#")
        )
    assert float(metrics["minnow_constrained_requests_total"]) >= 1, metrics
    assert float(metrics["minnow_forced_tokens_total"]) >= 4, metrics
    assert float(metrics["minnow_mask_seconds_total"]) > 0, metrics


class Order(pydantic.BaseModel):
    customer: str
    quantity: int
    city: str


def test_parse_with_a_pydantic_model():
    r = client().chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": ORDER_MESSAGE}],
        response_format=Order,
        temperature=0,
        max_tokens=120,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Order), r
    assert parsed.customer and parsed.city, parsed


def test_response_format_json_object():
    r = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A cat named Tom is 3 years old. Give his name and age as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    assert r.choices[0].finish_reason == "stop", r
    assert isinstance(json.loads(r.choices[0].message.content), dict), r


def test_structured_outputs_choice_and_regex():
    options = ["positive", "negative", "neutral"]
    for seed in range(3):
        r = client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Is 'I love this phone' positive or negative?"}],
            extra_body={"structured_outputs": {"choice": options}},
            temperature=1.0,
            seed=seed,
            max_tokens=10,
        )
        assert r.choices[0].message.content in options, r
    r = client().completions.create(
        model=MODEL,
        prompt="The year the first moon landing happened was",
        extra_body={"structured_outputs": {"regex": " [0-9]{4}"}},
        temperature=0,
        max_tokens=10,
    )
    t = r.choices[0].text
    assert len(t) == 5 and t[0] == " " and t[1:].isdigit(), r


def token_id(text):
    base = BASE_URL.rsplit("/v1", 1)[0]
    req = urllib.request.Request(
        base + "/tokenize",
        data=json.dumps({"content": text}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        ids = json.loads(resp.read())["tokens"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_logit_bias_bans_and_forces_a_token():
    prompt = "The capital of France is"
    plain = client().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1, logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    banned = client().completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=1, logprobs=0, logit_bias={str(token_id(first)): -100}
    )
    assert banned.choices[0].logprobs.tokens[0] != first, banned
    forced_id = token_id(" banana")
    forced = client().completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=3, logit_bias={str(forced_id): 100}
    )
    assert forced.choices[0].text == " banana" * 3, forced


def test_bad_constraints_are_400s_naming_the_parameter():
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "response_format"),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: undefined_rule"}}}, "structured_outputs"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias.99999999"),
    ]
    for kwargs, param in bad:
        try:
            client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, **kwargs
            )
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body["param"] == param, (kwargs, e.body)
        else:
            raise AssertionError(f"{kwargs} was accepted")


if __name__ == "__main__":
    import runner

    sys.exit(runner.main(globals()))

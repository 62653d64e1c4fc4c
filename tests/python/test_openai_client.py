"""The official `openai` Python client against a running `minnow serve`.

Run by crates/serve/tests/openai_python.rs, which starts the server and sets
MINNOW_BASE_URL (".../v1"), MINNOW_API_KEY and MINNOW_MODEL_ID. Works under
pytest or as a plain script (`python3 test_openai_client.py`), which runs
every test_* function and ends with an "N passed, N failed" line.
"""

import os
import sys
import traceback

import openai

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


def main():
    tests = [(name, f) for name, f in sorted(globals().items()) if name.startswith("test_") and callable(f)]
    passed = failed = 0
    for name, f in tests:
        try:
            f()
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Stored completions through the official `openai` Python client against a
running `minnow serve --store DIR`.

Run by crates/serve/tests/openai_python.rs (which starts the server with an
empty store and sets MINNOW_BASE_URL, MINNOW_API_KEY, MINNOW_MODEL_ID).
Covers OpenAI's stored-completions API as the client calls it:
`chat.completions.create(store=True, metadata=...)`, `.list()` with its
filters and automatic pagination, `.retrieve()`, `.update()`, `.delete()`
and `.messages.list()`. The functions run in name order (runner.py), hence their numbers: each
builds on what the ones before stored.
"""

import os
import sys

import openai

BASE_URL = os.environ.get("MINNOW_BASE_URL", "http://127.0.0.1:8080/v1")
API_KEY = os.environ.get("MINNOW_API_KEY", "none")
MODEL = os.environ.get("MINNOW_MODEL_ID", "smollm2")

STORED = []


def client(key=API_KEY):
    return openai.OpenAI(base_url=BASE_URL, api_key=key, max_retries=0, timeout=300)


def test_1_stored_requests_are_answered_and_kept():
    c = client()
    for i in range(5):
        task = "orders" if i % 2 == 0 else "support"
        messages = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Name a color, number {i}."},
        ]
        if i == 4:
            # A streamed answer is stored too, in its non-streaming form.
            stream = c.chat.completions.create(
                model=MODEL, messages=messages, temperature=0, max_tokens=6, stream=True,
                store=True, metadata={"task": task, "i": str(i)},
            )
            rid, text = None, ""
            for chunk in stream:
                rid = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            STORED.append((rid, task, text, messages))
        else:
            r = c.chat.completions.create(
                model=MODEL, messages=messages, temperature=0, max_tokens=6,
                store=True, metadata={"task": task, "i": str(i)},
            )
            STORED.append((r.id, task, r.choices[0].message.content, messages))
    # Not stored: no `store`.
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_2_list_filters_and_pages_as_the_client_iterates():
    c = client()
    every = list(c.chat.completions.list(limit=2))  # pages of 2, followed by the client
    assert [x.id for x in every] == [s[0] for s in STORED], [x.id for x in every]
    orders = c.chat.completions.list(metadata={"task": "orders"}, limit=100)
    assert [x.id for x in orders.data] == [s[0] for s in STORED if s[1] == "orders"]
    assert orders.has_more is False
    newest = c.chat.completions.list(order="desc", limit=1)
    assert newest.data[0].id == STORED[-1][0] and newest.has_more is True
    assert [x.id for x in c.chat.completions.list(model=MODEL, limit=100).data] == [s[0] for s in STORED]
    assert c.chat.completions.list(model="another-model").data == []


def test_3_retrieve_gives_the_answer_and_metadata():
    c = client()
    for rid, task, text, _ in STORED:
        r = c.chat.completions.retrieve(rid)
        assert r.id == rid and r.object == "chat.completion"
        assert r.choices[0].message.content == text, (r.choices[0].message.content, text)
        assert r.metadata["task"] == task
        assert r.usage.completion_tokens >= 1


def test_4_messages_lists_what_was_sent():
    c = client()
    rid, _, _, sent = STORED[1]
    got = list(c.chat.completions.messages.list(rid, limit=1))  # paged one by one
    assert [(m.role, m.content) for m in got] == [(m["role"], m["content"]) for m in sent], got
    assert got[0].id == f"{rid}-0"


def test_5_update_replaces_the_metadata():
    c = client()
    rid = STORED[0][0]
    r = c.chat.completions.update(rid, metadata={"task": "orders", "reviewed": "yes"})
    assert r.metadata == {"task": "orders", "reviewed": "yes"}, r.metadata
    assert c.chat.completions.retrieve(rid).metadata["reviewed"] == "yes"
    assert [x.id for x in c.chat.completions.list(metadata={"reviewed": "yes"}).data] == [rid]


def test_6_delete_removes_and_a_missing_id_is_404():
    c = client()
    rid = STORED[2][0]
    d = c.chat.completions.delete(rid)
    assert d.deleted is True and d.id == rid and d.object == "chat.completion.deleted"
    try:
        c.chat.completions.retrieve(rid)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("a deleted completion was still there")
    assert rid not in [x.id for x in c.chat.completions.list(limit=100).data]


def test_7_the_store_needs_the_key():
    try:
        client(key="wrong").chat.completions.list()
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("listed without the key")


if __name__ == "__main__":
    import runner

    sys.exit(runner.main(globals()))

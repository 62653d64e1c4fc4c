"""Tool calling through the official `openai` Python client against a running
`minnow serve` of Qwen2.5-Coder-1.5B-Instruct.

Run by crates/serve/tests/openai_python.rs (which starts the server and sets
MINNOW_BASE_URL, MINNOW_API_KEY and MINNOW_MODEL_ID); also runs under pytest
or as a plain script, ending with an "N passed, N failed" line.

The questions are written for this test and are not in any prompt the
server's code was tuned on; arguments are checked against each tool's schema
by pydantic (the client's own `pydantic_function_tool` builds the tools).
"""

import json
import os
import sys
from typing import Literal

import openai
import pydantic

BASE_URL = os.environ.get("MINNOW_BASE_URL", "http://127.0.0.1:8080/v1")
API_KEY = os.environ.get("MINNOW_API_KEY", "none")
MODEL = os.environ.get("MINNOW_MODEL_ID", "qwen")


def client():
    return openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=600)


class GetWeather(pydantic.BaseModel):
    """Current weather in a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"]


class ConvertCurrency(pydantic.BaseModel):
    """Convert an amount of money from one currency to another (ISO codes)."""

    amount: float
    source: str
    target: str


SCHEMAS = {"GetWeather": GetWeather, "ConvertCurrency": ConvertCurrency}
TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(ConvertCurrency)]


def ask(question, **kw):
    kw = {"temperature": 0, "max_tokens": 120, **kw}
    return client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], tools=TOOLS, **kw)


def checked_calls(message):
    """The message's calls, each argument object validated against its tool."""
    assert message.tool_calls, message
    out = []
    for c in message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_"), c
        args = SCHEMAS[c.function.name].model_validate_json(c.function.arguments)
        out.append((c.function.name, args))
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls), "ids are unique"
    return out


def test_required_calls_a_tool_with_valid_arguments():
    for question, want in [
        ("Do I need an umbrella in Valparaíso right now? Answer in celsius.", "GetWeather"),
        ("What do 75 Swiss francs come to in Canadian dollars?", "ConvertCurrency"),
    ]:
        r = ask(question, tool_choice="required", parallel_tool_calls=False)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls", ch
        assert ch.message.content is None, ch.message
        calls = checked_calls(ch.message)
        assert [n for n, _ in calls] == [want], (question, calls)


def test_a_named_function_is_called():
    r = ask(
        "I'm flying to Hanoi tomorrow.",
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
    )
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    [(name, args)] = checked_calls(ch.message)
    assert name == "GetWeather" and "hanoi" in args.city.lower(), args


def test_parse_gives_pydantic_arguments():
    r = client().chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Turn 1,200 Mexican pesos into euros, please."}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    call = r.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, ConvertCurrency), call
    assert call.function.parsed_arguments.amount == 1200, call


def test_the_follow_up_turn_uses_the_tool_result():
    messages = [{"role": "user", "content": "What's the weather in Tallinn? Celsius."}]
    first = client().chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120
    )
    msg = first.choices[0].message
    checked_calls(msg)
    messages.append(msg.model_dump(exclude_none=True))
    messages.append(
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": json.dumps({"temp_c": 17, "sky": "overcast"})}
    )
    # This model, offered the tools again, repeats its call; `none` asks
    # for the answer (the tools stay in the request, as an agent sends them).
    second = client().chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=80
    )
    ch = second.choices[0]
    assert ch.finish_reason == "stop" and not ch.message.tool_calls, ch
    # Both facts come only from the tool's result.
    assert "17" in ch.message.content and "overcast" in ch.message.content.lower(), ch.message.content


def test_streamed_calls_reassemble_to_the_whole_reply():
    question = "Convert 40 US dollars to Japanese yen, and tell me the weather in Kyoto in celsius."
    whole = ask(question, tool_choice="required")
    want = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert len(want) == 2, want
    # The client's own stream helper reassembles the deltas.
    with client().chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    ) as stream:
        final = stream.get_final_completion()
    got = [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls]
    assert got == want, (got, want)
    assert final.choices[0].finish_reason == "tool_calls"
    # And by hand, from the raw chunks.
    chunks = list(ask(question, tool_choice="required", stream=True))
    calls = {}
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            c["id"] = c["id"] or d.id
            if d.function.name:
                c["name"] += d.function.name
            c["arguments"] += d.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == want, calls
    assert all(c["id"] for c in calls.values())
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_none_answers_in_text():
    r = ask("Say hello in French, one word.", tool_choice="none", max_tokens=10)
    ch = r.choices[0]
    assert not ch.message.tool_calls and ch.message.content, ch


def test_bad_tool_requests_are_400s_naming_the_parameter():
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(messages=user, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "Nope"}}), "tool_choice.function.name"),
        (dict(messages=user, tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
        (dict(messages=user + [{"role": "tool", "content": "42"}], tools=TOOLS), "messages[1].tool_call_id"),
        (
            dict(messages=user, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}], tool_choice="required"),
            "tools",
        ),
    ]
    for kwargs, param in cases:
        try:
            client().chat.completions.create(model=MODEL, max_tokens=5, **kwargs)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body["param"] == param, (param, e.body)
        else:
            raise AssertionError(f"{param}: accepted")


if __name__ == "__main__":
    import runner

    sys.exit(runner.main(globals()))

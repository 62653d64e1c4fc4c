//! Tool calls on the real models: Qwen2.5's chat template renders the tools,
//! an assistant turn's calls and the tools' answers; a model whose template
//! has no tools section gets them in its system message; a forced call
//! (`required`, a named function) parses into the right function with
//! arguments valid against its schema (Qwen2.5-Coder-0.5B, held-out
//! requests); `auto` lets text through and constrains a call once it opens.

mod common;

use minnow_engine::chat::ChatMessage;
use minnow_engine::generate::{generate, GenerateParams};
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::SamplingParams;
use minnow_engine::tools::{choice_constraint, parse_reply, ToolChoice};
use minnow_kernels::pool::ThreadPool;
use serde_json::{json, Value};

fn load(name: &str) -> LoadedModel {
    LoadedModel::load(&common::model_path(&format!("{name}.gguf"))).unwrap()
}

fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}),
        json!({"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount",
            "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                "from": {"type": "string"}, "to": {"type": "string"}}, "required": ["amount", "from", "to"]}}}),
    ]
}

#[test]
fn templates_render_tools_calls_and_answers() {
    let qwen = load("qwen2.5-coder-0.5b-instruct-q4_k_m");
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls = Some(json!([{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]));
    let mut answer = ChatMessage::new("tool", "22 degrees, sunny");
    answer.tool_call_id = Some("call_1".into());
    let messages = [ChatMessage::new("user", "Weather in Paris?"), call, answer];
    let ids = qwen.chat_prompt_with_tools(&messages, Some(&tools())).unwrap();
    let text = qwen.tokenizer.decode(&ids);
    assert!(text.contains("# Tools") && text.contains("<tools>\n{"), "{text}");
    assert!(text.contains(r#""name": "convert_currency""#), "the template writes every tool: {text}");
    assert!(
        text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>"),
        "{text}"
    );
    assert!(text.contains("<tool_response>\n22 degrees, sunny\n</tool_response>"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    // Without tools the prompt is the plain chat prompt.
    let plain = qwen.chat_prompt(&[ChatMessage::new("user", "hi")]).unwrap();
    assert_eq!(plain, qwen.chat_prompt_with_tools(&[ChatMessage::new("user", "hi")], None).unwrap());

    // SmolLM2's template has no tools section: the tools go into the system message.
    let smol = load("smollm2-135m-instruct-q4_1");
    let ids = smol.chat_prompt_with_tools(&[ChatMessage::new("user", "Weather in Paris?")], Some(&tools())).unwrap();
    let text = smol.tokenizer.decode(&ids);
    assert!(text.contains("# Tools") && text.contains("get_weather") && text.contains("<tool_call>"), "{text}");
}

#[test]
fn constrained_calls_parse_and_fit_the_schema() {
    let m = load("qwen2.5-coder-0.5b-instruct-q4_k_m");
    let pool = ThreadPool::new(2);
    let cases = [
        ("Is it raining in Montevideo right now? Use fahrenheit.", Some("get_weather"), "get_weather"),
        ("How many yen is 250 euros?", Some("convert_currency"), "convert_currency"),
        ("What's the temperature in Tromsø, in celsius?", None, "get_weather"),
    ];
    for (question, only, want) in cases {
        let ids = m.chat_prompt_with_tools(&[ChatMessage::new("user", question)], Some(&tools())).unwrap();
        let choice = match only {
            Some(f) => ToolChoice::Function(f.into()),
            None => ToolChoice::Required,
        };
        let spec = choice_constraint(&tools(), &choice, false).unwrap().unwrap();
        let params = GenerateParams {
            max_tokens: 120,
            sampling: SamplingParams::greedy(),
            constraint: Some(m.compile_constraint(&spec).unwrap()),
            ..GenerateParams::default()
        };
        let g = generate(&m.model, &m.tokenizer, &pool, &mut m.model.new_cache(2048), &ids, &params, |_| {}).unwrap();
        let reply = parse_reply(&choice.reply_format().unwrap(), &g.text);
        assert_eq!(reply.calls.len(), 1, "{question}: {:?}", g.text);
        assert_eq!(reply.content, None, "{question}: {:?}", g.text);
        let call = &reply.calls[0];
        assert_eq!(call.name, want, "{question}: {:?}", g.text);
        let args: Value = serde_json::from_str(&call.arguments).unwrap();
        let all = tools();
        let schema = &all.iter().find(|t| t["function"]["name"] == want).unwrap()["function"]["parameters"];
        for key in schema["required"].as_array().unwrap() {
            let k = key.as_str().unwrap();
            let ty = schema["properties"][k]["type"].as_str().unwrap();
            let ok = match ty {
                "string" => args[k].is_string(),
                "number" => args[k].is_number(),
                _ => false,
            };
            assert!(ok, "{question}: argument {k} is not a {ty}: {args}");
            if let Some(options) = schema["properties"][k]["enum"].as_array() {
                assert!(options.contains(&args[k]), "{question}: {k} = {} is not one of {options:?}", args[k]);
            }
        }
    }
}

/// `tool_choice: "auto"`: text is free and may end, but once the reply
/// reaches `<tool_call>` the rest must be a valid call — for a vocabulary
/// where the tag is one token (Qwen2.5) and one where it is several
/// (SmolLM2).
#[test]
fn auto_lets_text_through_and_constrains_calls_once_they_open() {
    for name in ["qwen2.5-coder-0.5b-instruct-q4_k_m", "smollm2-135m-instruct-q4_1"] {
        let m = load(name);
        let tok = &m.tokenizer;
        let eos = tok.eos_id().unwrap();
        let spec = minnow_engine::tools::auto_grammar(&tools(), true).unwrap();
        let c = m.compile_constraint(&spec).unwrap();
        let encode = |s: &str| tok.encode(s, false, true).unwrap();

        // Plain text (held-out wording, angle brackets and braces included) may end.
        let mut text = encode("It is 3 < 4 and {x} is <b>bold</b>; call_tool isn't needed.");
        text.push(eos);
        assert_eq!(c.start().allowed_prefix(&text), text.len(), "{name}: free text is allowed and may end");

        // Text, then the tag: the call's opening is forced, a bad body refused.
        let lead = encode("Let me look that up.\n<tool_call>");
        let mut mask = c.start();
        assert_eq!(mask.allowed_prefix(&lead), lead.len(), "{name}");
        for &t in &lead {
            mask.consume(t);
        }
        // A mask prepared ahead (during a forward pass) is the mask computed
        // on demand, at every position of a call.
        let mut fresh = c.start();
        for &t in lead.iter().chain(&encode("\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"X")) {
            let mut ahead = fresh.clone();
            ahead.prepare();
            let (mut a, mut b) = (vec![0.5f32; tok.vocab_size()], vec![0.5f32; tok.vocab_size()]);
            ahead.apply(&mut a);
            fresh.clone().apply(&mut b);
            assert!(a == b, "{name}: prepared and fresh masks differ");
            let mut ahead = fresh.clone();
            ahead.prepare();
            assert_eq!(ahead.forced_tokens(), fresh.clone().forced_tokens(), "{name}");
            fresh.consume(t);
        }

        // The newline after the tag is the only way on.
        let forced = tok.decode(&mask.forced_tokens());
        assert!(forced.starts_with('\n'), "{name}: forced {forced:?}");
        assert!(mask.clone().allowed_prefix(&encode("\nhello")) < encode("\nhello").len(), "{name}");
        assert_eq!(mask.clone().allowed_prefix(&[eos]), 0, "{name}: an open call cannot end");

        // A whole valid call, then a second one, then the end.
        let rest = encode(
            "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\", \"unit\": \"celsius\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"convert_currency\", \"arguments\": {\"amount\": 3, \"from\": \"EUR\", \"to\": \"JPY\"}}\n</tool_call>",
        );
        let mut all = rest.clone();
        all.push(eos);
        assert_eq!(mask.clone().allowed_prefix(&all), all.len(), "{name}: {:?}", tok.decode(&rest));
        // Arguments against the schema: an unknown unit is refused.
        let bad = encode("\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\", \"unit\": \"kelvin\"}}");
        assert!(mask.clone().allowed_prefix(&bad) < bad.len(), "{name}");
    }
}

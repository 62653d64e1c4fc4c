//! Tool calls on the real models: Qwen2.5's chat template renders the tools,
//! an assistant turn's calls and the tools' answers; a model whose template
//! has no tools section gets them in its system message; a call constrained
//! by `tools::call_grammar` parses into the named function with arguments
//! valid against its schema (Qwen2.5-Coder-0.5B, held-out requests).

mod common;

use minnow_engine::chat::ChatMessage;
use minnow_engine::generate::{generate, GenerateParams};
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::SamplingParams;
use minnow_engine::tools::{call_grammar, parse_tool_calls};
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
        let spec = call_grammar(&tools(), only, false).unwrap();
        let params = GenerateParams {
            max_tokens: 120,
            sampling: SamplingParams::greedy(),
            constraint: Some(m.compile_constraint(&spec).unwrap()),
            ..GenerateParams::default()
        };
        let g = generate(&m.model, &m.tokenizer, &pool, &mut m.model.new_cache(2048), &ids, &params, |_| {}).unwrap();
        let reply = parse_tool_calls(&g.text);
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

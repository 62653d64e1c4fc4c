//! The dataset formats: each read, written and read back to the same
//! conversations; errors that name the line and the field; the store as
//! data (filters, cut answers left out, tool calls and log-probabilities
//! carried); a tool-calling conversation trained as the chat template
//! renders it, with and without a tools section in the template.

use minnow_distill::data::{read_eval_cases, read_inputs, DatasetRecord};
use minnow_distill::formats::{load, read_file, write, Format};
use minnow_engine::chat::{ChatMessage, ChatTemplate};
use minnow_store::{Store, StoredCompletion, TeacherLogprobs};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("minnow-formats-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lines(path: &Path, records: &[Value]) {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

/// What a record means, for comparing across formats: its turns and
/// tools, without the call ids that link a tool's answer to its call
/// (ShareGPT and Alpaca have none; the order links them).
fn meaning(r: &DatasetRecord) -> (Vec<ChatMessage>, Option<Vec<Value>>) {
    let messages = r
        .messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            m.tool_call_id = None;
            if let Some(Value::Array(calls)) = &mut m.tool_calls {
                calls.iter_mut().for_each(|c| {
                    c.as_object_mut().unwrap().remove("id");
                });
            }
            m
        })
        .collect();
    (messages, r.tools.clone())
}

#[test]
fn each_format_reads_writes_and_reads_back_the_same_conversations() {
    let dir = tmp("roundtrip");
    // OpenAI chat, as its fine-tuning takes it: tools, a call with JSON-text
    // arguments, the tool's answer, a developer message, text parts.
    let openai = dir.join("openai.jsonl");
    lines(
        &openai,
        &[
            json!({"messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 4}"},
                {"role": "assistant", "content": "4 degrees."}],
                "tools": [weather_tool()]}),
            json!({"prompt": "2+2?", "completion": "4"}),
            json!({"id": "third", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}),
        ],
    );
    let (recs, f) = read_file(&openai).unwrap();
    assert_eq!(f, Format::OpenAi);
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0].messages[0], ChatMessage::new("system", "Be brief."));
    assert_eq!(recs[0].messages[1].content, "Weather in Oslo?");
    let call = &recs[0].messages[2].tool_calls.as_ref().unwrap()[0];
    assert_eq!(call["function"]["arguments"], json!({"city": "Oslo"}), "arguments become an object for templates");
    assert_eq!(recs[0].messages[3].tool_call_id.as_deref(), Some("call_1"));
    assert_eq!(recs[1].messages, vec![ChatMessage::new("user", "2+2?"), ChatMessage::new("assistant", "4")]);
    assert_eq!(recs[2].id, "third");

    // ShareGPT with a function call and an observation, and tools as a JSON text.
    let sharegpt = dir.join("sharegpt.jsonl");
    lines(
        &sharegpt,
        &[
            json!({"system": "Be brief.", "tools": Value::Array(vec![weather_tool()]).to_string(), "conversations": [
                {"from": "human", "value": "Weather in Oslo?"},
                {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"},
                {"from": "observation", "value": "{\"temp\": 4}"},
                {"from": "gpt", "value": "4 degrees."}]}),
            json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye!"}]}),
        ],
    );
    let (sg, f) = read_file(&sharegpt).unwrap();
    assert_eq!(f, Format::ShareGpt);
    assert_eq!(sg[0].messages.len(), 5);
    assert_eq!(sg[0].messages[2].tool_calls.as_ref().unwrap()[0]["function"]["name"], "get_weather");
    assert_eq!(sg[0].messages[3].role, "tool");
    assert_eq!(sg[0].tools, Some(vec![weather_tool()]));

    // Alpaca, with and without an input.
    let alpaca = dir.join("alpaca.jsonl");
    lines(
        &alpaca,
        &[
            json!({"instruction": "Translate to French.", "input": "cat", "output": "chat"}),
            json!({"instruction": "Name a prime.", "output": "7", "system": "Answer with a number."}),
        ],
    );
    let (al, f) = read_file(&alpaca).unwrap();
    assert_eq!(f, Format::Alpaca);
    assert_eq!(
        al[0].messages,
        vec![ChatMessage::new("user", "Translate to French.\n\ncat"), ChatMessage::new("assistant", "chat")]
    );
    assert_eq!(al[1].messages[0], ChatMessage::new("system", "Answer with a number."));

    // Every source written in every format that can hold it, and read back.
    for (name, recs) in [("openai", &recs), ("sharegpt", &sg), ("alpaca", &al)] {
        for format in [Format::OpenAi, Format::ShareGpt, Format::Alpaca] {
            let out = dir.join(format!("{name}-as-{format:?}.jsonl"));
            match write(recs, format, &out) {
                Ok(()) => {
                    let (back, f) = read_file(&out).unwrap();
                    assert_eq!(f, format);
                    let a: Vec<_> = recs.iter().map(meaning).collect();
                    let b: Vec<_> = back.iter().map(meaning).collect();
                    assert_eq!(a, b, "{name} as {format:?}");
                    if format == Format::OpenAi && name == "openai" {
                        // OpenAI's shape keeps the ids too: the very same turns.
                        let whole = |rs: &[DatasetRecord]| {
                            rs.iter().map(|r| (r.messages.clone(), r.tools.clone())).collect::<Vec<_>>()
                        };
                        assert_eq!(whole(recs), whole(&back), "{name} as OpenAI chat");
                    }
                    assert_eq!(
                        back.iter().map(|r| &r.id).collect::<Vec<_>>(),
                        recs.iter().map(|r| &r.id).collect::<Vec<_>>()
                    );
                }
                // Alpaca holds one instruction and its answer, nothing more.
                Err(e) => {
                    assert_eq!(format, Format::Alpaca, "{name} as {format:?}: {e}");
                    assert!(e.to_string().contains("Alpaca holds one instruction"), "{e}");
                }
            }
        }
    }
    // The OpenAI export puts calls back in OpenAI's shape (arguments a JSON text).
    let out = dir.join("sg-openai.jsonl");
    write(&sg, Format::OpenAi, &out).unwrap();
    let first: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().lines().next().unwrap()).unwrap();
    let args = &first["messages"][2]["tool_calls"][0]["function"]["arguments"];
    assert_eq!(serde_json::from_str::<Value>(args.as_str().unwrap()).unwrap(), json!({"city": "Oslo"}));
    // ... with an id, which the tool's answer after it names.
    let id = first["messages"][2]["tool_calls"][0]["id"].as_str().unwrap();
    assert_eq!(first["messages"][3]["tool_call_id"], id);

    // Eval cases and label inputs come from the same files.
    let cases = read_eval_cases(&alpaca).unwrap();
    assert_eq!(cases[0].answer_text(), "chat");
    assert_eq!(cases[0].messages, vec![ChatMessage::new("user", "Translate to French.\n\ncat")]);
    let inputs = read_inputs(&sharegpt).unwrap();
    assert_eq!(
        inputs[1].messages.last().unwrap(),
        &ChatMessage::new("user", "Bye"),
        "the answer is left for the teacher"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_record_that_fits_no_format_or_not_its_files_is_named_by_line_and_field() {
    let dir = tmp("errors");
    let p = dir.join("d.jsonl");
    let cases: [(Vec<Value>, &str); 7] = [
        (vec![json!({"text": "a"})], "d.jsonl:1: fits no format: needs \"prompt\" or \"messages\""),
        (
            vec![json!({"instruction": "a", "output": "b"}), json!({"conversations": []})],
            "d.jsonl:2: a ShareGPT record in a Alpaca file",
        ),
        (
            vec![json!({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]})],
            "d.jsonl:1: conversations[1].from \"bot\"",
        ),
        (vec![json!({"conversations": [{"from": "human"}]})], "d.jsonl:1: conversations[0].value is required"),
        (
            vec![
                json!({"messages": [{"role": "user", "content": "a"}]}),
                json!({"messages": [{"role": "robot", "content": "b"}]}),
            ],
            "d.jsonl:2: messages[0].role \"robot\"",
        ),
        (
            vec![
                json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}),
            ],
            "d.jsonl:1: messages[0].tool_calls[0].function.arguments is not a JSON text",
        ),
        (vec![json!({"instruction": "a", "output": 3})], "d.jsonl:1: \"output\" must be a string"),
    ];
    for (recs, want) in cases {
        lines(&p, &recs);
        let e = read_file(&p).unwrap_err().to_string();
        assert!(e.contains(want), "{recs:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    std::fs::write(&p, "{\"instruction\": \"a\", \"output\": \"b\"}\nnot json\n").unwrap();
    let e = read_file(&p).unwrap_err().to_string();
    assert!(e.contains("d.jsonl:2: not JSON"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn stored(i: usize, task: &str, finish: &str, reply: Value) -> StoredCompletion {
    let mut metadata = BTreeMap::new();
    metadata.insert("task".to_string(), task.to_string());
    StoredCompletion {
        id: format!("chatcmpl-{i}"),
        created: 1_800_000_000 + i as u64,
        model: if i.is_multiple_of(2) { "teacher".into() } else { "orders".into() },
        metadata,
        request: json!({"messages": [{"role": "system", "content": "Extract."}, {"role": "user", "content": format!("order {i}")}],
            "temperature": 0, "tools": [weather_tool()]}),
        response: json!({"id": format!("chatcmpl-{i}"), "object": "chat.completion",
            "choices": [{"index": 0, "message": reply, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}),
        logprobs: vec![TeacherLogprobs {
            vocab: Some("vocab-x".into()),
            tokens: vec![1, 2],
            top: vec![vec![(1, -0.1)], vec![(2, -0.2)]],
        }],
    }
}

#[test]
fn a_store_is_data_with_filters() {
    let dir = tmp("store");
    {
        let mut s = Store::open(&dir, None).unwrap();
        s.put(&stored(0, "orders", "stop", json!({"role": "assistant", "content": "{\"sku\": 1}"}))).unwrap();
        s.put(&stored(1, "support", "stop", json!({"role": "assistant", "content": "Sorry."}))).unwrap();
        s.put(&stored(2, "orders", "length", json!({"role": "assistant", "content": "{\"sku\": "}))).unwrap();
        s.put(&stored(3, "orders", "tool_calls", json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}))).unwrap();
    }
    let spec = |q: &str| PathBuf::from(format!("store:{}{q}", dir.display()));
    let all = load(&spec("")).unwrap();
    assert_eq!(all.records.len(), 3);
    assert_eq!(all.skipped_truncated, 1, "an answer cut at max_tokens is not data");
    let orders = load(&spec("?metadata.task=orders")).unwrap().records;
    assert_eq!(orders.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["chatcmpl-0", "chatcmpl-3"]);
    assert_eq!(orders[0].messages.last().unwrap(), &ChatMessage::new("assistant", "{\"sku\": 1}"));
    assert_eq!(orders[0].messages[1], ChatMessage::new("user", "order 0"));
    assert_eq!(orders[0].tools, Some(vec![weather_tool()]));
    assert_eq!(orders[0].teacher_logprobs.as_ref().unwrap().tokens, vec![1, 2]);
    assert_eq!(orders[0].provenance.as_ref().unwrap().teacher, "teacher");
    let call = &orders[1].messages.last().unwrap().tool_calls.as_ref().unwrap()[0];
    assert_eq!(call["function"]["arguments"], json!({"city": "Rome"}));
    let by_model = load(&spec("?metadata.task=orders&model=orders")).unwrap().records;
    assert_eq!(by_model.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["chatcmpl-3"]);
    let e = load(&spec("?task=orders")).unwrap_err().to_string();
    assert!(e.contains("metadata.KEY=VALUE"), "{e}");
    // Label inputs from the store: the conversations without the replies.
    let inputs = read_inputs(&spec("?metadata.task=support")).unwrap();
    assert_eq!(inputs[0].messages.last().unwrap(), &ChatMessage::new("user", "order 1"));
    // Eval cases: the stored reply is the answer.
    let cases = read_eval_cases(&spec("?metadata.task=support")).unwrap();
    assert_eq!(cases[0].answer_text(), "Sorry.");
    std::fs::remove_dir_all(&dir).unwrap();
    let e = load(&spec("")).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
}

/// A tool-calling conversation trains the call as the template renders it:
/// Qwen2.5's template (which renders tools and calls itself) and SmolLM2's
/// (which has no tools section: the tools go into the system message and
/// the call into the answer as a `<tool_call>` block, as serving does).
#[test]
fn a_tool_call_is_trained_as_the_chat_template_renders_it() {
    let rec = DatasetRecord {
        id: "t".into(),
        messages: vec![
            ChatMessage::new("user", "Weather in Oslo?"),
            ChatMessage {
                tool_calls: Some(
                    json!([{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]),
                ),
                ..ChatMessage::new("assistant", "")
            },
        ],
        tools: Some(vec![weather_tool()]),
        provenance: None,
        teacher_logprobs: None,
    };
    for file in ["qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "smollm2-135m-instruct-q4_1.gguf"] {
        let path = minnow_models::test_model(file);
        let gguf = minnow_gguf::GgufFile::open(&path).unwrap();
        let tok = minnow_engine::tokenizer::Tokenizer::from_gguf(&gguf).unwrap();
        let chat = ChatTemplate::from_gguf(&gguf).unwrap();
        let (prompt, answer) = minnow_distill::train::batch::tokenize_record(&tok, chat.as_ref(), &rec).unwrap();
        let prompt_text = tok.decode(&prompt);
        let answer_text = tok.decode(&answer);
        assert!(
            prompt_text.contains("get_weather") && prompt_text.contains("<tools>"),
            "{file}: tools not offered: {prompt_text}"
        );
        assert!(
            answer_text.contains("<tool_call>") && answer_text.contains("\"city\": \"Oslo\""),
            "{file}: {answer_text:?}"
        );
        // The prompt ids are the ones serving builds for the conversation and tools.
        let model = minnow_engine::loader::LoadedModel::load(&path).unwrap();
        assert_eq!(prompt, model.chat_prompt_with_tools(&rec.messages[..1], rec.tools.as_deref()).unwrap(), "{file}");
    }
}

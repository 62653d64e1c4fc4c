//! Tool calls in the format Qwen2.5's chat template (and the Hermes format
//! many others share) teaches the model: each call is a JSON object
//! `{"name": …, "arguments": {…}}` between `<tool_call>` and `</tool_call>`
//! lines. This module holds the three rules around it: how tools reach a
//! model whose template has no tools section ([`with_tools_system_message`]),
//! the grammar that makes a call valid by construction ([`call_grammar`]: a
//! named function's or any offered function's arguments against its JSON
//! Schema), and how a reply splits into text and calls
//! ([`parse_tool_calls`]).

use crate::chat::ChatMessage;
use crate::constraint::ConstraintSpec;
use serde_json::{json, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A reply split into its text and its tool calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedReply {
    /// The text outside the calls, trimmed; `None` when there is none.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// The function objects of OpenAI's `tools` (`{"type": "function",
/// "function": {"name", "description"?, "parameters"?}}`), checked.
fn functions(tools: &[Value]) -> Result<Vec<&serde_json::Map<String, Value>>, String> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let f = t.get("function").and_then(Value::as_object).ok_or(format!("tools[{i}].function is required"))?;
            match f.get("name").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => Ok(f),
                _ => Err(format!("tools[{i}].function.name is required")),
            }
        })
        .collect()
}

/// The conversation with the tools described in its system message, for a
/// model whose chat template has no tools section: the same instructions
/// Qwen2.5's template writes, after the caller's own system message.
pub fn with_tools_system_message(messages: &[ChatMessage], tools: &[Value]) -> Vec<ChatMessage> {
    let mut text = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        text.push('\n');
        text.push_str(&t.to_string());
    }
    text.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within \
         <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    let mut out = Vec::with_capacity(messages.len() + 1);
    match messages.first() {
        Some(m) if m.role == "system" => {
            out.push(ChatMessage::new("system", format!("{}\n\n{text}", m.content)));
            out.extend_from_slice(&messages[1..]);
        }
        _ => {
            out.push(ChatMessage::new("system", text));
            out.extend_from_slice(messages);
        }
    }
    out
}

/// The grammar of a reply that calls `only` (or, `None`, any of `tools`):
/// one call, or with `parallel` one or more, each `<tool_call>` line, the
/// JSON object with the function's name and arguments valid against its
/// `parameters` schema, and the `</tool_call>` line.
pub fn call_grammar(tools: &[Value], only: Option<&str>, parallel: bool) -> Result<ConstraintSpec, String> {
    let fns = functions(tools)?;
    let chosen: Vec<_> = match only {
        Some(name) => {
            let f = fns.iter().find(|f| f["name"] == name).ok_or(format!("no tool is named {name:?}"))?;
            vec![*f]
        }
        None => fns,
    };
    if chosen.is_empty() {
        return Err("tools is empty: nothing to call".into());
    }
    let alternatives: Vec<Value> = chosen
        .iter()
        .map(|f| {
            let params = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
            json!({
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = if alternatives.len() == 1 { alternatives[0].clone() } else { json!({"anyOf": alternatives}) };
    let start = if parallel { "start: (call \"\\n\")* call" } else { "start: call" };
    Ok(ConstraintSpec::Grammar(format!("{start}\ncall: \"{OPEN}\\n\" body \"\\n{CLOSE}\"\nbody: %json {schema}\n")))
}

/// Splits a reply into text and calls: every `<tool_call>…</tool_call>`
/// whose inside is a JSON object with a string `name` becomes a call (its
/// `arguments` re-serialized compactly; absent arguments are `{}`); anything
/// else, a malformed call included, stays text.
pub fn parse_tool_calls(reply: &str) -> ParsedReply {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = reply;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else { break };
        let inside = after[..end].trim();
        let call = serde_json::from_str::<Value>(inside).ok().and_then(|v| {
            let name = v.get("name")?.as_str()?.to_string();
            let args = v.get("arguments").cloned().unwrap_or_else(|| json!({}));
            let arguments = match args {
                Value::String(s) => s,
                other => other.to_string(),
            };
            Some(ToolCall { name, arguments })
        });
        match call {
            Some(c) => {
                content.push_str(&rest[..start]);
                calls.push(c);
            }
            None => content.push_str(&rest[..start + OPEN.len() + end + CLOSE.len()]),
        }
        rest = &after[end + CLOSE.len()..];
    }
    content.push_str(rest);
    let content = content.trim();
    ParsedReply { content: (!content.is_empty()).then(|| content.to_string()), calls }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_split_into_text_and_calls() {
        let r = parse_tool_calls(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n</tool_call>",
        );
        assert_eq!(r.content.as_deref(), Some("Let me check."));
        assert_eq!(
            r.calls,
            vec![
                ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() },
                ToolCall { name: "get_time".into(), arguments: r#"{"tz":"CET"}"#.into() },
            ]
        );
        // Only calls: no content.
        let r = parse_tool_calls("<tool_call>\n{\"name\": \"f\"}\n</tool_call>");
        assert_eq!((r.content, r.calls.len(), r.calls[0].arguments.as_str()), (None, 1, "{}"));
        // Malformed calls and plain text stay text.
        for text in [
            "<tool_call>\n{\"name\": 3}\n</tool_call>",
            "<tool_call>\nnot json\n</tool_call>",
            "Paris is sunny.",
            "<tool_call>\n{\"name\": \"f\"}",
        ] {
            let r = parse_tool_calls(text);
            assert!(r.calls.is_empty(), "{text}");
            assert_eq!(r.content.as_deref(), Some(text.trim()), "{text}");
        }
    }

    #[test]
    fn grammars_name_the_functions_and_bad_tools_are_errors() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "get_time"}}),
        ];
        let ConstraintSpec::Grammar(g) = call_grammar(&tools, Some("get_time"), false).unwrap() else { panic!() };
        assert!(g.contains("\"get_time\"") && !g.contains("get_weather") && g.starts_with("start: call\n"), "{g}");
        let ConstraintSpec::Grammar(g) = call_grammar(&tools, None, true).unwrap() else { panic!() };
        assert!(g.contains("anyOf") && g.contains("get_weather") && g.contains("(call \"\\n\")* call"), "{g}");
        assert!(call_grammar(&tools, Some("nope"), false).unwrap_err().contains("nope"));
        assert!(call_grammar(&[json!({"type": "function"})], None, false).unwrap_err().contains("tools[0].function"));
        assert!(call_grammar(&[], None, false).is_err());
    }

    #[test]
    fn the_fallback_puts_tools_in_the_system_message() {
        let tools = vec![json!({"type": "function", "function": {"name": "f"}})];
        let m = with_tools_system_message(&[ChatMessage::new("user", "hi")], &tools);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        assert!(m[0].content.contains(&format!("<tools>\n{}\n</tools>", tools[0])), "{}", m[0].content);
        let m = with_tools_system_message(
            &[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "hi")],
            &tools,
        );
        assert_eq!(m.len(), 2);
        assert!(m[0].content.starts_with("Be brief.\n\n# Tools"));
    }
}

//! Tool calls. The chat template teaches the model Qwen2.5's (and the
//! Hermes) format: each call a JSON object `{"name": …, "arguments": {…}}`
//! between `<tool_call>` and `</tool_call>` lines. This module holds every
//! rule around calls: how tools reach a model whose template has no tools
//! section ([`with_tools_system_message`]); the constraint each
//! `tool_choice` puts on the reply ([`choice_constraint`]: `auto` lets text
//! through and constrains a call once its tag opens, a forced choice is
//! JSON from the first token); and how a reply, whole or streamed, is read
//! back into text and calls ([`parse_reply`], [`CallSplitter`]).

use crate::chat::{render_plain, ChatMessage, ChatTemplate};
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

/// Whether a chat template renders tools itself (its source mentions
/// them); one that does not gets [`for_template_without_tools`].
pub fn template_knows_tools(t: &ChatTemplate) -> bool {
    t.source().contains("tools") && t.source().contains("tool_calls")
}

/// The conversation as a template without a tools section must see it: the
/// tools described in the system message ([`with_tools_system_message`],
/// when there are any) and each assistant turn's calls written into its
/// text as the `<tool_call>` blocks that message teaches, so neither is
/// silently dropped.
pub fn for_template_without_tools(messages: &[ChatMessage], tools: Option<&[Value]>) -> Vec<ChatMessage> {
    let inlined: Vec<ChatMessage> = messages
        .iter()
        .map(|m| match &m.tool_calls {
            Some(Value::Array(calls)) if !calls.is_empty() => {
                let mut text = m.content.trim_end().to_string();
                for c in calls {
                    let f = c.get("function").unwrap_or(c);
                    let call = json!({"name": f.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": f.get("arguments").cloned().unwrap_or_else(|| json!({}))});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("{OPEN}\n{}\n{CLOSE}", python_json(&call)));
                }
                ChatMessage { tool_calls: None, content: text, ..m.clone() }
            }
            _ => m.clone(),
        })
        .collect();
    match tools {
        Some(t) if !t.is_empty() => with_tools_system_message(&inlined, t),
        _ => inlined,
    }
}

/// JSON as Python's `json.dumps` writes it by default (`", "` and `": "`
/// between items, keys in order, non-ASCII kept): how templates that render
/// calls themselves (Qwen2.5's `tojson`) write them, so a call reads the
/// same with or without a tools section.
fn python_json(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}]", a.iter().map(python_json).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, x)| format!("{}: {}", Value::String(k.clone()), python_json(x)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        scalar => scalar.to_string(),
    }
}

/// The one way a conversation (with the `tools` it was offered, if any)
/// becomes prompt text: the model's template, given the tools as
/// transformers gives them when it renders them itself, else after
/// [`for_template_without_tools`]; ChatML when the model has no template.
/// Serving (`LoadedModel::chat_prompt_with_tools`) and training (the
/// student's examples) both render through here.
pub fn render_conversation(
    chat: Option<&ChatTemplate>,
    messages: &[ChatMessage],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
) -> Result<String, crate::chat::ChatError> {
    Ok(match chat {
        Some(t) if template_knows_tools(t) => t.render_with_tools(messages, tools, add_generation_prompt)?,
        Some(t) => t.render(&for_template_without_tools(messages, tools), add_generation_prompt)?,
        None => render_plain(&for_template_without_tools(messages, tools), add_generation_prompt),
    })
}

/// OpenAI's assistant `tool_calls` (each `{"id"?, "type": "function",
/// "function": {"name", "arguments": JSON text}}`) in the shape chat
/// templates read (the arguments an object). `Err((field, why))` names the
/// field under the calls (`[1].function.arguments`).
pub fn calls_for_template(calls: &Value) -> Result<Option<Value>, (String, String)> {
    let calls = match calls {
        Value::Null => return Ok(None),
        Value::Array(a) => a,
        _ => return Err((String::new(), "must be an array".into())),
    };
    let mut out = Vec::with_capacity(calls.len());
    for (j, c) in calls.iter().enumerate() {
        let at = |f: &str| format!("[{j}]{f}");
        let Value::Object(c) = c else { return Err((at(""), "must be an object".into())) };
        match c.get("type").and_then(Value::as_str) {
            None | Some("function") => {}
            Some(other) => return Err((at(".type"), format!("tool calls of type `{other}` are not supported"))),
        }
        let Some(Value::Object(f)) = c.get("function") else {
            return Err((at(".function"), "must be an object".into()));
        };
        let Some(Value::String(name)) = f.get("name") else {
            return Err((at(".function.name"), "must be a string".into()));
        };
        let arguments = match f.get("arguments") {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) => {
                serde_json::from_str(s).map_err(|e| (at(".function.arguments"), format!("is not a JSON text: {e}")))?
            }
            // Some clients send the object itself.
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err((at(".function.arguments"), "must be a JSON string".into())),
        };
        let mut call = json!({"type": "function", "function": {"name": name, "arguments": arguments}});
        if let Some(Value::String(id)) = c.get("id") {
            call["id"] = Value::String(id.clone());
        }
        out.push(call);
    }
    Ok((!out.is_empty()).then_some(Value::Array(out)))
}

/// Template-shaped calls back in OpenAI's shape (the arguments a JSON
/// text); a call without an id gets `call_{n}` (`n` from `first_id`).
pub fn calls_for_openai(calls: &Value, first_id: usize) -> Value {
    let Value::Array(calls) = calls else { return Value::Array(Vec::new()) };
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(j, c)| {
                let f = c.get("function").unwrap_or(c);
                let args = match f.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => "{}".to_string(),
                };
                let id =
                    c.get("id").and_then(Value::as_str).map_or_else(|| format!("call_{}", first_id + j), String::from);
                json!({"id": id, "type": "function",
                    "function": {"name": f.get("name").cloned().unwrap_or(Value::Null), "arguments": args}})
            })
            .collect(),
    )
}

/// How the model may use the offered tools (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Answer in text; the tools are not offered.
    None,
    /// Text, or calls: free text until the model opens a call, then the
    /// call constrained (llama.cpp's "lazy grammar").
    Auto,
    /// At least one call, constrained from the first token.
    Required,
    /// A call of this function, constrained from the first token.
    Function(String),
}

/// The form a reply with calls takes, which decides how it is read back.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyFormat {
    /// Text with `<tool_call>` blocks, as the chat template teaches
    /// (`auto`).
    Tagged,
    /// A JSON array of `{"name", "arguments"}` objects (`required`).
    CallArray,
    /// The arguments object of this function, alone (a named choice).
    ArgumentsOf(String),
}

impl ToolChoice {
    /// How a reply under this choice is read back; `None` for
    /// [`ToolChoice::None`] (plain text).
    pub fn reply_format(&self) -> Option<ReplyFormat> {
        match self {
            ToolChoice::None => None,
            ToolChoice::Auto => Some(ReplyFormat::Tagged),
            ToolChoice::Required => Some(ReplyFormat::CallArray),
            ToolChoice::Function(name) => Some(ReplyFormat::ArgumentsOf(name.clone())),
        }
    }
}

/// The constraint for `choice` over `tools`; `None` for [`ToolChoice::None`].
///
/// A forced choice (`required`, a named function) is a JSON constraint from
/// the first token, as vLLM has it: an array of calls, or the named
/// function's arguments alone. It does not go through the `<tool_call>`
/// tags, which some models carry as untrained tokens (Qwen2.5-Coder:
/// after the tag it only wants to stop). `auto` keeps the template's tags.
pub fn choice_constraint(
    tools: &[Value],
    choice: &ToolChoice,
    parallel: bool,
) -> Result<Option<ConstraintSpec>, String> {
    Ok(match choice {
        ToolChoice::None => None,
        ToolChoice::Auto => Some(auto_grammar(tools, parallel)?),
        ToolChoice::Required => {
            let mut schema = json!({"type": "array", "minItems": 1, "items": call_schema(tools, None)?});
            if !parallel {
                schema["maxItems"] = json!(1);
            }
            Some(ConstraintSpec::JsonSchema(schema))
        }
        ToolChoice::Function(name) => {
            let f = function(tools, name)?;
            Some(ConstraintSpec::JsonSchema(f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))))
        }
    })
}

/// The function named `name` among `tools`.
fn function<'t>(tools: &'t [Value], name: &str) -> Result<&'t serde_json::Map<String, Value>, String> {
    functions(tools)?.into_iter().find(|f| f["name"] == name).ok_or(format!("no tool is named {name:?}"))
}

/// The schema of one call's JSON object: `{"name": <one of the functions>,
/// "arguments": <valid against that function's parameters>}`.
fn call_schema(tools: &[Value], only: Option<&str>) -> Result<Value, String> {
    let chosen = match only {
        Some(name) => vec![function(tools, name)?],
        None => functions(tools)?,
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
    Ok(if alternatives.len() == 1 { alternatives[0].clone() } else { json!({"anyOf": alternatives}) })
}

/// The grammar of a reply under `tool_choice: "auto"`: any text — and the
/// moment the text reaches `<tool_call>`, the rest is calls in the
/// template's form (a JSON `{"name", "arguments"}` object valid against
/// the function's schema, then the `</tool_call>` line; more calls with
/// `parallel`), the first call's opening tag ending the free text. A reply
/// without the tag is unconstrained.
pub fn auto_grammar(tools: &[Value], parallel: bool) -> Result<ConstraintSpec, String> {
    let schema = call_schema(tools, None)?;
    let more = if parallel { format!(" (\"\\n{OPEN}\\n\" body \"\\n{CLOSE}\")*") } else { String::new() };
    Ok(ConstraintSpec::Grammar(format!(
        "start: text | lead calls\ntext: /(?s:.*)/\nlead[suffix=\"{OPEN}\"]: /(?s:.*)/\n\
         calls: \"\\n\" body \"\\n{CLOSE}\"{more} \"\\n\"?\nbody: %json {schema}\n"
    )))
}

/// The call between one `<tool_call>` and its `</tool_call>`: a JSON
/// object with a string `name` (its `arguments` re-serialized compactly;
/// absent arguments are `{}`), or `None`.
fn parse_call(inside: &str) -> Option<ToolCall> {
    let v = serde_json::from_str::<Value>(inside.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").cloned().unwrap_or_else(|| json!({})) {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// What a streamed reply turns into, piece by piece.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Call(ToolCall),
}

/// [`parse_tool_calls`] for a reply that arrives in pieces: text is passed
/// on as it comes, except what may be the start of a `<tool_call>` tag and
/// runs of whitespace (held until text follows them, and dropped at the end
/// of a reply that made calls: the lines between calls are not content); a
/// call is passed on when its `</tool_call>` arrives. The concatenated
/// pieces are the non-streamed split, up to that whitespace.
/// A reply in a JSON form ([`ReplyFormat::CallArray`],
/// [`ReplyFormat::ArgumentsOf`]) is held whole and read at its end.
#[derive(Debug)]
pub struct CallSplitter {
    format: ReplyFormat,
    /// Text that may still turn out to be a `<tool_call>` tag, or the inside
    /// of an open call.
    pending: String,
    /// Whitespace nothing has followed yet.
    ws: String,
    in_call: bool,
    calls: usize,
}

impl CallSplitter {
    pub fn new(format: ReplyFormat) -> CallSplitter {
        CallSplitter { format, pending: String::new(), ws: String::new(), in_call: false, calls: 0 }
    }

    /// `text` as a piece, after the whitespace held before it.
    fn text(&mut self, text: &str) -> Piece {
        let mut t = std::mem::take(&mut self.ws);
        t.push_str(text);
        Piece::Text(t)
    }

    /// The pieces `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        if self.format != ReplyFormat::Tagged {
            return out;
        }
        loop {
            if self.in_call {
                let Some(end) = self.pending.find(CLOSE) else { break };
                let inside: String = self.pending.drain(..end + CLOSE.len()).collect();
                let inside = &inside[..end];
                self.in_call = false;
                match parse_call(inside) {
                    Some(c) => {
                        self.calls += 1;
                        out.push(Piece::Call(c));
                    }
                    None => out.push(self.text(&format!("{OPEN}{inside}{CLOSE}"))),
                }
                continue;
            }
            // Text up to the next tag, or all of it but a tail that may
            // still become the tag.
            let (upto, opens) = match self.pending.find(OPEN) {
                Some(start) => (start, true),
                None => {
                    let n = self.pending.len();
                    let keep = (1..OPEN.len().min(n + 1))
                        .rev()
                        .find(|&k| self.pending.is_char_boundary(n - k) && OPEN.starts_with(&self.pending[n - k..]))
                        .unwrap_or(0);
                    (n - keep, false)
                }
            };
            let head: String = self.pending.drain(..upto).collect();
            let body = head.trim_end();
            if !body.is_empty() {
                let piece = self.text(body);
                out.push(piece);
            }
            self.ws.push_str(&head[body.len()..]);
            if !opens {
                break;
            }
            self.pending.drain(..OPEN.len());
            self.in_call = true;
        }
        out
    }

    /// The reply ended: what was held back (an unfinished call is text).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut rest = std::mem::take(&mut self.pending);
        if self.format != ReplyFormat::Tagged {
            let r = parse_reply(&self.format, &rest);
            self.calls = r.calls.len();
            return r.content.map(Piece::Text).into_iter().chain(r.calls.into_iter().map(Piece::Call)).collect();
        }
        if std::mem::take(&mut self.in_call) {
            rest.insert_str(0, OPEN);
        }
        if !rest.trim().is_empty() || (self.calls == 0 && !(self.ws.is_empty() && rest.is_empty())) {
            return vec![self.text(&rest)];
        }
        self.ws.clear();
        Vec::new()
    }

    /// Calls passed on so far.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

/// Reads a reply in `format` back into text and calls. A JSON reply that
/// does not parse (cut short by `max_tokens`) is text.
pub fn parse_reply(format: &ReplyFormat, reply: &str) -> ParsedReply {
    let as_text = || {
        let t = reply.trim();
        ParsedReply { content: (!t.is_empty()).then(|| t.to_string()), calls: Vec::new() }
    };
    match format {
        ReplyFormat::Tagged => parse_tool_calls(reply),
        ReplyFormat::CallArray => match serde_json::from_str::<Vec<Value>>(reply.trim()) {
            Ok(items) => {
                let calls: Option<Vec<ToolCall>> = items.iter().map(|v| parse_call(&v.to_string())).collect();
                match calls {
                    Some(calls) if !calls.is_empty() => ParsedReply { content: None, calls },
                    _ => as_text(),
                }
            }
            Err(_) => as_text(),
        },
        ReplyFormat::ArgumentsOf(name) => match serde_json::from_str::<Value>(reply.trim()) {
            Ok(args @ Value::Object(_)) => {
                ParsedReply { content: None, calls: vec![ToolCall { name: name.clone(), arguments: args.to_string() }] }
            }
            _ => as_text(),
        },
    }
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
        match parse_call(&after[..end]) {
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
    fn streamed_replies_split_as_whole_ones_do() {
        let replies = [
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
            "Plain text with a < sign, <b>tags</b> and <tool_ looking bits.\n",
            "<tool_call>\nnot json\n</tool_call> and after",
            "Cut short: <tool_call>\n{\"name\": \"f\", \"argu",
            "héllo <tool_ca",
        ];
        for reply in replies {
            let whole = parse_tool_calls(reply);
            // Every way of cutting the reply into two or three pieces.
            let cuts: Vec<usize> = (0..=reply.len()).filter(|&i| reply.is_char_boundary(i)).collect();
            for &a in &cuts {
                for &b in cuts.iter().filter(|&&b| b >= a).step_by(7) {
                    let mut s = CallSplitter::new(ReplyFormat::Tagged);
                    let mut pieces = s.push(&reply[..a]);
                    pieces.extend(s.push(&reply[a..b]));
                    pieces.extend(s.push(&reply[b..]));
                    pieces.extend(s.finish());
                    let mut text = String::new();
                    let mut calls = Vec::new();
                    for p in pieces {
                        match p {
                            Piece::Text(t) => text.push_str(&t),
                            Piece::Call(c) => calls.push(c),
                        }
                    }
                    assert_eq!(calls, whole.calls, "{reply:?} cut at {a}, {b}");
                    let text = text.trim();
                    assert_eq!(
                        (!text.is_empty()).then_some(text),
                        whole.content.as_deref(),
                        "{reply:?} cut at {a}, {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn forced_choices_read_back_as_calls() {
        let arr = ReplyFormat::CallArray;
        let r = parse_reply(&arr, r#"[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]"#);
        assert_eq!(r.content, None);
        assert_eq!(r.calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["f", "g"]);
        assert_eq!(r.calls[0].arguments, r#"{"a":1}"#);
        let named = ReplyFormat::ArgumentsOf("get_time".into());
        let r = parse_reply(&named, " {\"tz\": \"CET\"}\n");
        assert_eq!(r.calls, vec![ToolCall { name: "get_time".into(), arguments: r#"{"tz":"CET"}"#.into() }]);
        // Cut short: text, no calls.
        for (f, t) in [(&arr, r#"[{"name": "f", "argu"#), (&named, r#"{"tz": "CE"#)] {
            let r = parse_reply(f, t);
            assert!(r.calls.is_empty() && r.content.as_deref() == Some(t), "{t}");
        }
        // Streamed: held whole, the same at the end.
        let mut s = CallSplitter::new(named.clone());
        assert!(s.push("{\"tz\"").is_empty() && s.push(": \"UTC\"}").is_empty());
        assert_eq!(
            s.finish(),
            vec![Piece::Call(ToolCall { name: "get_time".into(), arguments: r#"{"tz":"UTC"}"#.into() })]
        );
        assert_eq!(s.calls(), 1);
    }

    #[test]
    fn grammars_name_the_functions_and_bad_tools_are_errors() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "get_time"}}),
        ];
        let c = |choice: &ToolChoice, parallel| choice_constraint(&tools, choice, parallel);
        // A named function: its parameters alone.
        let Some(ConstraintSpec::JsonSchema(s)) = c(&ToolChoice::Function("get_weather".into()), true).unwrap() else {
            panic!()
        };
        assert_eq!(s, tools[0]["function"]["parameters"]);
        let Some(ConstraintSpec::JsonSchema(s)) = c(&ToolChoice::Function("get_time".into()), true).unwrap() else {
            panic!()
        };
        assert_eq!(s, json!({"type": "object"}), "no parameters: any object");
        // Required: an array of calls of any function, one without parallel calls.
        let Some(ConstraintSpec::JsonSchema(s)) = c(&ToolChoice::Required, false).unwrap() else { panic!() };
        assert_eq!((s["minItems"].clone(), s["maxItems"].clone()), (json!(1), json!(1)));
        assert_eq!(s["items"]["anyOf"][1]["properties"]["name"], json!({"const": "get_time"}));
        let Some(ConstraintSpec::JsonSchema(s)) = c(&ToolChoice::Required, true).unwrap() else { panic!() };
        assert!(s.get("maxItems").is_none());
        let Some(ConstraintSpec::Grammar(g)) = c(&ToolChoice::Auto, true).unwrap() else { panic!() };
        assert!(g.contains("anyOf") && g.contains("get_weather") && g.contains("lead[suffix="), "{g}");
        assert_eq!(c(&ToolChoice::None, true).unwrap(), None);
        assert!(c(&ToolChoice::Function("nope".into()), false).unwrap_err().contains("nope"));
        assert!(choice_constraint(&[json!({"type": "function"})], &ToolChoice::Required, false)
            .unwrap_err()
            .contains("tools[0].function"));
        assert!(choice_constraint(&[], &ToolChoice::Auto, false).is_err());
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

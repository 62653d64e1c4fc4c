//! OpenAI's response shapes, built from scheduler events.
//!
//! Chat and text completions differ in object names, in where the text goes
//! (`message.content` / `delta.content` versus `text`) and in the logprobs
//! layout (chat: `logprobs.content[{token, logprob, bytes, top_logprobs}]`;
//! completions: parallel arrays `tokens`, `token_logprobs`, `top_logprobs`,
//! `text_offset`). Everything else is shared here.
//!
//! With tools offered, a chat reply is split into its text and its calls
//! (`minnow_engine::tools`): `message.tool_calls` (`content` null when the
//! reply is only calls) and `finish_reason: "tool_calls"`; a stream sends
//! each call as OpenAI does, a `delta.tool_calls` chunk with its id, type and
//! name, then one with its arguments.

use minnow_engine::generate::FinishReason;
use minnow_engine::scheduler::{TokenLogprob, Usage};
use minnow_engine::tokenizer::Tokenizer;
use minnow_engine::tools::{parse_reply, ReplyFormat, ToolCall};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// Identity shared by every chunk of one response.
pub struct Shape {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Whether logprobs were asked for, and how many alternatives a token.
    pub logprobs: Option<usize>,
    /// Every streamed chunk carries `"usage": null` when usage was asked for,
    /// as OpenAI's do.
    pub include_usage: bool,
    /// Tools were offered: replies are read back into content and
    /// `tool_calls`, in the form their `tool_choice` gives them.
    pub tools: Option<ReplyFormat>,
}

pub const FINGERPRINT: &str = concat!("minnow-", env!("CARGO_PKG_VERSION"));

/// One choice being assembled (non-streaming, or a stream's copy for the
/// store), or its logprob bookkeeping.
#[derive(Default)]
pub struct Choice {
    pub text: String,
    pub finish: Option<FinishReason>,
    pub logprobs: Vec<TokenLogprob>,
}

impl Choice {
    /// A reply token's text, and its logprob cut to the `client_k`
    /// alternatives the client asked for (`None`: no logprobs wanted).
    pub fn push_token(&mut self, text: &str, lp: Option<&TokenLogprob>, client_k: Option<usize>) {
        self.text.push_str(text);
        if let (Some(lp), Some(k)) = (lp, client_k) {
            self.logprobs.push(client_view(lp, k));
        }
    }

    /// The choice's held-back text and why it ended.
    pub fn end(&mut self, finish: FinishReason, tail: &str) {
        self.text.push_str(tail);
        self.finish = Some(finish);
    }
}

/// `top_logprobs` cut to the `k` alternatives a client asked for (the
/// engine may have computed more, for the store).
pub fn client_view(lp: &TokenLogprob, k: usize) -> TokenLogprob {
    TokenLogprob { id: lp.id, logprob: lp.logprob, top: lp.top.iter().take(k).copied().collect() }
}

/// OpenAI's finish reason: a reply that ended on its own after calling
/// tools finished with `tool_calls`.
pub fn finish_reason(finish: FinishReason, made_calls: bool) -> &'static str {
    match finish {
        FinishReason::Stop if made_calls => "tool_calls",
        f => f.as_str(),
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// The token as text: its bytes, with invalid UTF-8 (part of a character
/// split across tokens) replaced; `bytes` carries the exact bytes.
fn token_str(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// Chat logprob entries for `lps`.
fn chat_logprob_content(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (s, b) = token_str(tok, id);
        json!({"token": s, "logprob": lp, "bytes": b})
    };
    Value::Array(
        lps.iter()
            .map(|t| {
                let mut e = entry(t.id, t.logprob);
                e["top_logprobs"] = Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
                e
            })
            .collect(),
    )
}

/// Completion logprobs for `lps`; `offset` is the text length before them.
fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for t in lps {
        let (s, _) = token_str(tok, t.id);
        offsets.push(offset);
        offset += s.chars().count();
        tokens.push(Value::String(s));
        token_logprobs.push(json!(t.logprob));
        let mut m = Map::new();
        for &(id, lp) in &t.top {
            m.insert(token_str(tok, id).0, json!(lp));
        }
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if chunk && self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The first chunk of a chat choice: the role, no text yet.
    pub fn role_chunk(&self, index: usize) -> Option<Value> {
        (self.endpoint == Endpoint::Chat).then(|| {
            self.envelope(
                true,
                vec![json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})],
            )
        })
    }

    /// A chunk with new text for choice `index` (and the logprobs of the
    /// tokens it came from). `offset`: the choice's text length so far.
    pub fn text_chunk(&self, tok: &Tokenizer, index: usize, text: &str, lps: &[TokenLogprob], offset: usize) -> Value {
        let logprobs = match (self.logprobs.is_some(), self.endpoint) {
            (false, _) => Value::Null,
            (true, Endpoint::Chat) => json!({"content": chat_logprob_content(tok, lps)}),
            (true, Endpoint::Completion) => completion_logprobs(tok, lps, offset),
        };
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            Endpoint::Completion => json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null}),
        };
        self.envelope(true, vec![choice])
    }

    /// The last chunk of choice `index`, carrying its finish reason
    /// (`finish_reason(…)`).
    pub fn finish_chunk(&self, index: usize, finish: &str) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}),
            Endpoint::Completion => json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish}),
        };
        self.envelope(true, vec![choice])
    }

    /// The id of call `k` of choice `index`: unique per response (the
    /// response id is), `call_` and 24 hex digits as OpenAI's look.
    pub fn call_id(&self, index: usize, k: usize) -> String {
        use minnow_kernels::mix::{fnv1a_extend, FNV1A_START};
        // FNV-1a over the response id, the choice and the call, from a salted start.
        let hash = |salt: u64| {
            let h = fnv1a_extend(FNV1A_START ^ salt, self.id.as_bytes());
            fnv1a_extend(fnv1a_extend(h, &index.to_le_bytes()), &k.to_le_bytes())
        };
        format!("call_{:016x}{:08x}", hash(1), hash(2) as u32)
    }

    /// The two chunks of streamed call `k` of choice `index`: its id, type
    /// and name (arguments empty), then its arguments.
    pub fn tool_call_chunks(&self, index: usize, k: usize, call: &ToolCall) -> [Value; 2] {
        let head = json!({"index": k, "id": self.call_id(index, k), "type": "function",
            "function": {"name": call.name, "arguments": ""}});
        let args = json!({"index": k, "function": {"arguments": call.arguments}});
        [head, args].map(|c| {
            self.envelope(
                true,
                vec![json!({"index": index, "delta": {"tool_calls": [c]}, "logprobs": null, "finish_reason": null})],
            )
        })
    }

    /// The extra chunk `stream_options.include_usage` asks for: no choices.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        let mut v = self.envelope(true, Vec::new());
        v["usage"] = usage_json(usage);
        v
    }

    /// A whole non-streaming response.
    pub fn full(&self, tok: &Tokenizer, choices: &[Choice], usage: &Usage) -> Value {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let finish = c.finish.unwrap_or(FinishReason::Length).as_str();
                let logprobs = match (self.logprobs.is_some(), self.endpoint) {
                    (false, _) => Value::Null,
                    (true, Endpoint::Chat) => json!({"content": chat_logprob_content(tok, &c.logprobs)}),
                    (true, Endpoint::Completion) => completion_logprobs(tok, &c.logprobs, 0),
                };
                match self.endpoint {
                    Endpoint::Chat if self.tools.is_some() => {
                        let reply = parse_reply(self.tools.as_ref().expect("tools"), &c.text);
                        if reply.calls.is_empty() {
                            json!({
                                "index": i,
                                "message": {"role": "assistant", "content": c.text, "refusal": null},
                                "logprobs": logprobs,
                                "finish_reason": finish,
                            })
                        } else {
                            let calls: Vec<Value> = reply
                                .calls
                                .iter()
                                .enumerate()
                                .map(|(k, call)| {
                                    json!({"id": self.call_id(i, k), "type": "function",
                                        "function": {"name": call.name, "arguments": call.arguments}})
                                })
                                .collect();
                            json!({
                                "index": i,
                                "message": {"role": "assistant", "content": reply.content, "refusal": null, "tool_calls": calls},
                                "logprobs": logprobs,
                                "finish_reason": finish_reason(c.finish.unwrap_or(FinishReason::Length), true),
                            })
                        }
                    }
                    Endpoint::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                    Endpoint::Completion => {
                        json!({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": finish})
                    }
                }
            })
            .collect();
        let mut v = self.envelope(false, choices);
        v["usage"] = usage_json(usage);
        v
    }
}

//! Chat templates: turning a list of chat messages into the single prompt
//! string a model was fine-tuned on.
//!
//! GGUF files carry the template the model was trained with in the metadata
//! key `tokenizer.chat_template`: a Jinja2 template written for Hugging Face
//! transformers' `apply_chat_template`. Those templates are only correct when
//! rendered the way transformers renders them, so [`ChatTemplate`] sets up
//! minijinja to behave like transformers' Jinja2 environment:
//!
//! - `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off, no
//!   auto-escaping;
//! - the globals `raise_exception(msg)` (a render error carrying `msg`, see
//!   [`ChatError::Raised`]) and `strftime_now(fmt)`;
//! - transformers' own `tojson` filter (`json.dumps` with
//!   `ensure_ascii=False`, optional `indent`/`separators`/`sort_keys`),
//!   which, unlike Jinja's and minijinja's built-in one, does not
//!   HTML-escape `<`, `>`, `&` and `'`;
//! - Python string/list/dict methods (`.strip()`, `.split()`,
//!   `.startswith()`, `.items()`, `.get()`, ...) through
//!   `minijinja_contrib::pycompat`;
//! - values printed with `{{ ... }}` the way Python's `str()` prints them
//!   (`None`, `True`, `['a', 'b']`), not minijinja's (`none`, `true`,
//!   `["a", "b"]`);
//! - the variables `messages` (a list of `{role, content}`), `bos_token`,
//!   `eos_token` (the token texts from the vocabulary),
//!   `add_generation_prompt`, and `tools` and `documents` set to `None`,
//!   as transformers passes them when the caller gives none.
//!
//! transformers' `{% generation %}` block tag (which only marks assistant
//! tokens for training masks) renders its body unchanged; minijinja has no
//! such tag, so it is rewritten to an always-true `if` before compiling.
//!
//! Models without a template fall back to [`render_plain`], which writes
//! ChatML, the same fallback llama.cpp uses.
//!
//! **BOS.** Many templates begin with `{{ bos_token }}` (Gemma, Llama), and
//! some start with a literal that happens to be the BOS text (SmolLM2's BOS
//! is `<|im_start|>`). A tokenizer that also prepends BOS would then give the
//! model two. Callers should encode a rendered prompt *without* adding BOS
//! when it already starts with the BOS text: see
//! [`ChatTemplate::renders_bos`] and [`ChatTemplate::starts_with_bos`].

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// The GGUF metadata key holding the Jinja chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// One chat turn. `role` is usually `system`, `user` or `assistant`; the
/// template decides what other roles (`tool`, ...) mean.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, as chat templates read them
    /// (`[{"type": "function", "function": {"name", "arguments": {…}}}]`,
    /// the arguments an object); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None }
    }
}

/// Everything that can go wrong with a chat template. Each message is one
/// line naming the template (see [`ChatTemplate::name`]) and what failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not compile.
    #[error("{template}: syntax error{}: {detail}", at_line(.line))]
    Syntax { template: String, detail: String, line: Option<usize> },
    /// The template itself called `raise_exception(message)`, i.e. it
    /// rejects this conversation (e.g. roles that do not alternate).
    #[error("{template} rejected the conversation{}: {message}", at_line(.line))]
    Raised { template: String, message: String, line: Option<usize> },
    /// Rendering failed for another reason (undefined attribute, type error,
    /// bad `tojson` argument, ...).
    #[error("{template}: render failed{}: {detail}", at_line(.line))]
    Render { template: String, detail: String, line: Option<usize> },
    /// The GGUF metadata needed to build the template is malformed.
    #[error("{template}: bad GGUF metadata: {detail}")]
    Metadata { template: String, detail: String },
}

fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// Carried as the `source` of the minijinja error `raise_exception` returns,
/// so that [`ChatTemplate::render`] can tell a template's deliberate
/// rejection from an engine error and report the template's own message.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// A compiled chat template. Cheap to share: it is `Send + Sync`, and
/// rendering takes `&self`, so one instance can serve all server threads.
pub struct ChatTemplate {
    /// Owns the compiled template (added with `add_template_owned`), hence
    /// `'static`.
    env: Environment<'static>,
    /// Used as the minijinja template name and in error messages.
    name: String,
    source: String,
    bos_token: String,
    eos_token: String,
    renders_bos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("renders_bos", &self.renders_bos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` once; syntax errors are reported here, not at
    /// render time. `bos_token`/`eos_token` are the token *texts* (e.g.
    /// `<bos>`), which templates splice into the prompt.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        Self::with_name("chat template", source, bos_token, eos_token)
    }

    /// Like [`ChatTemplate::new`], with `name` used in error messages
    /// (e.g. the model's name) so a server log says which template failed.
    pub fn with_name(name: &str, source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let name = name.to_string();
        let env = build_environment(&name, source).map_err(|e| ChatError::Syntax {
            template: name.clone(),
            detail: describe(&e),
            line: e.line(),
        })?;
        let mut t = ChatTemplate {
            env,
            name,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            renders_bos: false,
        };
        // Probe once with the smallest conversation every template accepts;
        // the BOS handling of a template does not depend on the messages.
        // A template that rejects even that gives no answer: assume no BOS.
        t.renders_bos =
            t.render(&[ChatMessage::new("user", "Hi")], true).map(|s| t.starts_with_bos(&s)).unwrap_or(false);
        Ok(t)
    }

    /// The template stored in `f`'s `tokenizer.chat_template`, with BOS/EOS
    /// texts looked up in `tokenizer.ggml.tokens`. `None` when the file has
    /// no template (callers then use [`render_plain`]). A missing BOS/EOS id
    /// gives an empty token text.
    pub fn from_gguf(f: &minnow_gguf::GgufFile) -> Result<Option<ChatTemplate>, ChatError> {
        let name = match f.get("general.name").and_then(|v| v.as_str()) {
            Some(n) => format!("{CHAT_TEMPLATE_KEY} of '{n}'"),
            None => CHAT_TEMPLATE_KEY.to_string(),
        };
        let source = match f.get(CHAT_TEMPLATE_KEY) {
            None => return Ok(None),
            Some(v) => v.as_str().ok_or_else(|| ChatError::Metadata {
                template: name.clone(),
                detail: format!("{CHAT_TEMPLATE_KEY} is a {}, not a string", v.value_type()),
            })?,
        };
        let bos = special_token_text(f, "tokenizer.ggml.bos_token_id", &name)?;
        let eos = special_token_text(f, "tokenizer.ggml.eos_token_id", &name)?;
        Self::with_name(&name, source, &bos, &eos).map(Some)
    }

    /// Renders `messages`; with `add_generation_prompt` the prompt ends with
    /// the header of the assistant's next turn. The result is exactly what
    /// transformers' `apply_chat_template(..., tokenize=False)` returns.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`render`](Self::render) with `tools` (OpenAI's list of
    /// `{"type": "function", "function": {…}}`) given to the template as
    /// transformers gives them.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template(&self.name).map_err(|e| self.render_error(e))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            add_generation_prompt => add_generation_prompt,
            // transformers passes these as None (not undefined) when the
            // caller has none: `{% if tools is not none %}` must be false.
            tools => tools.map_or(Value::from(()), Value::from_serialize),
            documents => Value::from(()),
        };
        tmpl.render(ctx).map_err(|e| self.render_error(e))
    }

    /// The template source as given (before the `{% generation %}` rewrite).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The name used in error messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Whether this template's prompts begin with the BOS token text
    /// (checked once, on a one-message conversation). When true, encode the
    /// rendered prompt without letting the tokenizer add BOS again, or the
    /// model sees two. For a definite answer about one rendered prompt use
    /// [`ChatTemplate::starts_with_bos`].
    pub fn renders_bos(&self) -> bool {
        self.renders_bos
    }

    /// Whether `rendered` already begins with the BOS text (never true for
    /// an empty BOS text).
    pub fn starts_with_bos(&self, rendered: &str) -> bool {
        !self.bos_token.is_empty() && rendered.starts_with(&self.bos_token)
    }

    fn render_error(&self, e: Error) -> ChatError {
        // Walk the source chain: minijinja may have wrapped our error
        // (e.g. when raised inside a macro or an included block).
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if let Some(r) = s.downcast_ref::<RaisedException>() {
                return ChatError::Raised { template: self.name.clone(), message: r.0.clone(), line: e.line() };
            }
            src = s.source();
        }
        ChatError::Render { template: self.name.clone(), detail: describe(&e), line: e.line() }
    }
}

/// ChatML, the fallback for models whose GGUF has no chat template:
/// `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
/// `<|im_start|>assistant\n` when `add_generation_prompt`. No default system
/// prompt is inserted.
///
/// This is minnow's choice, made to match llama.cpp, which also falls back
/// to ChatML when a model has no template. For a model not trained on
/// ChatML these markers are plain text, which is still a clearer prompt
/// than bare concatenation.
pub fn render_plain(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// A Jinja template that renders exactly what [`render_plain`] does, for
/// callers that want a [`ChatTemplate`] either way.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The text of the special token whose id is stored under `id_key`;
/// empty when the model has no such token.
fn special_token_text(f: &minnow_gguf::GgufFile, id_key: &str, name: &str) -> Result<String, ChatError> {
    let Some(id) = f.get(id_key) else {
        return Ok(String::new());
    };
    let bad = |detail: String| ChatError::Metadata { template: name.to_string(), detail };
    let id = id.as_u64().ok_or_else(|| bad(format!("{id_key} is not an unsigned integer")))?;
    let tokens = f
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("tokenizer.ggml.tokens is missing or not an array".into()))?;
    let tok = usize::try_from(id)
        .ok()
        .and_then(|i| tokens.get(i))
        .ok_or_else(|| bad(format!("{id_key} = {id} is outside the vocabulary of {}", tokens.len())))?;
    tok.as_str().map(str::to_string).ok_or_else(|| bad(format!("token {id} in tokenizer.ggml.tokens is not a string")))
}

/// What went wrong, on one line, without minijinja's " (in name:line)"
/// suffix (our messages carry the name and line themselves): the error
/// kind (unless it is a syntax error, already said), its detail, and its
/// causes.
fn describe(e: &Error) -> String {
    let mut s = match (e.kind(), e.detail()) {
        (ErrorKind::SyntaxError, Some(d)) => d.to_string(),
        (kind, Some(d)) => format!("{kind}: {d}"),
        (kind, None) => kind.to_string(),
    };
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let _ = write!(s, ": {c}");
        src = c.source();
    }
    s
}

fn build_environment(name: &str, source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    // Jinja2 settings transformers uses (ImmutableSandboxedEnvironment with
    // trim_blocks, lstrip_blocks; keep_trailing_newline stays off).
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // Jinja2's default Undefined: prints as "", is falsy, iterates as empty,
    // but attribute access on it is an error. minijinja's Lenient matches.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    // Debug mode clones the source into every error for a multi-line dump
    // we never print.
    env.set_debug(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(RaisedException(msg)))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<String, Error> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        Ok(strftime(&fmt, now))
    });
    env.add_filter("tojson", tojson_filter);
    env.add_template_owned(name.to_string(), rewrite_generation_tags(source))?;
    Ok(env)
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (transformers'
/// AssistantTracker extension) to `{% if true %}` / `{% endif %}`, keeping
/// the whitespace-control markers so trimming is unchanged.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                let _ = write!(out, "{{%{lead} {r} {trail}%}}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Prints `{{ value }}` as Python's `str()` would, since the templates were
/// written against Jinja2: `None`, `True`/`False`, lists and dicts as their
/// Python repr. Undefined prints as nothing, strings as themselves.
fn python_formatter(out: &mut Output, _state: &State, value: &Value) -> Result<(), Error> {
    let s = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => return out.write_str(value.as_str().unwrap_or_default()).map_err(fmt_error),
        _ => py_str(value)?,
    };
    out.write_str(&s).map_err(fmt_error)
}

fn fmt_error(_: std::fmt::Error) -> Error {
    Error::new(ErrorKind::WriteFailure, "formatting failed")
}

/// Python `str(value)` for the value kinds templates handle.
fn py_str(value: &Value) -> Result<String, Error> {
    let mut s = String::new();
    match value.kind() {
        ValueKind::String => s.push_str(value.as_str().unwrap_or_default()),
        _ => py_repr(value, &mut s)?,
    }
    Ok(s)
}

/// Python `repr(value)`, appended to `out`.
fn py_repr(value: &Value, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&py_number(value, false)),
        ValueKind::String => py_repr_str(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out)?;
                out.push_str(": ");
                py_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        // Loop objects, macros, namespaces, bytes: minijinja's own text.
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's repr of a str: single quotes unless the text contains a single
/// quote and no double quote.
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let n = c as u32;
                let _ = if n < 0x100 { write!(out, "\\x{n:02x}") } else { write!(out, "\\u{n:04x}") };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// A number as Python prints it; `json` picks json.dumps' spelling of the
/// non-finite floats.
fn py_number(value: &Value, json: bool) -> String {
    if value.is_integer() {
        // i128/u128 included: minijinja's Display is plain decimal for ints.
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => py_float(f, json),
        Err(_) => value.to_string(),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional notation
/// for exponents in [-4, 16), otherwise `d.ddde+XX`.
fn py_float(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if f < 0.0 { format!("-{s}") } else { s.into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like Python.
    let sci = format!("{:e}", f.abs());
    let (mant, exp) = sci.split_once('e').expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let n = digits.len() as i32;
    let mut out = String::new();
    if f < 0.0 {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        } else if n <= exp + 1 {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', (exp + 1 - n) as usize));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..(exp + 1) as usize]);
            out.push('.');
            out.push_str(&digits[(exp + 1) as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if n > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// transformers' `tojson` filter:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// with the same positional order. Output is not HTML-escaped.
fn tojson_filter(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let ensure_ascii = match ensure_ascii {
        Some(v) => v.is_true(),
        None => kwargs.get::<Option<Value>>("ensure_ascii")?.is_some_and(|v| v.is_true()),
    };
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    // json.dumps: an int indent is that many spaces, a str is used as is,
    // None means single-line output.
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent must be an int or str, not {}", v.kind()),
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let separators = kwargs.get::<Option<Value>>("separators")?.filter(|v| !v.is_none());
    let (item_sep, key_sep) = match separators {
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap().to_string(), b.as_str().unwrap().to_string())
                }
                _ => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair of strings"))
                }
            }
        }
        // json.dumps drops the space after ',' when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let sort_keys = kwargs.get::<Option<Value>>("sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let opts = JsonOpts { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    json_dump(value, &opts, 0, &mut out)?;
    Ok(out)
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_newline(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn json_dump(value: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&py_number(value, true)),
        ValueKind::String => json_str(value.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_dump(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let k = json_key(&key)?;
                entries.push((k, value.get_item(&key)?));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                json_dump(v, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push('}');
        }
        // Like json.dumps on a Jinja Undefined or an arbitrary object.
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of kind {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// json.dumps turns str/int/float/bool/None keys into strings.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Number => py_number(key, true),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
            ))
        }
    })
}

/// A JSON string literal the way Python's json module writes it.
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            // ensure_ascii escapes everything outside ' '..='~' (DEL too),
            // astral characters as UTF-16 surrogate pairs.
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A broken-down UTC time.
struct Tm {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    yday: u32,  // 1..=366
    wday: u32,  // 0 = Sunday
    hour: u32,
    min: u32,
    sec: u32,
}

fn utc(unix: i64) -> Tm {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400) as u32;
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), by
    // counting 400-year eras that start on March 1st.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + u32::from(leap && month > 2);
    Tm {
        year,
        month,
        day,
        yday,
        wday: (days + 4).rem_euclid(7) as u32, // 1970-01-01 was a Thursday
        hour: secs / 3600,
        min: secs / 60 % 60,
        sec: secs % 60,
    }
}

/// `strftime` for `strftime_now`, in UTC: transformers uses the server's
/// local time, but minnow reads no time zone database, and templates use
/// this only for a "today is" line. Supports the C89 conversions plus
/// `%e %F %T %D %R %u %w %z %Z %n %t %%`, and glibc's `%-d` (no padding),
/// which Llama 3 templates use. Unknown conversions are copied through.
fn strftime(fmt: &str, unix: i64) -> String {
    let tm = utc(unix);
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(conv) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if no_pad { write!(out, "{v}") } else { write!(out, "{v:0width$}") };
        };
        let hour12 = if tm.hour.is_multiple_of(12) { 12 } else { tm.hour % 12 };
        match conv {
            'a' => out.push_str(&WEEKDAYS[tm.wday as usize][..3]),
            'A' => out.push_str(WEEKDAYS[tm.wday as usize]),
            'b' | 'h' => out.push_str(&MONTHS[tm.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[tm.month as usize - 1]),
            'c' => {
                let _ = write!(
                    out,
                    "{} {} {:>2} {:02}:{:02}:{:02} {}",
                    &WEEKDAYS[tm.wday as usize][..3],
                    &MONTHS[tm.month as usize - 1][..3],
                    tm.day,
                    tm.hour,
                    tm.min,
                    tm.sec,
                    tm.year
                );
            }
            'd' => num(&mut out, tm.day.into(), 2),
            'e' => {
                let _ = if no_pad { write!(out, "{}", tm.day) } else { write!(out, "{:>2}", tm.day) };
            }
            'H' => num(&mut out, tm.hour.into(), 2),
            'I' => num(&mut out, hour12.into(), 2),
            'j' => num(&mut out, tm.yday.into(), 3),
            'm' => num(&mut out, tm.month.into(), 2),
            'M' => num(&mut out, tm.min.into(), 2),
            'S' => num(&mut out, tm.sec.into(), 2),
            'p' => out.push_str(if tm.hour < 12 { "AM" } else { "PM" }),
            'y' => num(&mut out, tm.year.rem_euclid(100), 2),
            'Y' => {
                let _ = write!(out, "{}", tm.year);
            }
            'u' => {
                let _ = write!(out, "{}", if tm.wday == 0 { 7 } else { tm.wday });
            }
            'w' => {
                let _ = write!(out, "{}", tm.wday);
            }
            'F' => {
                let _ = write!(out, "{}-{:02}-{:02}", tm.year, tm.month, tm.day);
            }
            'D' | 'x' => {
                let _ = write!(out, "{:02}/{:02}/{:02}", tm.month, tm.day, tm.year.rem_euclid(100));
            }
            'T' | 'X' => {
                let _ = write!(out, "{:02}:{:02}:{:02}", tm.hour, tm.min, tm.sec);
            }
            'R' => {
                let _ = write!(out, "{:02}:{:02}", tm.hour, tm.min);
            }
            'z' => out.push_str("+0000"),
            'Z' => out.push_str("UTC"),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_python_float_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (1234.5, "1234.5"),
            (1e15, "1000000000000000.0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "-0.0"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float(f, false), want, "{f:e}");
        }
        assert_eq!(py_float(f64::NAN, true), "NaN");
        assert_eq!(py_float(f64::NEG_INFINITY, true), "-Infinity");
        assert_eq!(py_float(f64::INFINITY, false), "inf");
    }

    #[test]
    fn chat_strftime_utc() {
        // 2024-02-29 13:05:09 UTC, a Thursday (leap day).
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %-d, %j %I%p %y %F %T %%", t),
            "Thursday February 29, 060 01PM 24 2024-02-29 13:05:09 %"
        );
        assert_eq!(strftime("%a %e %u %w %Z %q", 0), "Thu  1 4 4 UTC %q");
        // 2000-12-31, day 366 of a leap year, a Sunday.
        let t = 978_220_800;
        assert_eq!(strftime("%F %j %a %u %w", t), "2000-12-31 366 Sun 7 0");
        // Before the epoch.
        assert_eq!(strftime("%F %T", -1), "1969-12-31 23:59:59");
    }

    #[test]
    fn chat_generation_tag_rewrite() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}c{% if x %}{% endif %}"),
            "a{%- if true -%}b{% endif %}c{% if x %}{% endif %}"
        );
        assert_eq!(rewrite_generation_tags("x {% unterminated"), "x {% unterminated");
    }
}

//! Chat templates rendered as Hugging Face transformers' `apply_chat_template`
//! renders them. The expected strings were produced by Jinja2 3.1 configured
//! the way transformers configures it (ImmutableSandboxedEnvironment,
//! trim_blocks, lstrip_blocks, loopcontrols, its `tojson`/`raise_exception`)
//! from the templates stored in the test models' GGUF metadata.

mod common;

use minnow_engine::chat::{render_plain, ChatError, ChatMessage, ChatTemplate, CHATML_TEMPLATE};

const SMOLLM: &str = "smollm2-135m-instruct-q4_1.gguf";
const GEMMA: &str = "gemma3-270m-q4_k_m.gguf";
const QWEN_05B: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const QWEN_15B: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";

/// The Gemma 3 instruction-tuned template (as shipped in the
/// `tokenizer_config.json` of google/gemma-3-*-it). The Gemma 3 270M test
/// model is the *base* model and has no template, so the Gemma format is
/// checked with this copy.
const GEMMA3_IT_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

/// (a): system + user + assistant + user.
fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are a terse assistant."),
        ChatMessage::new("user", "What is 2+2?"),
        ChatMessage::new("assistant", "4."),
        ChatMessage::new("user", "And 3+3?"),
    ]
}

/// (b): one user message, no system prompt.
fn single_user() -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", "Hello!")]
}

/// Non-ASCII, emoji, CJK, control characters, quotes, HTML-ish text and
/// surrounding whitespace, which must all reach the prompt untouched.
fn unicode_conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "Réponds en français 🙂"),
        ChatMessage::new("user", "日本語で「こんにちは」\n  — ok?  "),
        ChatMessage::new("assistant", "Ça va ✓"),
        ChatMessage::new("user", "ünïcödé\t<tag> & 'quotes' \"dq\" \\ end "),
    ]
}

fn model_template(file: &str) -> ChatTemplate {
    let f = common::open_model_file(file);
    ChatTemplate::from_gguf(&f)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .unwrap_or_else(|| panic!("{file} has no chat template"))
}

fn gemma3_it() -> ChatTemplate {
    ChatTemplate::new(GEMMA3_IT_TEMPLATE, "<bos>", "<eos>").unwrap()
}

const CHATML_CONVERSATION: &str = "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n\
<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
<|im_start|>assistant\n4.<|im_end|>\n\
<|im_start|>user\nAnd 3+3?<|im_end|>\n\
<|im_start|>assistant\n";

const CHATML_UNICODE: &str = "<|im_start|>system\nRéponds en français 🙂<|im_end|>\n\
<|im_start|>user\n日本語で「こんにちは」\n  — ok?  <|im_end|>\n\
<|im_start|>assistant\nÇa va ✓<|im_end|>\n\
<|im_start|>user\nünïcödé\t<tag> & 'quotes' \"dq\" \\ end <|im_end|>\n\
<|im_start|>assistant\n";

#[test]
fn every_test_model_is_known() {
    // Keeps this file in step with the shared model list.
    let files: Vec<&str> = common::MODELS.iter().map(|(_, f)| *f).collect();
    assert_eq!(files, [SMOLLM, GEMMA, QWEN_05B, QWEN_15B]);
}

#[test]
fn smollm2_template() {
    let t = model_template(SMOLLM);
    assert_eq!(t.bos_token(), "<|im_start|>");
    assert_eq!(t.eos_token(), "<|im_end|>");
    assert_eq!(t.render(&conversation(), true).unwrap(), CHATML_CONVERSATION);
    // SmolLM2 inserts its own default system prompt.
    assert_eq!(
        t.render(&single_user(), true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&single_user(), false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHello!<|im_end|>\n"
    );
    assert_eq!(t.render(&unicode_conversation(), true).unwrap(), CHATML_UNICODE);
    // SmolLM2's BOS token *is* `<|im_start|>`, which every prompt starts
    // with: adding BOS on top would double it.
    assert!(t.renders_bos());
}

#[test]
fn qwen25_coder_templates() {
    for file in [QWEN_05B, QWEN_15B] {
        let t = model_template(file);
        assert!(t.source().contains("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."));
        assert_eq!(t.bos_token(), "<|endoftext|>", "{file}");
        assert_eq!(t.eos_token(), "<|im_end|>", "{file}");
        assert_eq!(t.render(&conversation(), true).unwrap(), CHATML_CONVERSATION, "{file}");
        // Without a system message Qwen's template adds its default one.
        assert_eq!(
            t.render(&single_user(), true).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
            "{file}"
        );
        assert_eq!(
            t.render(&single_user(), false).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHello!<|im_end|>\n",
            "{file}"
        );
        assert_eq!(t.render(&unicode_conversation(), true).unwrap(), CHATML_UNICODE, "{file}");
        assert!(!t.renders_bos(), "{file}");
    }
}

#[test]
fn gemma3_base_model_has_no_template_and_falls_back_to_chatml() {
    let f = common::open_model_file(GEMMA);
    assert!(ChatTemplate::from_gguf(&f).unwrap().is_none());
    assert_eq!(render_plain(&conversation(), true), CHATML_CONVERSATION);
    assert_eq!(render_plain(&single_user(), true), "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(render_plain(&single_user(), false), "<|im_start|>user\nHello!<|im_end|>\n");
    assert_eq!(render_plain(&unicode_conversation(), true), CHATML_UNICODE);
}

#[test]
fn chatml_template_matches_render_plain() {
    let t = ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap();
    for msgs in [conversation(), single_user(), unicode_conversation(), vec![]] {
        for agp in [true, false] {
            assert_eq!(t.render(&msgs, agp).unwrap(), render_plain(&msgs, agp));
        }
    }
}

#[test]
fn gemma3_it_template() {
    let t = gemma3_it();
    // The system prompt is folded into the first user turn.
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?<end_of_turn>\n\
         <start_of_turn>model\n4.<end_of_turn>\n\
         <start_of_turn>user\nAnd 3+3?<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    assert_eq!(
        t.render(&single_user(), true).unwrap(),
        "<bos><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(t.render(&single_user(), false).unwrap(), "<bos><start_of_turn>user\nHello!<end_of_turn>\n");
    // Gemma trims each message (`| trim`); everything else passes through.
    assert_eq!(
        t.render(&unicode_conversation(), true).unwrap(),
        "<bos><start_of_turn>user\nRéponds en français 🙂\n\n日本語で「こんにちは」\n  — ok?<end_of_turn>\n\
         <start_of_turn>model\nÇa va ✓<end_of_turn>\n\
         <start_of_turn>user\nünïcödé\t<tag> & 'quotes' \"dq\" \\ end<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    // `{{ bos_token }}` comes first: the caller must not add another BOS.
    assert!(t.renders_bos());
    assert!(t.starts_with_bos(&t.render(&single_user(), true).unwrap()));
}

#[test]
fn raise_exception_carries_the_templates_message() {
    let t = gemma3_it();
    let bad = [
        vec![ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
        vec![ChatMessage::new("assistant", "a")],
        vec![ChatMessage::new("system", "s"), ChatMessage::new("assistant", "x")],
    ];
    for msgs in bad {
        match t.render(&msgs, true) {
            Err(ChatError::Raised { message, line, .. }) => {
                assert_eq!(message, "Conversation roles must alternate user/assistant/user/assistant/...");
                assert_eq!(line, Some(15));
            }
            other => panic!("expected ChatError::Raised, got {other:?}"),
        }
    }
    let err = t.render(&[ChatMessage::new("assistant", "a")], true).unwrap_err().to_string();
    assert_eq!(
        err,
        "chat template rejected the conversation at line 15: \
         Conversation roles must alternate user/assistant/user/assistant/..."
    );
    assert!(!err.contains('\n'));

    // From a GGUF, the error names the model's template.
    let named = ChatTemplate::with_name(
        "tokenizer.chat_template of 'X'",
        "{{ raise_exception('no: ' + messages[0].role) }}",
        "",
        "",
    )
    .unwrap();
    let err = named.render(&single_user(), true).unwrap_err().to_string();
    assert_eq!(err, "tokenizer.chat_template of 'X' rejected the conversation at line 1: no: user");
}

#[test]
fn from_gguf_names_the_model_in_errors() {
    let t = model_template(QWEN_05B);
    assert!(t.name().starts_with("tokenizer.chat_template of '"), "{}", t.name());
    // Qwen's template indexes messages[0]['role']: with no messages that is
    // an undefined lookup, which Jinja2 also rejects.
    let err = t.render(&[], true).unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err:?}");
    assert!(err.to_string().starts_with(t.name()), "{err}");
    assert!(err.to_string().ends_with(": render failed at line 15: undefined value"), "{err}");
}

#[test]
fn syntax_errors_are_reported_by_new() {
    for src in ["{% if messages %}unclosed", "{{ messages[0].role ", "{% for %}{% endfor %}", "{% endif %}"] {
        let err = ChatTemplate::new(src, "", "").unwrap_err();
        assert!(matches!(err, ChatError::Syntax { .. }), "{src}: {err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("chat template: syntax error at line 1: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
    let err = ChatTemplate::new("ok\n{% if x %}\n{% endfor %}", "", "").unwrap_err().to_string();
    assert_eq!(err, "chat template: syntax error at line 3: unknown statement endfor");
}

/// Renders a one-off template against a fixed two-message conversation.
fn eval(src: &str) -> String {
    let msgs = [ChatMessage::new("user", "Héllo wörld"), ChatMessage::new("assistant", " ok ")];
    let t = ChatTemplate::new(src, "<s>", "</s>").unwrap_or_else(|e| panic!("{e}"));
    t.render(&msgs, true).unwrap_or_else(|e| panic!("{src}: {e}"))
}

#[test]
fn python_string_list_and_dict_methods() {
    assert_eq!(eval(r#"[{{ "  x ".strip() }}]"#), "[x]");
    // Printed as Python prints a list.
    assert_eq!(eval(r#"{{ "a,b".split(",") }}"#), "['a', 'b']");
    assert_eq!(
        eval(r#"{{ messages[0].content.startswith("Hé") }} {{ messages[0].content.endswith("x") }}"#),
        "True False"
    );
    assert_eq!(
        eval(
            r#"{{ "xxhixx".lstrip("x") }}|{{ "  hi  ".rstrip() }}|{{ "hello world".title() }}|{{ "Ab".upper() }}{{ "Ab".lower() }}|{{ "a-b-c".replace("-", "+") }}"#
        ),
        "hixx|  hi|Hello World|ABab|a+b+c"
    );
    assert_eq!(
        eval(
            r#"{% for k, v in {"a": 1, "b": "ü"}.items() %}{{ k }}={{ v }};{% endfor %}{{ {"a": 1}.get("a") }}{{ {"a": 1}.get("z", "dflt") }}"#
        ),
        "a=1;b=ü;1dflt"
    );
    assert_eq!(
        eval(r#"{{ "a b  c".split() }}{{ "x".join(["1","2"]) }}{{ " abc ".strip().capitalize() }}"#),
        "['a', 'b', 'c']1x2Abc"
    );
    assert_eq!(eval(r#"{{ messages | length }} {{ messages[-1]["content"] | trim }}"#), "2 ok");
}

#[test]
fn tojson_is_transformers_tojson() {
    // ensure_ascii=False: non-ASCII stays as is; Python's ", " / ": ".
    assert_eq!(eval("{{ messages[0] | tojson }}"), r#"{"role": "user", "content": "Héllo wörld"}"#);
    assert_eq!(
        eval(r#"{{ {"name": "日本", "n": [1, 2.5, true, none], "e": {}, "l": []} | tojson }}"#),
        r#"{"name": "日本", "n": [1, 2.5, true, null], "e": {}, "l": []}"#
    );
    // No HTML escaping (unlike Jinja's/minijinja's built-in tojson); indent.
    assert_eq!(
        eval(r#"{{ {"b": "<&>'", "a": [1, {"c": None}]} | tojson(indent=2) }}"#),
        "{\n  \"b\": \"<&>'\",\n  \"a\": [\n    1,\n    {\n      \"c\": null\n    }\n  ]\n}"
    );
    assert_eq!(
        eval(r#"{{ {"b": 1, "a": "é"} | tojson(sort_keys=true, ensure_ascii=true) }}"#),
        r#"{"a": "\u00e9", "b": 1}"#
    );
    assert_eq!(eval(r#"{{ [1, 2] | tojson(separators=(",", ":")) }}"#), "[1,2]");
    // json.dumps cannot serialize Undefined; neither can we.
    let t = ChatTemplate::new("{{ nothing | tojson }}", "", "").unwrap();
    assert!(matches!(t.render(&single_user(), true), Err(ChatError::Render { .. })));
}

#[test]
fn jinja2_semantics() {
    // Python's str() of values, undefined prints as nothing.
    assert_eq!(
        eval(
            r#"{{ none }} {{ true }} {{ false }} {{ [1, "a", none, true, {"k": "it's"}] }} {{ 1.0 }} {{ 3 }} {{ undefined_var }}"#
        ),
        r#"None True False [1, 'a', None, True, {'k': "it's"}] 1.0 3 "#
    );
    assert_eq!(eval("{{ True }}{{ None }}{{ False }}"), "TrueNoneFalse");
    // tools/documents are None, as transformers passes them.
    assert_eq!(
        eval("{% if tools is none and documents is none %}no tools{% endif %}{% if not tools %}!{% endif %}"),
        "no tools!"
    );
    assert_eq!(
        eval(
            r#"{%- set ns = namespace(found=false) -%}{%- for m in messages -%}{%- if m.role == "user" -%}{%- set ns.found = true -%}{%- endif -%}{%- endfor -%}{{ ns.found }}"#
        ),
        "True"
    );
    // trim_blocks + lstrip_blocks on, trailing newline dropped.
    assert_eq!(eval("  {% if true %}\n    x\n  {% endif %}\nend\n"), "    x\nend");
    // loop controls.
    assert_eq!(
        eval("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"),
        "user"
    );
    assert_eq!(eval("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}"), "<s>|</s>|True");
    // transformers' {% generation %} tag renders its body.
    assert_eq!(
        eval("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endif %}{% endfor %}"),
        "[ ok ]"
    );
}

#[test]
fn strftime_now_formats_the_current_date() {
    let s = eval(r#"{{ strftime_now("%Y-%m-%d") }}|{{ strftime_now("%d %b %Y") }}"#);
    let (iso, human) = s.split_once('|').unwrap();
    let parts: Vec<u32> = iso.split('-').map(|p| p.parse().unwrap()).collect();
    assert!(parts[0] >= 2024 && (1..=12).contains(&parts[1]) && (1..=31).contains(&parts[2]), "{s}");
    assert!(human.ends_with(&parts[0].to_string()), "{s}");
}

#[test]
fn templates_are_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
    let t = std::sync::Arc::new(gemma3_it());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || t.render(&[ChatMessage::new("user", format!("n{i}"))], true).unwrap())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), format!("<bos><start_of_turn>user\nn{i}<end_of_turn>\n<start_of_turn>model\n"));
    }
}

#[test]
fn chat_message_serde_round_trip() {
    let m = ChatMessage::new("user", "hé");
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(json, r#"{"role":"user","content":"hé"}"#);
    assert_eq!(serde_json::from_str::<ChatMessage>(&json).unwrap(), m);
}

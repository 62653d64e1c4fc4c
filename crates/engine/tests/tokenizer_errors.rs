//! Tokenizers built from small synthetic GGUF metadata: broken metadata gives
//! a clear error (never a panic), and the edge paths real models do not reach
//! (byte fallback without byte tokens, merge results missing from the
//! vocabulary) behave.

use minnow_engine::tokenizer::{Tokenizer, TokenizerError};
use minnow_gguf::{GgufFile, GgufWriter, Value, ValueType};

fn strs(v: &[&str]) -> Value {
    Value::Array(ValueType::String, v.iter().map(|s| Value::String(s.to_string())).collect())
}

fn ints(v: &[i32]) -> Value {
    Value::Array(ValueType::I32, v.iter().map(|&x| Value::I32(x)).collect())
}

fn floats(v: &[f32]) -> Value {
    Value::Array(ValueType::F32, v.iter().map(|&x| Value::F32(x)).collect())
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// GPT-2's stand-in character for each byte.
fn byte_char(b: u8) -> char {
    let printable = |x: u32| (0x21..=0x7E).contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    let cp = if printable(b as u32) { b as u32 } else { 256 + (0..b as u32).filter(|&x| !printable(x)).count() as u32 };
    char::from_u32(cp).unwrap()
}

/// A valid byte-level BPE vocabulary: the 256 byte tokens, "ab", "abc", a
/// control token, and merges a+b, ab+c, then x+y (whose result "xy" is not a
/// token).
fn bpe_meta() -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    tokens.extend(["ab".into(), "abc".into(), "<|end|>".into()]);
    let mut types = vec![1; 258];
    types.push(3);
    let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), strs(&toks)),
        ("tokenizer.ggml.token_type".into(), ints(&types)),
        ("tokenizer.ggml.merges".into(), strs(&["a b", "ab c", "x y"])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(258)),
    ]
}

/// A small SentencePiece vocabulary without byte tokens.
fn spm_meta() -> Vec<(String, Value)> {
    vec![
        ("tokenizer.ggml.model".into(), s("llama")),
        ("tokenizer.ggml.tokens".into(), strs(&["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"])),
        ("tokenizer.ggml.scores".into(), floats(&[0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -3.0, -4.0, -0.5])),
        ("tokenizer.ggml.token_type".into(), ints(&[2, 3, 3, 1, 1, 1, 1, 1, 1])),
    ]
}

fn build(meta: &[(String, Value)]) -> Result<Tokenizer, TokenizerError> {
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k.clone(), v.clone()).expect("writer accepts metadata");
    }
    let f = GgufFile::from_bytes(w.to_bytes()).expect("valid gguf");
    Tokenizer::from_gguf(&f)
}

fn with(mut meta: Vec<(String, Value)>, key: &str, value: Option<Value>) -> Vec<(String, Value)> {
    meta.retain(|(k, _)| k != key);
    if let Some(v) = value {
        meta.push((key.to_string(), v));
    }
    meta
}

fn err(meta: &[(String, Value)]) -> String {
    match build(meta) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn synthetic_vocabularies_work() {
    let bpe = build(&bpe_meta()).unwrap();
    assert_eq!(bpe.encode("abc", false, false).unwrap(), [257]);
    assert_eq!(bpe.encode("ab ab", false, false).unwrap(), [256, byte_id(b' '), 256]);
    // "xy" merges into a symbol that is no token: llama.cpp then emits the
    // one-byte tokens it is made of.
    assert_eq!(bpe.encode("xy", false, false).unwrap(), [byte_id(b'x'), byte_id(b'y')]);
    assert_eq!(bpe.encode("<|end|>", false, true).unwrap(), [258]);
    assert!(bpe.encode("<|end|>", false, false).unwrap().len() > 1);
    assert!(bpe.is_end_of_generation(258));
    assert_eq!((bpe.bos_id(), bpe.add_bos()), (None, false));
    assert_eq!(bpe.decode(&bpe.encode("héllo\u{0} wörld", false, false).unwrap()), "héllo\u{0} wörld");

    let spm = build(&spm_meta()).unwrap();
    // Default add_space_prefix (true) and add_bos (true) for SentencePiece.
    assert_eq!(spm.encode("ab a", true, false).unwrap(), [1, 8, 6]);
    assert_eq!(spm.decode(&[8, 6]), " ab a");
    // No byte tokens: characters outside the vocabulary become <unk>.
    assert_eq!(spm.encode("a€", false, false).unwrap(), [6, 0, 0, 0]);
    assert_eq!(spm.encode("</s>", false, true).unwrap(), [2]);
}

fn byte_id(b: u8) -> u32 {
    b as u32
}

/// Without byte tokens, a character outside the vocabulary becomes the
/// unknown token once per byte; SentencePiece's default unknown id is 0 when
/// the metadata names none.
#[test]
fn unencodable_characters_fall_back_to_default_unk() {
    let meta = with(spm_meta(), "tokenizer.ggml.token_type", Some(ints(&[1, 3, 3, 1, 1, 1, 1, 1, 1])));
    let meta = with(meta, "tokenizer.ggml.tokens", Some(strs(&["x", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"])));
    let tok = build(&meta).unwrap();
    assert_eq!(tok.encode("€", false, false).unwrap(), [3, 0, 0, 0]);
}

#[test]
fn bad_metadata_is_a_clear_error() {
    let cases: Vec<(Vec<(String, Value)>, &str)> = vec![
        (with(bpe_meta(), "tokenizer.ggml.model", None), "tokenizer.ggml.model is missing"),
        (with(bpe_meta(), "tokenizer.ggml.model", Some(s("bert"))), "unsupported tokenizer model `bert`"),
        (with(bpe_meta(), "tokenizer.ggml.model", Some(Value::U32(2))), "tokenizer.ggml.model is not a string"),
        (with(bpe_meta(), "tokenizer.ggml.tokens", None), "tokenizer.ggml.tokens is missing"),
        (with(bpe_meta(), "tokenizer.ggml.tokens", Some(s("a"))), "tokenizer.ggml.tokens is not an array"),
        (with(bpe_meta(), "tokenizer.ggml.tokens", Some(ints(&[1, 2]))), "tokenizer.ggml.tokens[0] is not a string"),
        (with(bpe_meta(), "tokenizer.ggml.tokens", Some(strs(&[]))), "tokenizer.ggml.tokens is empty"),
        (
            with(spm_meta(), "tokenizer.ggml.tokens", Some(strs(&["a", "b", "a", "c", "d", "e", "f", "g", "h"]))),
            "contains `a` twice",
        ),
        (with(bpe_meta(), "tokenizer.ggml.token_type", Some(ints(&[1, 1]))), "token_type has 2 entries for 259 tokens"),
        (with(bpe_meta(), "tokenizer.ggml.token_type", Some(strs(&["x"; 259]))), "token_type[0] is not an integer"),
        (with(spm_meta(), "tokenizer.ggml.scores", Some(floats(&[1.0]))), "scores has 1 entries for 9 tokens"),
        (with(spm_meta(), "tokenizer.ggml.scores", Some(strs(&["x"; 9]))), "scores[0] is not a number"),
        (with(bpe_meta(), "tokenizer.ggml.merges", None), "tokenizer.ggml.merges is missing"),
        (with(bpe_meta(), "tokenizer.ggml.merges", Some(strs(&["a b", "ab zz"]))), "merge #1 `ab zz` refers to `zz`"),
        (with(bpe_meta(), "tokenizer.ggml.merges", Some(strs(&["ab"]))), "merge #0 `ab` is not two tokens"),
        (with(bpe_meta(), "tokenizer.ggml.merges", Some(ints(&[3]))), "tokenizer.ggml.merges[0] is not a string"),
        (with(bpe_meta(), "tokenizer.ggml.pre", Some(s("no-such-pre"))), "unknown BPE pre-tokenizer `no-such-pre`"),
        (with(bpe_meta(), "tokenizer.ggml.eos_token_id", Some(Value::U32(259))), "eos_token_id = 259 is out of range"),
        (
            with(bpe_meta(), "tokenizer.ggml.bos_token_id", Some(Value::I32(-1))),
            "bos_token_id is not an unsigned integer",
        ),
        (
            with(bpe_meta(), "tokenizer.ggml.eot_token_id", Some(Value::U64(u64::MAX))),
            "eot_token_id = 18446744073709551615 is out of range",
        ),
        (with(bpe_meta(), "tokenizer.ggml.add_bos_token", Some(Value::U8(1))), "add_bos_token is not a bool"),
        (
            with(bpe_meta(), "tokenizer.ggml.add_bos_token", Some(Value::Bool(true))),
            "add_bos_token is set but there is no BOS token",
        ),
    ];
    for (meta, want) in cases {
        let e = err(&meta);
        assert!(e.contains(want), "error {e:?} should mention {want:?}");
    }
    // The unknown pre-tokenizer error lists the supported ones.
    let e = err(&with(bpe_meta(), "tokenizer.ggml.pre", Some(s("no-such-pre"))));
    for name in ["default", "gpt2", "llama-bpe", "qwen2", "smollm"] {
        assert!(e.contains(name), "{e}");
    }
}

#[test]
fn missing_pre_means_default_and_spm_ignores_pre() {
    let tok = build(&with(bpe_meta(), "tokenizer.ggml.pre", None)).unwrap();
    assert_eq!(tok.encode("abc", false, false).unwrap(), [257]);
    // SentencePiece vocabularies have no pre-tokenizer; any name is accepted.
    assert!(build(&with(spm_meta(), "tokenizer.ggml.pre", Some(s("whatever")))).is_ok());
}

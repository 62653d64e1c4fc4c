//! Property tests over random text, for each test model: streaming decode
//! equals whole decode, decode inverts encode, and encode never fails or
//! panics whatever the input (special-token fragments included).

mod common;

use minnow_engine::tokenizer::{StreamDecoder, Tokenizer};
use minnow_gguf::GgufFile;
use proptest::prelude::*;
use std::sync::OnceLock;

/// Each model's tokenizer, loaded once per test binary.
fn tokenizers() -> &'static Vec<(&'static str, Tokenizer)> {
    static TOKS: OnceLock<Vec<(&'static str, Tokenizer)>> = OnceLock::new();
    TOKS.get_or_init(|| {
        common::MODELS
            .iter()
            .map(|&(_, file)| {
                let f = GgufFile::open(common::model_path(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
                (file, Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{file}: {e}")))
            })
            .collect()
    })
}

fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut d = StreamDecoder::default();
    let mut s: String = ids.iter().map(|&id| d.push(tok, id)).collect();
    s.push_str(&d.finish());
    s
}

/// Text built from pieces that stress the tokenizers: special-token text,
/// whitespace runs, digits, contractions, and arbitrary characters.
fn texty() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<char>().prop_map(|c| c.to_string()),
        "[ \t\r\n\u{a0}\u{3000}]{1,5}",
        "[0-9]{1,8}",
        "'(s|t|re|ve|m|ll|d|S|T|RE|VE|M|LL|D)",
        "\\PC{1,6}",
        prop::sample::select(vec![
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<bos>",
            "<s>",
            "</s>",
            "<tool_call>",
            "<unused7>",
            "\n\n",
            "▁",
            "Ġ",
            "👍🏽",
            "e\u{301}",
            "中文",
            "<0x0A>",
        ])
        .prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Streaming the ids of random text gives the text back, piece by piece.
    #[test]
    fn stream_decode_of_encoded_text(s in texty(), parse in any::<bool>()) {
        for (file, tok) in tokenizers() {
            let ids = tok.encode(&s, false, parse).expect("encode");
            let whole = tok.decode(&ids);
            if representable(tok, &s) {
                prop_assert_eq!(&whole, &s, "{}: round trip via {:?}", file, ids);
            }
            prop_assert_eq!(stream(tok, &ids), whole, "{}", file);
        }
    }

    /// Any id sequence (byte tokens cutting characters apart, invalid UTF-8,
    /// out-of-range ids): streaming equals decoding all at once.
    #[test]
    fn stream_decode_of_random_ids(picks in prop::collection::vec(any::<u32>(), 0..40)) {
        for (file, tok) in tokenizers() {
            let n = tok.vocab_size() as u32;
            // Mostly valid ids, biased towards the low ids where byte tokens live.
            let ids: Vec<u32> = picks.iter().map(|&p| match p % 4 {
                0 => p,
                1 => (p >> 2) % 512,
                _ => (p >> 2) % n,
            }).collect();
            prop_assert_eq!(stream(tok, &ids), tok.decode(&ids), "{}: {:?}", file, ids);
        }
    }

    /// Arbitrary strings (any code points) round-trip in both modes.
    #[test]
    fn arbitrary_strings_round_trip(s in any::<String>()) {
        for (file, tok) in tokenizers() {
            for parse in [false, true] {
                let ids = tok.encode(&s, true, parse).expect("encode");
                let skip = usize::from(tok.add_bos());
                if representable(tok, &s) {
                    prop_assert_eq!(tok.decode(&ids[skip..]), s.clone(), "{}", file);
                }
            }
        }
    }
}

/// A multi-byte character split over byte-fallback tokens comes out only once
/// complete; a dangling partial character is flushed as U+FFFD.
#[test]
fn stream_waits_for_whole_characters() {
    for (file, tok) in tokenizers() {
        // Byte tokens: `<0xXX>` in SentencePiece vocabularies; for byte-level
        // BPE, the token of each byte's stand-in character.
        let bytes: Vec<u32> = "€".bytes().map(|b| byte_token(tok, b)).collect();
        let mut d = StreamDecoder::default();
        assert_eq!(d.push(tok, bytes[0]), "", "{file}");
        assert_eq!(d.push(tok, bytes[1]), "", "{file}");
        assert_eq!(d.push(tok, bytes[2]), "€", "{file}");
        assert_eq!(d.push(tok, bytes[0]), "", "{file}");
        assert_eq!(d.finish(), "\u{FFFD}", "{file}");
        assert_eq!(d.finish(), "", "{file}");
    }
}

/// Whether every byte of `s` has a token. SmolLM2's byte-level vocabulary
/// lacks a few (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, and the lead bytes 0xF1,
/// 0xF2 of planes 4-11): llama.cpp drops those bytes, and so do we, so such
/// text cannot round-trip through that model. In SentencePiece vocabularies
/// a literal `▁` is the escaped space, so it comes back as a space.
fn representable(tok: &Tokenizer, s: &str) -> bool {
    let spm = tok.token_id("<0x41>").is_some();
    s.bytes().all(|b| try_byte_token(tok, b).is_some()) && !(spm && s.contains('▁'))
}

fn byte_token(tok: &Tokenizer, b: u8) -> u32 {
    try_byte_token(tok, b).unwrap_or_else(|| panic!("no token for byte {b:#x}"))
}

fn try_byte_token(tok: &Tokenizer, b: u8) -> Option<u32> {
    if let Some(id) = tok.token_id(&format!("<0x{b:02X}>")) {
        return Some(id);
    }
    // GPT-2 byte-level: printable Latin-1 bytes stand for themselves, the
    // others are numbered in order from U+0100.
    let printable = |x: u32| (0x21..=0x7E).contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    let cp = if printable(b as u32) { b as u32 } else { 256 + (0..b as u32).filter(|&x| !printable(x)).count() as u32 };
    let c = char::from_u32(cp).expect("code point");
    tok.token_id(&c.to_string())
}

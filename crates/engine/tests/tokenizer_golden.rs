//! Tokenizer against llama.cpp's reference ids for the four test models (both
//! modes, every case), plus held-out round trips, special-token parsing and a
//! speed sanity check.

mod common;

use minnow_engine::tokenizer::Tokenizer;
use minnow_gguf::GgufFile;
use std::sync::OnceLock;
use std::time::Instant;

fn open(file: &str) -> Tokenizer {
    let f = GgufFile::open(common::model_path(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Each model's tokenizer, loaded once per test binary.
fn load(file: &str) -> &'static Tokenizer {
    static TOKS: OnceLock<Vec<(&'static str, Tokenizer)>> = OnceLock::new();
    let all = TOKS.get_or_init(|| common::MODELS.iter().map(|&(_, f)| (f, open(f))).collect());
    &all.iter().find(|(f, _)| *f == file).unwrap_or_else(|| panic!("{file} is not a test model")).1
}

/// Every golden case of every model, both modes; all mismatches of a model in
/// one message.
#[test]
fn golden_ids_match_llama_cpp() {
    let mut failures = Vec::new();
    for (dir, file) in common::MODELS {
        let tok = load(file);
        let golden = common::golden_json(dir, "tokenize.json");
        assert_eq!(golden["model_file"].as_str(), Some(file), "golden data is for another model");
        let cases = golden["cases"].as_array().expect("cases");
        assert!(!cases.is_empty());
        let mut bad = Vec::new();
        for case in cases {
            let text = case["text"].as_str().expect("text");
            for (mode, add, parse) in [("with_special", true, false), ("parse_special", false, true)] {
                let want = common::json_ids(&case[mode]);
                let got = tok.encode(text, add, parse).expect("encode");
                if got != want {
                    bad.push(format!("  {mode} {text:?}\n    want {want:?}\n    got  {got:?}"));
                }
            }
        }
        if !bad.is_empty() {
            failures.push(format!("{dir}: {} mismatches\n{}", bad.len(), bad.join("\n")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Held-out strings of the kinds the golden set covers, and some nastier ones.
const ROUND_TRIP: &[&str] = &[
    "",
    " ",
    "Hello, World!",
    "DON'T STOP ME NOW, I'M HAVING SUCH A GOOD TIME",
    "we'd've thought they'll've; it's 'quoted' 'S 'T",
    "1234567 12 3.5e10 0.000001 -99 1,000,000 ١٢٣ 𝟙𝟚𝟛 ½",
    "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏿 🇯🇵🇺🇸 ❤️ 🤖",
    "中文测试：你好，世界！這是繁體字。한국어 텍스트입니다.",
    "ภาษาไทย हिन्दी বাংলা தமிழ் ქართული",
    "مرحبا بكم في العالم، كيف حالك؟ שלום עולם",
    "e\u{301} a\u{308}\u{304} n\u{303} Z\u{335}\u{321}\u{34d}a\u{337}l\u{338}g\u{336}o",
    "\t\t\tindent\n\n\n\nblank lines\r\n\r\nCRLF \u{a0}nbsp\u{2003}emsp\u{3000}ideographic",
    "   \n  \t \n",
    "fn main() {\n    let x: Vec<u8> = vec![0x1F, 0o7, 0b1];\n    println!(\"{x:?}\");\n}\n",
    "if (a && b || !c) { return *p->q[i++]; } // comment /* block */",
    "<|im_start|>system\nYou are<|im_end|>\n<start_of_turn>model\n<end_of_turn><eos><bos><s></s>[INST]",
    "<|endoftext|><|endoftext|> <tool_call>{\"a\": 1}</tool_call> <|fim_prefix|>",
    "<unused0><mask><pad>[multimodal]<table><tr><td>x</td></tr></table>",
    "a\u{0}b\u{1}c\u{7f}d\u{85}e\u{feff}f\u{200b}g\u{e000}h\u{10ffff}",
    "ſ K Å ǅ ﬁ Ⅻ ⓐ ＡＢＣ１２３",
    "x____y----z....w!!!!??..,,;;::''\"\"``~~^^",
    "        many spaces        and tabs\t\t\t\tend   ",
    "\n",
    "\r",
    "'",
    "'s",
];

#[test]
fn decode_inverts_encode() {
    for (_, file) in common::MODELS {
        let tok = load(file);
        for s in ROUND_TRIP {
            for parse in [false, true] {
                let ids = tok.encode(s, false, parse).expect("encode");
                assert_eq!(tok.decode(&ids), *s, "{file}: round trip of {s:?} (parse_special {parse}) via {ids:?}");
            }
        }
        let long: String = ROUND_TRIP.concat().repeat(20);
        let ids = tok.encode(&long, false, false).expect("encode");
        assert_eq!(tok.decode(&ids), long, "{file}: long round trip");
    }
}

#[test]
fn special_tokens_parse_only_when_asked() {
    for (_, file) in common::MODELS {
        let tok = load(file);
        let mut checked = 0;
        for name in
            ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"]
        {
            let Some(id) = tok.token_id(name) else { continue };
            assert!(tok.is_special(id), "{file}: {name} should be special");
            assert_eq!(tok.encode(name, false, true).unwrap(), [id], "{file}: {name} parsed");
            let plain = tok.encode(name, false, false).unwrap();
            assert!(plain.len() > 1 && !plain.contains(&id), "{file}: {name} unparsed gave {plain:?}");
            assert_eq!(tok.decode(&plain), name);
            // Between text, too.
            let around = tok.encode(&format!("hi{name}there"), false, true).unwrap();
            assert_eq!(around.iter().filter(|&&x| x == id).count(), 1, "{file}: {around:?}");
            assert_eq!(tok.decode(&around), format!("hi{name}there"));
            checked += 1;
        }
        assert!(checked >= 2, "{file}: expected some chat special tokens");
    }
}

#[test]
fn metadata_accessors() {
    let smol = load("smollm2-135m-instruct-q4_1.gguf");
    assert_eq!(smol.vocab_size(), 49152);
    assert_eq!((smol.bos_id(), smol.eos_id(), smol.add_bos()), (Some(1), Some(2), false));
    assert!(smol.is_end_of_generation(smol.token_id("<|im_end|>").unwrap()));
    assert!(smol.is_end_of_generation(2));
    assert!(!smol.is_end_of_generation(smol.token_id("Hello").unwrap()));

    let gemma = load("gemma3-270m-q4_k_m.gguf");
    assert_eq!((gemma.bos_id(), gemma.eos_id(), gemma.add_bos()), (Some(2), Some(1), true));
    assert!(gemma.is_end_of_generation(gemma.token_id("<end_of_turn>").unwrap()));
    assert_eq!(gemma.encode("hi", true, false).unwrap()[0], 2);
    assert_eq!(gemma.token_bytes(gemma.token_id("<0x0A>").unwrap()), b"\n");
    assert_eq!(gemma.token_bytes(gemma.token_id("▁world").unwrap()), b" world");
    assert_eq!(gemma.token_text(gemma.token_id("▁world").unwrap()), "▁world");
    assert!(!gemma.is_special(gemma.token_id("\n").unwrap()), "user-defined newline is text");

    let qwen = load("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    assert_eq!((qwen.eos_id(), qwen.add_bos()), (Some(151645), false));
    for name in ["<|im_end|>", "<|endoftext|>"] {
        assert!(qwen.is_end_of_generation(qwen.token_id(name).unwrap()), "{name}");
    }
    assert!(!qwen.is_end_of_generation(qwen.token_id("<|im_start|>").unwrap()));
    assert_eq!(qwen.token_bytes(qwen.token_id("Ġworld").unwrap()), b" world");
    assert_eq!(qwen.token_text(u32::MAX), "");
    assert!(qwen.token_bytes(u32::MAX).is_empty());
    assert_eq!(qwen.encode("", true, true).unwrap(), Vec::<u32>::new());
    assert_eq!(gemma.encode("", true, true).unwrap(), vec![2]);
}

/// A 100 KB mixed text must encode in well under a second per model.
#[test]
fn encoding_is_fast() {
    let unit = "The quick brown fox — 素早い茶色の狐 — jumps over 1234567 lazy dogs! 🦊🐕\n\
                fn f(x: u32) -> u32 { x * 2 }  // code\n\t\tindented\r\n<|im_end|> ";
    let text = unit.repeat(100_000 / unit.len() + 1);
    let aaa = "a".repeat(100_000);
    let spaces = " ".repeat(50_000) + &"\n".repeat(50_000);
    for (_, file) in common::MODELS {
        let start = Instant::now();
        let tok = open(file);
        println!("{file}: loaded in {:?}", start.elapsed());
        for (what, t) in [("mixed", &text), ("one long word", &aaa), ("whitespace", &spaces)] {
            let start = Instant::now();
            let ids = tok.encode(t, true, true).expect("encode");
            let took = start.elapsed();
            assert!(!ids.is_empty());
            println!("{file}: {what}: {} bytes -> {} ids in {took:?}", t.len(), ids.len());
            assert!(took.as_secs_f64() < 0.5, "{file}: {what} 100 KB took {took:?}");
        }
    }
}

//! Tokenizers built from GGUF metadata, producing exactly llama.cpp's ids.
//!
//! Two vocabulary kinds are supported:
//! - byte-level BPE (`tokenizer.ggml.model = gpt2`: SmolLM, Qwen, Llama 3...),
//!   with the pre-tokenizer named by `tokenizer.ggml.pre` (`pretok`) and
//!   merge ranks from `tokenizer.ggml.merges` (`bpe`);
//! - SentencePiece-style BPE (`llama`: Gemma, Llama 2...) driven by token
//!   scores, with `<0xXX>` byte fallback (`spm`).
//!
//! Before either runs, special-token text is cut out of the input
//! (`special`): control tokens only when asked to parse special tokens,
//! user-defined tokens always (llama.cpp and Hugging Face agree on that; for
//! Gemma 3 it is what turns newline and space runs into their own tokens).
//!
//! Token types and defaults follow llama.cpp's `llama-vocab.cpp`, including its
//! fix-ups: well-known end/FIM tokens are forced to control type, and the
//! end-of-generation set is built from EOS, EOT and those names.

mod bpe;
mod pretok;
mod special;
mod spm;
mod vocab;

use minnow_gguf::{GgufFile, Value};
use special::{Frag, SpecialMatcher};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Why a tokenizer could not be built, or text could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("bad tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer model `{0}` (tokenizer.ggml.model; supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unknown BPE pre-tokenizer `{name}` (tokenizer.ggml.pre; supported: {supported})")]
    UnknownPreTokenizer { name: String, supported: String },
    #[error("cannot encode byte 0x{0:02X}: the vocabulary has neither a byte token for it nor an unknown token")]
    Unencodable(u8),
    #[error("text of {0} bytes is too long to tokenize (limit 4 GiB)")]
    TooLong(usize),
}

/// A small multiplicative hasher for the hot id-pair and token-string maps
/// (the default SipHash is several times slower and the keys are not
/// attacker-chosen: they are the model's own vocabulary).
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn mix(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.mix(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.mix(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.mix(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.mix(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // Spread the mixed low bits into the high bits the table uses.
        self.0 ^ (self.0 >> 29)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

pub(crate) fn fast_map<K, V>(capacity: usize) -> FastMap<K, V> {
    HashMap::with_capacity_and_hasher(capacity, Default::default())
}

/// Token type, from `tokenizer.ggml.token_type` (llama.cpp's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attr {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl Attr {
    fn from_type(t: i64) -> Attr {
        match t {
            1 => Attr::Normal,
            2 => Attr::Unknown,
            3 => Attr::Control,
            4 => Attr::UserDefined,
            5 => Attr::Unused,
            6 => Attr::Byte,
            _ => Attr::Undefined,
        }
    }
}

enum Model {
    Bpe { bpe: bpe::Bpe, pre: pretok::PreTokenizer, char_to_byte: Vec<i16> },
    Spm { spm: spm::Spm, add_space_prefix: bool },
}

/// A tokenizer for one model's vocabulary. Cheap to share (`&Tokenizer` is all
/// encoding and decoding need).
pub struct Tokenizer {
    model: Model,
    vocab: vocab::Vocab,
    attrs: Vec<Attr>,
    special: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Sorted.
    eog: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.model {
            Model::Bpe { pre, .. } => format!("byte-level BPE, pre-tokenizer {}", pre.name),
            Model::Spm { add_space_prefix, .. } => format!("SentencePiece BPE, add_space_prefix {add_space_prefix}"),
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("end_of_generation", &self.eog)
            .finish()
    }
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

/// Names llama.cpp recognises as end-of-generation tokens.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];
/// End-of-turn names (forced to control type when no EOT id is given).
const EOT_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
/// Fill-in-the-middle names per role: (metadata key suffix, names, end of generation).
const FIM_NAMES: &[(&str, &[&str], bool)] = &[
    (
        "fim_pre_token_id",
        &["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>"],
        false,
    ),
    (
        "fim_suf_token_id",
        &["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>"],
        false,
    ),
    (
        "fim_mid_token_id",
        &["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>"],
        false,
    ),
    ("fim_pad_token_id", &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"], true),
    ("fim_rep_token_id", &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"], true),
    ("fim_sep_token_id", &["<|file_sep|>"], true),
];

fn meta_err(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Metadata(msg.into())
}

/// Reads metadata with type checks: absent is `None`, present with the wrong
/// type is an error.
struct Meta<'a>(&'a GgufFile);

impl<'a> Meta<'a> {
    fn str(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| meta_err(format!("{key} is not a string"))),
        }
    }
    fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| meta_err(format!("{key} is not a bool"))),
        }
    }
    /// A token id, which must be inside the vocabulary.
    fn id(&self, key: &str, n_vocab: usize) -> Result<Option<u32>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => {
                let id = v.as_u64().ok_or_else(|| meta_err(format!("{key} is not an unsigned integer")))?;
                if id >= n_vocab as u64 {
                    return Err(meta_err(format!("{key} = {id} is out of range (vocabulary has {n_vocab} tokens)")));
                }
                Ok(Some(id as u32))
            }
        }
    }
    fn array(&self, key: &str) -> Result<Option<&'a [Value]>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| meta_err(format!("{key} is not an array"))),
        }
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        let Some(arr) = self.array(key)? else { return Ok(None) };
        arr.iter()
            .enumerate()
            .map(|(i, v)| v.as_str().ok_or_else(|| meta_err(format!("{key}[{i}] is not a string"))))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let meta = Meta(f);
        let model_name = meta.str(KEY_MODEL)?.ok_or_else(|| meta_err(format!("{KEY_MODEL} is missing")))?;
        let is_bpe = match model_name {
            "gpt2" => true,
            "llama" => false,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        // Vocabulary. Empty strings get llama.cpp's placeholder so they can
        // never match text.
        let raw_tokens = meta.strings(KEY_TOKENS)?.ok_or_else(|| meta_err(format!("{KEY_TOKENS} is missing")))?;
        let n = raw_tokens.len();
        if n == 0 {
            return Err(meta_err(format!("{KEY_TOKENS} is empty")));
        }
        if n >= u32::MAX as usize / 2 {
            return Err(meta_err(format!("{KEY_TOKENS} has too many tokens ({n})")));
        }
        let vocab = vocab::Vocab::new(raw_tokens.iter().enumerate().map(|(i, t)| {
            if t.is_empty() {
                std::borrow::Cow::Owned(format!("[EMPTY_{i}]"))
            } else {
                std::borrow::Cow::Borrowed(&**t)
            }
        }))
        .map_err(|e| match e {
            vocab::VocabError::Duplicate { id, text } => {
                meta_err(format!("{KEY_TOKENS} contains `{text}` twice (second at id {id})"))
            }
            vocab::VocabError::TooLarge => meta_err(format!("{KEY_TOKENS}: the token texts exceed 4 GiB")),
        })?;

        let mut attrs = match meta.array(KEY_TYPES)? {
            None => vec![Attr::Normal; n],
            Some(arr) => {
                if arr.len() != n {
                    return Err(meta_err(format!("{KEY_TYPES} has {} entries for {n} tokens", arr.len())));
                }
                arr.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_i64()
                            .map(Attr::from_type)
                            .ok_or_else(|| meta_err(format!("{KEY_TYPES}[{i}] is not an integer")))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };

        // Special ids. Classic SentencePiece defaults when absent; none for BPE
        // (llama.cpp's BPE default of id 11 is a comma in GPT-2 vocabularies).
        let id_or = |key: &str, default: Option<u32>| -> Result<Option<u32>, TokenizerError> {
            Ok(meta.id(key, n)?.or(default.filter(|&d| (d as usize) < n)))
        };
        let (bos, eos, unk) = if is_bpe {
            (
                id_or("tokenizer.ggml.bos_token_id", None)?,
                id_or("tokenizer.ggml.eos_token_id", None)?,
                id_or("tokenizer.ggml.unknown_token_id", None)?,
            )
        } else {
            (
                id_or("tokenizer.ggml.bos_token_id", Some(1))?,
                id_or("tokenizer.ggml.eos_token_id", Some(2))?,
                id_or("tokenizer.ggml.unknown_token_id", Some(0))?,
            )
        };
        let mut eot = meta.id("tokenizer.ggml.eot_token_id", n)?;
        let mut eom = meta.id("tokenizer.ggml.eom_token_id", n)?;

        let model = if is_bpe {
            let pre_name = meta.str(KEY_PRE)?.unwrap_or("default");
            let (pre, ignore_merges) = pretok::PreTokenizer::by_name(pre_name).ok_or_else(|| {
                TokenizerError::UnknownPreTokenizer { name: pre_name.to_string(), supported: pretok::supported_names() }
            })?;
            let merges = meta.strings(KEY_MERGES)?.ok_or_else(|| meta_err(format!("{KEY_MERGES} is missing")))?;
            let bpe = bpe::Bpe::new(&vocab, n as u32, &merges, ignore_merges)?;
            Model::Bpe { bpe, pre, char_to_byte: bpe::char_to_byte_table() }
        } else {
            let scores = match meta.array(KEY_SCORES)? {
                None => vec![0.0; n],
                Some(arr) => {
                    if arr.len() != n {
                        return Err(meta_err(format!("{KEY_SCORES} has {} entries for {n} tokens", arr.len())));
                    }
                    arr.iter()
                        .enumerate()
                        .map(|(i, v)| {
                            v.as_f64()
                                .map(|x| x as f32)
                                .ok_or_else(|| meta_err(format!("{KEY_SCORES}[{i}] is not a number")))
                        })
                        .collect::<Result<Vec<_>, _>>()?
                }
            };
            let add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            Model::Spm { spm: spm::Spm::new(&vocab, scores, unk), add_space_prefix }
        };

        let default_add_bos = match &model {
            Model::Bpe { pre, .. } => pre.default_add_bos(),
            Model::Spm { .. } => true,
        };
        let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(meta_err("tokenizer.ggml.add_bos_token is set but there is no BOS token"));
        }
        if add_eos && eos.is_none() {
            return Err(meta_err("tokenizer.ggml.add_eos_token is set but there is no EOS token"));
        }

        // llama.cpp's fix-ups by token text: end-of-turn, end-of-generation and
        // FIM tokens are control tokens even when the converter said otherwise
        // (which changes how their text is tokenized without parse_special).
        let lookup = |name: &str| vocab.get(name);
        if eot.is_none() {
            let found: Vec<u32> = EOT_NAMES.iter().filter_map(|s| lookup(s)).collect();
            eot = found.iter().copied().min();
            for id in found {
                attrs[id as usize] = Attr::Control;
            }
        }
        if eom.is_none() {
            eom = lookup("<|eom_id|>");
            if let Some(id) = eom {
                attrs[id as usize] = Attr::Control;
            }
        }
        let mut eog: Vec<u32> = Vec::new();
        for &(key, names, ends) in FIM_NAMES {
            let id = match meta.id(&format!("tokenizer.ggml.{key}"), n)? {
                Some(id) => Some(id),
                None => {
                    let found = names.iter().filter_map(|s| lookup(s)).min();
                    if let Some(id) = found {
                        attrs[id as usize] = Attr::Control;
                    }
                    found
                }
            };
            if ends {
                eog.extend(id);
            }
        }
        for name in EOG_NAMES {
            if let Some(id) = lookup(name) {
                eog.push(id);
                attrs[id as usize] = Attr::Control;
            }
        }
        for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(id) = lookup(name) {
                attrs[id as usize] = Attr::UserDefined;
            }
        }
        eog.extend(eos);
        eog.extend(eot);
        eog.extend(eom);
        eog.sort_unstable();
        eog.dedup();
        // gpt-oss (o200k_harmony): `<|end|>` ends a message, not generation.
        if let (Some(_), Some(_), Some(end)) = (lookup("<|return|>"), lookup("<|call|>"), lookup("<|end|>")) {
            eog.retain(|&id| id != end);
            attrs[end as usize] = Attr::UserDefined;
        }

        let special = SpecialMatcher::new(
            vocab
                .iter()
                .zip(&attrs)
                .enumerate()
                .filter(|(_, (_, a))| matches!(a, Attr::Control | Attr::UserDefined | Attr::Unknown))
                .map(|(i, (t, a))| (i as u32, t.to_string(), *a == Attr::UserDefined))
                .collect(),
        );

        Ok(Tokenizer { model, vocab, attrs, special, bos, eos, add_bos, add_eos, eog })
    }

    /// Encodes `text`. `add_special` adds BOS/EOS as the model's metadata says;
    /// `parse_special` turns special-token text (`<|im_start|>`) into that
    /// token instead of tokenizing it as ordinary text.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        if text.len() >= u32::MAX as usize {
            return Err(TokenizerError::TooLong(text.len()));
        }
        let frags = self.special.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            Model::Bpe { bpe, pre, .. } => {
                let mut scratch = bpe::BpeScratch::default();
                let mut chars = Vec::new();
                let mut offsets = Vec::new();
                let mut flags = Vec::new();
                for f in frags {
                    match f {
                        Frag::Token(id) => out.push(id),
                        Frag::Text(a, b) => {
                            let s = &text[a..b];
                            chars.clear();
                            offsets.clear();
                            flags.clear();
                            for (i, c) in s.char_indices() {
                                chars.push(c);
                                offsets.push(i);
                                flags.push(pretok::char_flags(c));
                            }
                            offsets.push(s.len());
                            for (ws, we) in pre.split(&chars, &flags) {
                                let word = &s.as_bytes()[offsets[ws]..offsets[we]];
                                bpe.encode_word(word, &self.vocab, &mut scratch, &mut out);
                            }
                        }
                    }
                }
            }
            Model::Spm { spm, add_space_prefix } => {
                // A space is prepended to text that starts the input or follows
                // a special token, when the model asks for it.
                let mut prev_special = true;
                let mut escaped = String::new();
                for f in frags {
                    match f {
                        Frag::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Frag::Text(a, b) => {
                            escaped.clear();
                            if *add_space_prefix && prev_special {
                                escaped.push('▁');
                            }
                            for c in text[a..b].chars() {
                                escaped.push(if c == ' ' { '▁' } else { c });
                            }
                            spm.encode(&escaped, &self.vocab, &mut out)?;
                            prev_special = false;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Decodes ids to text (invalid UTF-8 replaced by U+FFFD). Special tokens
    /// appear as their text; ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.append_token_bytes(id, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes a token stands for: byte-level BPE text mapped back to
    /// bytes, `▁` as a space, `<0xXX>` as that byte; control, unknown and
    /// user-defined tokens as their text; unused tokens as nothing (as
    /// llama.cpp renders them).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        self.append_token_bytes(id, &mut out);
        out
    }

    fn append_token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(text) = self.vocab.text(id) else { return };
        match self.attrs[id as usize] {
            Attr::Control | Attr::Unknown | Attr::UserDefined => out.extend_from_slice(text.as_bytes()),
            Attr::Unused | Attr::Undefined => {}
            Attr::Normal => match &self.model {
                Model::Bpe { char_to_byte, .. } => bpe::unmap_bytes(char_to_byte, text, out),
                Model::Spm { .. } => {
                    for c in text.chars() {
                        if c == '▁' {
                            out.push(b' ');
                        } else {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
            },
            Attr::Byte => match &self.model {
                Model::Spm { .. } => match parse_byte_token(text) {
                    Some(b) => out.push(b),
                    None => out.extend_from_slice(text.as_bytes()),
                },
                Model::Bpe { char_to_byte, .. } => bpe::unmap_bytes(char_to_byte, text, out),
            },
        }
    }

    /// The vocabulary string of a token ("" for ids outside the vocabulary).
    pub fn token_text(&self, id: u32) -> &str {
        self.vocab.text(id).unwrap_or("")
    }

    /// The id of the token whose vocabulary string is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.get(text)
    }

    /// A short stable fingerprint of the vocabulary (every token's bytes, in
    /// id order): two tokenizers with the same fingerprint share ids.
    /// FNV-1a 64 over length-prefixed token bytes, printed as
    /// `vocab-<n>-<hex>`.
    pub fn fingerprint(&self) -> String {
        use minnow_kernels::mix::{fnv1a_extend, FNV1A_START};
        let mut h = FNV1A_START;
        let n = self.vocab_size();
        for id in 0..n as u32 {
            let bytes = self.token_bytes(id);
            h = fnv1a_extend(h, &(bytes.len() as u32).to_le_bytes());
            h = fnv1a_extend(h, &bytes);
        }
        format!("vocab-{n}-{h:016x}")
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether generation should stop at `id`: EOS, EOT, and the tokens
    /// llama.cpp treats as end of generation (`<|im_end|>`, `<|endoftext|>`,
    /// `<end_of_turn>`, `<|eot_id|>`, FIM pad/repo/file-separator...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether `id` is a control (or unknown) token: a marker rather than
    /// text, such as `<|im_start|>` or `<bos>`. User-defined tokens (Gemma's
    /// newline runs, Qwen's `<tool_call>`) are text and are not special here.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.attrs.get(id as usize), Some(Attr::Control | Attr::Unknown))
    }
}

/// `<0xAB>` → 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Turns a stream of token ids into text as it is generated, emitting only
/// complete UTF-8 characters: a character split across tokens (byte-fallback
/// or byte-level pieces of an emoji, say) comes out once its last byte
/// arrives. Invalid bytes become U+FFFD exactly where `decode` would put them,
/// so the concatenated output equals `decode` of all the ids.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one token; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        tok.append_token_bytes(id, &mut self.pending);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..start + valid]));
                    match e.error_len() {
                        // An invalid sequence: replaced, as from_utf8_lossy does.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += valid + bad;
                        }
                        // A character cut short by the end of the buffer: wait.
                        None => {
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Flushes whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

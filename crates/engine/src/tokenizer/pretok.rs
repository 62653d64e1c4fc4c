//! BPE pre-tokenizers: split a text fragment into the "words" that byte-level
//! BPE merges within, exactly as llama.cpp does for each `tokenizer.ggml.pre`.
//!
//! llama.cpp describes each pre-tokenizer as a list of regexes applied in turn,
//! each one splitting the pieces left by the previous one (text a regex does
//! not match stays a piece of its own). Rather than run a backtracking regex
//! engine, every regex used here is hand-written as a single left-to-right
//! scan over Unicode character classes (`\p{L}`, `\p{N}`, `\p{P}`, White_Space).
//! Each scan encodes the leftmost-first alternation semantics of its regex,
//! including the backtracking of `\s+(?!\S)` and `\s*[\r\n]+`, so the result is
//! the same as the regex (and as llama.cpp's own hand-written GPT-2 / Llama 3
//! splitters), in linear time with no pathological inputs.
//!
//! Positions are character indices into the fragment; the caller turns them
//! back into byte ranges.

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// `\p{L}`
pub(crate) const LETTER: u8 = 1;
/// `\p{N}`
pub(crate) const NUMBER: u8 = 2;
/// `\s` (Unicode White_Space, as llama.cpp's table)
pub(crate) const WS: u8 = 4;
/// `\p{P}`
pub(crate) const PUNCT: u8 = 8;
/// Set for every character inside the piece being split, so that "no flags"
/// means "past the end of the piece" (regex end-of-input).
pub(crate) const VALID: u8 = 16;

/// The character classes the pre-tokenizer regexes use.
pub(crate) fn char_flags(c: char) -> u8 {
    let cat = match get_general_category(c) {
        Gc::UppercaseLetter | Gc::LowercaseLetter | Gc::TitlecaseLetter | Gc::ModifierLetter | Gc::OtherLetter => {
            LETTER
        }
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber => NUMBER,
        Gc::ConnectorPunctuation
        | Gc::DashPunctuation
        | Gc::OpenPunctuation
        | Gc::ClosePunctuation
        | Gc::InitialPunctuation
        | Gc::FinalPunctuation
        | Gc::OtherPunctuation => PUNCT,
        _ => 0,
    };
    // `char::is_whitespace` is exactly the Unicode White_Space property, which is
    // what llama.cpp's `\s` means (std::regex's ASCII `\s` plus non-ASCII
    // White_Space characters collapsed to a vertical tab).
    let ws = if c.is_whitespace() { WS } else { 0 };
    cat | ws | VALID
}

/// One regex of a pre-tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max}|
    ///  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    /// with `max_digits` 3 for Llama 3 and 1 for Qwen 2.
    Llama3 { max_digits: usize },
    /// `\p{N}`: every number character on its own.
    EachNumber,
    /// `\p{N}+`
    NumberRuns,
    /// `[\p{P}\$\+<=>\^~\|]+`
    PunctRuns,
    /// `[0-9][0-9][0-9]`
    AsciiDigitTriples,
}

/// A pre-tokenizer: the regexes applied in order.
#[derive(Clone, Debug)]
pub(crate) struct PreTokenizer {
    pub(crate) name: &'static str,
    stages: &'static [Stage],
}

const LLAMA3: &[Stage] = &[Stage::Llama3 { max_digits: 3 }];
const QWEN2: &[Stage] = &[Stage::Llama3 { max_digits: 1 }];
const GPT2: &[Stage] = &[Stage::Gpt2];
const SMOLLM: &[Stage] = &[Stage::EachNumber, Stage::Gpt2];
const DEFAULT: &[Stage] = &[Stage::PunctRuns, Stage::Gpt2, Stage::NumberRuns, Stage::AsciiDigitTriples];

/// `tokenizer.ggml.pre` values understood, with the llama.cpp pre-tokenizer
/// each one selects (names are llama.cpp's).
const TABLE: &[(&str, &str, &[Stage], bool)] = &[
    // (name, canonical, stages, ignore_merges)
    ("default", "default", DEFAULT, false),
    ("gpt2", "gpt2", GPT2, false),
    ("gpt-2", "gpt2", GPT2, false),
    ("phi-2", "gpt2", GPT2, false),
    ("mpt", "gpt2", GPT2, false),
    ("olmo", "gpt2", GPT2, false),
    ("llama3", "llama3", LLAMA3, true),
    ("llama-v3", "llama3", LLAMA3, true),
    ("llama-bpe", "llama3", LLAMA3, true),
    ("dbrx", "llama3", LLAMA3, false),
    ("smaug-bpe", "llama3", LLAMA3, false),
    ("qwen2", "qwen2", QWEN2, false),
    ("deepseek-r1-qwen", "qwen2", QWEN2, false),
    ("stablelm2", "qwen2", QWEN2, false),
    ("smollm", "smollm", SMOLLM, false),
    ("starcoder", "smollm", SMOLLM, false),
    ("refact", "smollm", SMOLLM, false),
    ("command-r", "smollm", SMOLLM, false),
];

/// Comma-separated list of the supported names, for error messages.
pub(crate) fn supported_names() -> String {
    TABLE.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
}

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` value, and whether llama.cpp
    /// sets `ignore_merges` for it (a whole word that is a token is emitted
    /// as-is). `None` for names this module does not implement.
    pub(crate) fn by_name(name: &str) -> Option<(PreTokenizer, bool)> {
        TABLE
            .iter()
            .find(|t| t.0 == name)
            .map(|&(_, canonical, stages, ignore)| (PreTokenizer { name: canonical, stages }, ignore))
    }

    /// Whether llama.cpp turns `add_bos` on by default for this pre-tokenizer
    /// (Llama 3 style vocabularies) when the metadata does not say.
    pub(crate) fn default_add_bos(&self) -> bool {
        self.name == "llama3"
    }

    /// Splits `chars` (with their flags from [`char_flags`]) into pieces,
    /// returned as `(start, end)` character index ranges covering all of it.
    pub(crate) fn split(&self, chars: &[char], flags: &[u8]) -> Vec<(usize, usize)> {
        let mut pieces = vec![(0, chars.len())];
        if chars.is_empty() {
            return Vec::new();
        }
        let mut next = Vec::with_capacity(chars.len() / 3 + 1);
        for stage in self.stages {
            next.clear();
            for &(s, e) in &pieces {
                let mut cx = Cx { chars, flags, end: e, out: &mut next, prev: s };
                match *stage {
                    Stage::Gpt2 => cx.gpt2(s),
                    Stage::Llama3 { max_digits } => cx.llama3(s, max_digits),
                    Stage::EachNumber => cx.class_matches(s, |f, _| f & NUMBER != 0, 1),
                    Stage::NumberRuns => cx.class_matches(s, |f, _| f & NUMBER != 0, usize::MAX),
                    Stage::PunctRuns => cx.class_matches(
                        s,
                        |f, c| f & PUNCT != 0 || matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|'),
                        usize::MAX,
                    ),
                    Stage::AsciiDigitTriples => cx.ascii_triples(s),
                }
                cx.finish();
            }
            std::mem::swap(&mut pieces, &mut next);
        }
        pieces
    }
}

/// Splitting state for one piece `[.., end)`: matches are emitted with
/// [`Cx::matched`]; text between matches becomes a piece of its own (as in
/// llama.cpp, where unmatched text is kept as a separate word).
struct Cx<'a> {
    chars: &'a [char],
    flags: &'a [u8],
    end: usize,
    out: &'a mut Vec<(usize, usize)>,
    /// End of the last emitted piece.
    prev: usize,
}

impl Cx<'_> {
    /// Flags at `p`, or 0 past the end of the piece.
    #[inline]
    fn fl(&self, p: usize) -> u8 {
        if p < self.end {
            self.flags[p]
        } else {
            0
        }
    }

    #[inline]
    fn ch(&self, p: usize) -> Option<char> {
        if p < self.end {
            Some(self.chars[p])
        } else {
            None
        }
    }

    /// Emits the match `[s, e)`, preceded by any unmatched gap.
    #[inline]
    fn matched(&mut self, s: usize, e: usize) {
        if s > self.prev {
            self.out.push((self.prev, s));
        }
        if e > s {
            self.out.push((s, e));
        }
        self.prev = e;
    }

    fn finish(&mut self) {
        if self.end > self.prev {
            self.out.push((self.prev, self.end));
            self.prev = self.end;
        }
    }

    /// Matches of a single character class: runs of at most `max_len`
    /// characters (1 for `\p{N}`, unbounded for `\p{N}+`).
    fn class_matches(&mut self, mut pos: usize, pred: impl Fn(u8, char) -> bool, max_len: usize) {
        while pos < self.end {
            if pred(self.flags[pos], self.chars[pos]) {
                let s = pos;
                while pos < self.end && pos - s < max_len && pred(self.flags[pos], self.chars[pos]) {
                    pos += 1;
                }
                self.matched(s, pos);
            } else {
                pos += 1;
            }
        }
    }

    /// `[0-9][0-9][0-9]`: leftmost, non-overlapping.
    fn ascii_triples(&mut self, mut pos: usize) {
        while pos + 3 <= self.end {
            if self.chars[pos..pos + 3].iter().all(|c| c.is_ascii_digit()) {
                self.matched(pos, pos + 3);
                pos += 3;
            } else {
                pos += 1;
            }
        }
    }

    /// Length of the contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`)
    /// starting at `pos`, if any. `fold` makes it case-insensitive (Llama 3 /
    /// Qwen 2: `(?i:...)`; only ASCII letters can fold to these).
    fn contraction(&self, pos: usize, fold: bool) -> Option<usize> {
        if self.chars[pos] != '\'' {
            return None;
        }
        let low = |c: Option<char>| c.map(|c| if fold { c.to_ascii_lowercase() } else { c });
        let n1 = low(self.ch(pos + 1))?;
        if matches!(n1, 's' | 't' | 'm' | 'd') {
            return Some(2);
        }
        let n2 = low(self.ch(pos + 2))?;
        if matches!((n1, n2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
            return Some(3);
        }
        None
    }

    /// The whitespace alternatives shared by both regex families, at `pos`
    /// (a whitespace character): `\s+(?!\S)` then `\s+`. Returns the match end.
    fn trailing_ws(&self, pos: usize, n_ws: usize) -> usize {
        if n_ws > 1 && pos + n_ws < self.end {
            // `\s+` backtracks one character so the lookahead sees whitespace:
            // the last space is left to prefix the following word.
            pos + n_ws - 1
        } else if n_ws > 0 {
            pos + n_ws
        } else {
            pos + 1
        }
    }

    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    fn gpt2(&mut self, mut pos: usize) {
        while pos < self.end {
            let start = pos;
            if let Some(n) = self.contraction(pos, false) {
                pos += n;
                self.matched(start, pos);
                continue;
            }
            let c = self.chars[pos];
            // The optional leading space belongs to the word after it.
            let f2 = if c == ' ' { self.fl(pos + 1) } else { self.flags[pos] };
            let class = if f2 & LETTER != 0 {
                Some(LETTER)
            } else if f2 & NUMBER != 0 {
                Some(NUMBER)
            } else if f2 & (WS | LETTER | NUMBER) == 0 && f2 & VALID != 0 {
                None // "other": not space, letter or number
            } else {
                // whitespace
                let mut n = 0;
                while self.fl(pos + n) & WS != 0 {
                    n += 1;
                }
                pos = self.trailing_ws(pos, n);
                self.matched(start, pos);
                continue;
            };
            if c == ' ' {
                pos += 1;
            }
            match class {
                Some(k) => {
                    while self.fl(pos) & k != 0 {
                        pos += 1;
                    }
                }
                None => {
                    while self.fl(pos) & (WS | LETTER | NUMBER) == 0 && self.fl(pos) & VALID != 0 {
                        pos += 1;
                    }
                }
            }
            self.matched(start, pos);
        }
    }

    /// Llama 3 / Qwen 2 (see [`Stage::Llama3`]).
    fn llama3(&mut self, mut pos: usize, max_digits: usize) {
        while pos < self.end {
            let start = pos;
            if let Some(n) = self.contraction(pos, true) {
                pos += n;
                self.matched(start, pos);
                continue;
            }
            let c = self.chars[pos];
            let f = self.flags[pos];
            // [^\r\n\p{L}\p{N}]?\p{L}+ : one optional non-letter, non-digit,
            // non-newline character (space, tab, punctuation...) glued to letters.
            if !(c == '\r' || c == '\n' || f & NUMBER != 0) && (f & LETTER != 0 || self.fl(pos + 1) & LETTER != 0) {
                pos += 1;
                while self.fl(pos) & LETTER != 0 {
                    pos += 1;
                }
                self.matched(start, pos);
                continue;
            }
            // \p{N}{1,max_digits}, repeatedly: groups counted from the left.
            if f & NUMBER != 0 {
                while self.fl(pos) & NUMBER != 0 {
                    let s = pos;
                    while self.fl(pos) & NUMBER != 0 && pos - s < max_digits {
                        pos += 1;
                    }
                    self.matched(s, pos);
                }
                continue;
            }
            //  ?[^\s\p{L}\p{N}]+[\r\n]*
            let f2 = if c == ' ' { self.fl(pos + 1) } else { f };
            if f2 & (WS | LETTER | NUMBER) == 0 && f2 & VALID != 0 {
                if c == ' ' {
                    pos += 1;
                }
                while self.fl(pos) & (WS | LETTER | NUMBER) == 0 && self.fl(pos) & VALID != 0 {
                    pos += 1;
                }
                while matches!(self.ch(pos), Some('\r' | '\n')) {
                    pos += 1;
                }
                self.matched(start, pos);
                continue;
            }
            // Whitespace run: \s*[\r\n]+ ends right after its last newline;
            // otherwise \s+(?!\S) / \s+.
            let mut n = 0;
            let mut after_last_newline = None;
            while self.fl(pos + n) & WS != 0 {
                if matches!(self.chars[pos + n], '\r' | '\n') {
                    after_last_newline = Some(pos + n + 1);
                }
                n += 1;
            }
            pos = match after_last_newline {
                Some(e) => e,
                None => self.trailing_ws(pos, n),
            };
            self.matched(start, pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        let (p, _) = PreTokenizer::by_name(pre).unwrap();
        let chars: Vec<char> = text.chars().collect();
        let flags: Vec<u8> = chars.iter().map(|&c| char_flags(c)).collect();
        p.split(&chars, &flags).into_iter().map(|(s, e)| chars[s..e].iter().collect()).collect()
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(
            split("gpt2", "Hello  world's 123!!\n\nok "),
            ["Hello", " ", " world", "'s", " 123", "!!", "\n", "\n", "ok", " "]
        );
    }

    #[test]
    fn smollm_splits_digits() {
        assert_eq!(split("smollm", "a 1234 b"), ["a", " ", "1", "2", "3", "4", " b"]);
    }

    #[test]
    fn llama3_and_qwen2() {
        assert_eq!(
            split("llama-bpe", "x=1234567 DON'T\n\n  hi"),
            ["x", "=", "123", "456", "7", " DON", "'T", "\n\n", " ", " hi"]
        );
        assert_eq!(split("qwen2", "ab12 (c)\t\nd"), ["ab", "1", "2", " (", "c", ")", "\t\n", "d"]);
        assert_eq!(split("qwen2", "a \n b  "), ["a", " \n", " b", "  "]);
    }

    #[test]
    fn default_bpe() {
        assert_eq!(split("default", "a12345, b"), ["a", "123", "45", ",", " b"]);
    }
}

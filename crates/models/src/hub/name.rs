//! What a Hub model name says: `hf.co/USER/REPO[:QUANT][@REVISION]` (or
//! `USER/REPO…` when the argument is not a local path), and which GGUF
//! file(s) of a repository a QUANT picks.
//!
//! File choice: the GGUF files of a repository are grouped into models (a
//! split model's `-00001-of-0000N.gguf` parts are one model), vision
//! projectors (`mmproj`) are left out, and each model gets the
//! quantization tag found in its file name (`Q4_K_M`, `IQ4_XS`, `F16`, …).
//! An explicit QUANT matches the tag case-insensitively (or, ending in
//! `.gguf`, a file name); without one, `Q4_K_M` if the repository has it,
//! else the smallest model of at least 4 bits a weight, else the smallest.

use anyhow::{bail, Result};

/// A parsed Hub model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubName {
    /// `USER/REPO`.
    pub repo: String,
    /// The quantization tag (or file name) asked for, as written.
    pub quant: Option<String>,
    /// A branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
}

const PREFIXES: [&str; 6] = [
    "hf.co/",
    "huggingface.co/",
    "https://hf.co/",
    "https://huggingface.co/",
    "http://hf.co/",
    "http://huggingface.co/",
];

impl HubName {
    /// `None` when `arg` is not a Hub name (then it is a path or a short
    /// name); `Some(Err)` when it is one (it starts with `hf.co/`) but
    /// malformed.
    pub fn parse(arg: &str) -> Option<Result<HubName>> {
        let (explicit, rest) = match PREFIXES.iter().find_map(|p| arg.strip_prefix(p)) {
            Some(rest) => (true, rest),
            None => (false, arg),
        };
        let head = arg.split([':', '@']).next().unwrap_or(arg);
        if !explicit && (head.ends_with(".gguf") || arg.starts_with(['.', '/', '~']) || arg.contains('\\')) {
            return None;
        }
        let parsed = parse_rest(rest);
        match parsed {
            Ok(name) => Some(Ok(name)),
            Err(why) if explicit => Some(Err(anyhow::anyhow!(
                "`{arg}` is not a Hub model name: {why} (expected hf.co/USER/REPO[:QUANT][@REVISION])"
            ))),
            Err(_) => None,
        }
    }

    /// The revision asked for, `main` by default.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// The canonical name (`hf.co/USER/REPO:QUANT`), for messages and `minnow list`.
    pub fn display(&self) -> String {
        let mut s = format!("hf.co/{}", self.repo);
        if let Some(q) = &self.quant {
            s.push(':');
            s.push_str(q);
        }
        if let Some(r) = &self.revision {
            s.push('@');
            s.push_str(r);
        }
        s
    }
}

fn parse_rest(rest: &str) -> Result<HubName, String> {
    let end = rest.find([':', '@']).unwrap_or(rest.len());
    let repo = rest[..end].trim_end_matches('/');
    let mut parts = repo.split('/');
    let (Some(user), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("`{repo}` is not USER/REPO"));
    };
    for part in [user, name] {
        valid_repo_part(part)?;
    }
    let (mut quant, mut revision) = (None, None);
    let mut tail = &rest[end..];
    while !tail.is_empty() {
        let sep = tail.as_bytes()[0];
        let next = tail[1..].find([':', '@']).map_or(tail.len(), |i| i + 1);
        let value = &tail[1..next];
        if value.is_empty() {
            return Err(format!("nothing after `{}`", sep as char));
        }
        let slot = if sep == b':' { &mut quant } else { &mut revision };
        if slot.replace(value.to_string()).is_some() {
            return Err(format!("`{}` given twice", sep as char));
        }
        tail = &tail[next..];
    }
    Ok(HubName { repo: format!("{user}/{name}"), quant, revision })
}

/// The Hub's rule for user and repository names: letters, digits, `-`, `_`,
/// `.`; not starting or ending with `-` or `.`; no `--` or `..`; at most 96.
fn valid_repo_part(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 96
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("--")
        && !s.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!("`{s}` is not a valid Hub user or repository name"))
    }
}

/// One model among a repository's GGUF files: a single file, or the parts of
/// a split one in part order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufModel {
    /// Repository paths of the file(s), in part order.
    pub files: Vec<String>,
    /// The quantization tag in the file name, upper case (`Q4_K_M`).
    pub quant: Option<String>,
    /// Bytes over all parts.
    pub size: u64,
}

impl GgufModel {
    /// How the model is named in lists: its tag, or its file name.
    pub fn label(&self) -> String {
        self.quant.clone().unwrap_or_else(|| self.files[0].clone())
    }
}

/// `-NNNNN-of-MMMMM` at the end of a file stem: (part, count), 1-based.
pub fn split_suffix(stem: &str) -> Option<(usize, u32, u32)> {
    let b = stem.as_bytes();
    if b.len() < 15 {
        return None;
    }
    let tail = &stem[stem.len() - 15..];
    let (dash, part, of, count) = (&tail[..1], &tail[1..6], &tail[6..10], &tail[10..]);
    let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    if dash != "-" || of != "-of-" || !digits(part) || !digits(count) {
        return None;
    }
    Some((stem.len() - 15, part.parse().ok()?, count.parse().ok()?))
}

/// The quantization tag in a file name (`Q4_K_M`, `IQ4_XS`, `F16`, `BF16`,
/// …), upper case: the last one that stands alone (not inside a word).
pub fn quant_tag(file: &str) -> Option<String> {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = base.strip_suffix(".gguf").unwrap_or(base);
    let stem = split_suffix(stem).map_or(stem, |(at, _, _)| &stem[..at]);
    let b = stem.as_bytes();
    let mut found = None;
    for start in 0..b.len() {
        if start > 0 && b[start - 1].is_ascii_alphanumeric() {
            continue;
        }
        if let Some(len) = tag_len(&b[start..]) {
            found = Some(stem[start..start + len].to_ascii_uppercase());
        }
    }
    found
}

/// Length of a tag at the start of `b` that ends at a separator (or the end).
fn tag_len(b: &[u8]) -> Option<usize> {
    let up = |i: usize| b.get(i).map(|c| c.to_ascii_uppercase());
    let ends = |i: usize| b.get(i).is_none_or(|c| !c.is_ascii_alphanumeric() && *c != b'_');
    for word in [&b"BF16"[..], b"F16", b"F32", b"F64"] {
        if b.len() >= word.len() && b[..word.len()].eq_ignore_ascii_case(word) && ends(word.len()) {
            return Some(word.len());
        }
    }
    let mut i = 0;
    if matches!(up(0), Some(b'I' | b'T')) {
        i = 1;
    }
    if up(i) != Some(b'Q') {
        return None;
    }
    i += 1;
    let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    i += digits;
    // `_K`, `_K_M`, `_0`, `_XS`, `_K_XL`, …
    while b.get(i) == Some(&b'_') && b.get(i + 1).is_some_and(|c| c.is_ascii_alphanumeric()) {
        i += 1 + b[i + 1..].iter().take_while(|c| c.is_ascii_alphanumeric()).count();
    }
    ends(i).then_some(i)
}

/// Bits a weight a tag stands for (`Q4_K_M` → 4, `F16` → 16), if it says.
fn tag_bits(tag: &str) -> Option<u32> {
    match tag {
        "BF16" | "F16" => return Some(16),
        "F32" => return Some(32),
        "F64" => return Some(64),
        _ => {}
    }
    let digits: String =
        tag.trim_start_matches(['I', 'T']).trim_start_matches('Q').chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Groups a repository's files (path, bytes) into GGUF models, sorted by
/// name. Incomplete split models (a part missing) are left out.
pub fn gguf_models(files: &[(String, u64)]) -> Vec<GgufModel> {
    use std::collections::BTreeMap;
    /// A part: its number, repository path and bytes.
    type Part = (u32, String, u64);
    // Key: path without the split suffix; value: count and the parts seen.
    let mut groups: BTreeMap<String, (u32, Vec<Part>)> = BTreeMap::new();
    for (path, size) in files {
        let Some(stem) = path.strip_suffix(".gguf") else { continue };
        let base = stem.rsplit('/').next().unwrap_or(stem);
        if base.to_ascii_lowercase().contains("mmproj") {
            continue;
        }
        let (key, part, count) = match split_suffix(stem) {
            Some((at, part, count)) => (stem[..at].to_string(), part, count),
            None => (stem.to_string(), 1, 1),
        };
        let entry = groups.entry(format!("{key}#{count}")).or_insert((count, Vec::new()));
        entry.1.push((part, path.clone(), *size));
    }
    let mut models = Vec::new();
    for (_, (count, mut parts)) in groups {
        parts.sort();
        parts.dedup_by_key(|p| p.0);
        let complete = parts.len() == count as usize && parts.iter().enumerate().all(|(i, p)| p.0 as usize == i + 1);
        if !complete {
            continue;
        }
        models.push(GgufModel {
            quant: quant_tag(&parts[0].1),
            size: parts.iter().map(|p| p.2).sum(),
            files: parts.into_iter().map(|p| p.1).collect(),
        });
    }
    models
}

/// The model `quant` names among `models` (see the module doc for the rule
/// without one). The error lists what the repository has.
pub fn choose<'a>(models: &'a [GgufModel], quant: Option<&str>, repo: &str) -> Result<&'a GgufModel> {
    if models.is_empty() {
        bail!("`{repo}` has no GGUF file: minnow runs GGUF models (look for a repository with GGUF in its name)");
    }
    let available = || {
        let mut labels: Vec<String> = models.iter().map(GgufModel::label).collect();
        labels.dedup();
        labels.join(", ")
    };
    let Some(quant) = quant else {
        if let Some(m) = unique(models.iter().filter(|m| m.quant.as_deref() == Some("Q4_K_M"))) {
            return Ok(m);
        }
        let sensible = models.iter().filter(|m| m.quant.as_deref().and_then(tag_bits).is_none_or(|b| b >= 4));
        let smallest = sensible.min_by_key(|m| m.size).or_else(|| models.iter().min_by_key(|m| m.size));
        return Ok(smallest.expect("models is not empty"));
    };
    let matching: Vec<&GgufModel> = if quant.to_ascii_lowercase().ends_with(".gguf") {
        models.iter().filter(|m| m.files.iter().any(|f| f == quant || f.rsplit('/').next() == Some(quant))).collect()
    } else {
        models.iter().filter(|m| m.quant.as_deref().is_some_and(|q| q.eq_ignore_ascii_case(quant))).collect()
    };
    match matching.as_slice() {
        [m] => Ok(m),
        [] => bail!("`{repo}` has no GGUF file for `{quant}`; it has: {}", available()),
        many => bail!(
            "`{repo}` has {} GGUF models tagged `{quant}` ({}); name one by its file, e.g. `hf.co/{repo}:{}`",
            many.len(),
            many.iter().map(|m| m.files[0].as_str()).collect::<Vec<_>>().join(", "),
            many[0].files[0].rsplit('/').next().unwrap_or_default()
        ),
    }
}

fn unique<'a>(mut it: impl Iterator<Item = &'a GgufModel>) -> Option<&'a GgufModel> {
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(repo: &str, quant: Option<&str>, rev: Option<&str>) -> HubName {
        HubName { repo: repo.into(), quant: quant.map(Into::into), revision: rev.map(Into::into) }
    }

    #[test]
    fn name_forms() {
        let p = |s: &str| HubName::parse(s).map(|r| r.unwrap());
        assert_eq!(
            p("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF"),
            Some(name("bartowski/SmolLM2-135M-Instruct-GGUF", None, None))
        );
        assert_eq!(p("hf.co/u/r:Q4_K_M"), Some(name("u/r", Some("Q4_K_M"), None)));
        assert_eq!(p("u/r:q8_0"), Some(name("u/r", Some("q8_0"), None)));
        assert_eq!(p("u/r@v1.0:Q4_0"), Some(name("u/r", Some("Q4_0"), Some("v1.0"))));
        assert_eq!(p("u/r:Q4_0@abc"), Some(name("u/r", Some("Q4_0"), Some("abc"))));
        assert_eq!(p("huggingface.co/u/r"), Some(name("u/r", None, None)));
        assert_eq!(p("https://huggingface.co/u/my.repo_x-1"), Some(name("u/my.repo_x-1", None, None)));
        assert_eq!(p("u/r:model-Q4_K_M.gguf"), Some(name("u/r", Some("model-Q4_K_M.gguf"), None)));
        // Paths and short names are not Hub names.
        for s in ["smollm2-135m", "models/x.gguf", "./u/r", "/u/r", "~/u/r", "a/b/c", "u/r:", "u/-r", "u/r--x"] {
            assert!(p(s).is_none(), "{s}");
        }
        // With the prefix it is one, and malformed is an error.
        for s in ["hf.co/u", "hf.co/u/r/x", "hf.co/u/r:", "hf.co/u/r@", "hf.co/u/r:a:b", "hf.co/u/r..x", "hf.co/ü/r"] {
            let e = format!("{:#}", HubName::parse(s).unwrap().unwrap_err());
            assert!(e.contains("not a Hub model name"), "{s}: {e}");
        }
        assert_eq!(name("u/r", Some("Q8_0"), Some("dev")).display(), "hf.co/u/r:Q8_0@dev");
    }

    #[test]
    fn quant_tags_in_file_names() {
        let cases = [
            ("SmolLM2-135M-Instruct-Q4_K_M.gguf", Some("Q4_K_M")),
            ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", Some("Q4_K_M")),
            ("Meta-Llama-3-8B-Instruct.Q8_0.gguf", Some("Q8_0")),
            ("model_iq4_xs.gguf", Some("IQ4_XS")),
            ("gemma-3-27b-it-UD-Q4_K_XL-00001-of-00002.gguf", Some("Q4_K_XL")),
            ("Q4_K_M/model-Q4_K_M-00002-of-00003.gguf", Some("Q4_K_M")),
            ("model-f16.gguf", Some("F16")),
            ("model.BF16.gguf", Some("BF16")),
            ("tq1_0.gguf", Some("TQ1_0")),
            ("model.gguf", None),
            ("Qwen2-0.5B.gguf", None), // "Qwen2" is a word, not a tag
            ("modelq4.gguf", None),
        ];
        for (file, tag) in cases {
            assert_eq!(quant_tag(file).as_deref(), tag, "{file}");
        }
        assert_eq!(split_suffix("m-00002-of-00010"), Some((1, 2, 10)));
        assert_eq!(split_suffix("m-0002-of-00010"), None);
    }

    fn files(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(f, s)| (f.to_string(), *s)).collect()
    }

    #[test]
    fn grouping_and_choosing() {
        let repo = files(&[
            ("README.md", 10),
            ("m-Q8_0.gguf", 800),
            ("m-Q2_K.gguf", 200),
            ("m-Q3_K_M.gguf", 300),
            ("m-IQ4_XS.gguf", 380),
            ("m-Q4_0.gguf", 400),
            ("mmproj-m-f16.gguf", 50),
            ("big/m-F16-00001-of-00002.gguf", 900),
            ("big/m-F16-00002-of-00002.gguf", 700),
            ("torn-Q6_K-00001-of-00002.gguf", 1),
        ]);
        let models = gguf_models(&repo);
        let labels: Vec<String> = models.iter().map(GgufModel::label).collect();
        assert_eq!(labels, ["F16", "IQ4_XS", "Q2_K", "Q3_K_M", "Q4_0", "Q8_0"]);
        let f16 = choose(&models, Some("f16"), "u/r").unwrap();
        assert_eq!(f16.files, ["big/m-F16-00001-of-00002.gguf", "big/m-F16-00002-of-00002.gguf"]);
        assert_eq!(f16.size, 1600);
        // Without Q4_K_M: the smallest of at least 4 bits.
        assert_eq!(choose(&models, None, "u/r").unwrap().files, ["m-IQ4_XS.gguf"]);
        let mut with_q4km = repo.clone();
        with_q4km.push(("m-Q4_K_M.gguf".into(), 450));
        assert_eq!(choose(&gguf_models(&with_q4km), None, "u/r").unwrap().files, ["m-Q4_K_M.gguf"]);
        assert_eq!(choose(&models, Some("m-Q8_0.gguf"), "u/r").unwrap().files, ["m-Q8_0.gguf"]);
        let e = format!("{:#}", choose(&models, Some("Q5_K_M"), "u/r").unwrap_err());
        assert!(e.contains("no GGUF file for `Q5_K_M`") && e.contains("Q4_0, Q8_0"), "{e}");
        let e = format!("{:#}", choose(&[], None, "u/r").unwrap_err());
        assert!(e.contains("has no GGUF file"), "{e}");
        // Only tiny quantizations: the smallest.
        let tiny = gguf_models(&files(&[("a-Q2_K.gguf", 20), ("a-Q3_K_S.gguf", 30)]));
        assert_eq!(choose(&tiny, None, "u/r").unwrap().files, ["a-Q2_K.gguf"]);
        // Two models with one tag: say how to name one.
        let two = gguf_models(&files(&[("a-Q4_0.gguf", 1), ("b-Q4_0.gguf", 1)]));
        let e = format!("{:#}", choose(&two, Some("Q4_0"), "u/r").unwrap_err());
        assert!(e.contains("hf.co/u/r:a-Q4_0.gguf"), "{e}");
    }
}

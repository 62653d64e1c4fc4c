//! Shared by the engine's integration tests: where the test models and the
//! llama.cpp reference data live, and one thread pool per test binary.
#![allow(dead_code)]

use minnow_gguf::GgufFile;
use minnow_kernels::pool::ThreadPool;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// `$MINNOW_GOLDEN`, else `../shared/golden` next to the repository.
pub fn golden_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MINNOW_GOLDEN") {
        return PathBuf::from(d);
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden"))
}

/// The fixtures directory (`../shared/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    golden_dir().join("../fixtures")
}

/// Path of a test model file; fails the test with instructions when absent.
pub fn model_path(file: &str) -> PathBuf {
    // Fetched and verified on first use (one download even when several
    // test binaries ask at once).
    minnow_models::test_model(file)
}

pub fn open_model_file(file: &str) -> Arc<GgufFile> {
    Arc::new(GgufFile::open(model_path(file)).unwrap_or_else(|e| panic!("{e}")))
}

/// Reads a golden JSON file.
pub fn golden_json(model_dir: &str, name: &str) -> serde_json::Value {
    let p = golden_dir().join(model_dir).join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// Loads the model `key` with `open` the first time it is asked for, then
/// hands out the same one: each model is loaded once per test binary.
pub fn load_once(key: &str, open: impl FnOnce() -> Arc<GgufFile>) -> &'static minnow_engine::model::Model {
    type Loaded = HashMap<String, &'static minnow_engine::model::Model>;
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let mut map = LOADED.get_or_init(Default::default).lock().unwrap();
    map.entry(key.to_string()).or_insert_with(|| {
        let m = minnow_engine::model::Model::from_gguf(open()).unwrap_or_else(|e| panic!("{key}: {e}"));
        Box::leak(Box::new(m))
    })
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an array of ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

/// A JSON array of numbers, as f32.
pub fn json_floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().expect("an array of numbers").iter().map(|x| x.as_f64().expect("a number") as f32).collect()
}

/// Index of the largest value; the first of equal ones.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// One case of a golden `nll.json`, compared: the mean negative log-likelihood
/// of each next token, ours and llama.cpp's, and the mean |Δ| of the
/// per-token log-probs.
pub struct NllComparison {
    pub case: String,
    pub mean_nll: f64,
    pub ref_nll: f64,
    pub mean_logprob_diff: f64,
}

/// Runs every case of `<golden>/nll.json` through `m` (one pass per case,
/// logits of every position), with the model's own cache types.
pub fn compare_nll(m: &minnow_engine::model::Model, golden: &str) -> Vec<NllComparison> {
    compare_nll_with(m, golden, m.cache_types())
}

/// [`compare_nll`] with caches storing keys and values as `types` says.
pub fn compare_nll_with(
    m: &minnow_engine::model::Model,
    golden: &str,
    types: minnow_engine::kv_cache::CacheTypes,
) -> Vec<NllComparison> {
    let vocab = m.config().vocab_size;
    let data = golden_json(golden, "nll.json");
    let mut out = Vec::new();
    for case in data["cases"].as_array().expect("nll.json: cases") {
        let ids = json_ids(&case["ids"]);
        let reference: Vec<f64> = case["next_logprobs"]
            .as_array()
            .expect("nll.json: next_logprobs")
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut cache = minnow_engine::kv_cache::KvCache::new(m.config(), ids.len(), types);
        let logits = m.forward_one(pool(), &mut cache, &ids, minnow_engine::model::Logits::All).unwrap();
        let mut lp = vec![0f32; vocab];
        let ours: Vec<f64> = (0..ids.len() - 1)
            .map(|i| {
                minnow_kernels::ops::log_softmax(&logits[i * vocab..(i + 1) * vocab], &mut lp);
                lp[ids[i + 1] as usize] as f64
            })
            .collect();
        let n = ours.len() as f64;
        out.push(NllComparison {
            case: case["name"].as_str().expect("nll.json: case name").to_string(),
            mean_nll: -ours.iter().sum::<f64>() / n,
            ref_nll: case["mean_nll"].as_f64().expect("nll.json: mean_nll"),
            mean_logprob_diff: ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).sum::<f64>() / n,
        });
    }
    out
}

/// One pool per test binary; concurrent tests take turns using it.
pub fn pool() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(2))
}

/// The four test models: (golden directory, file name).
pub const MODELS: [(&str, &str); 4] = [
    ("smollm2-135m-instruct-q4_1", "smollm2-135m-instruct-q4_1.gguf"),
    ("gemma3-270m-q4_k_m", "gemma3-270m-q4_k_m.gguf"),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
];

/// SHA-256 of a file as lowercase hex, to check that a golden file was made
/// from the very model file being tested (the golden README asks for it).
/// Written out here (FIPS 180-4) so the tests need no hashing dependency.
pub fn sha256_hex(path: &std::path::Path) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut data = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let bit_len = (data.len() as u64).wrapping_mul(8);
    data.push(0x80);
    while data.len() % 64 != 56 {
        data.push(0);
    }
    data.extend_from_slice(&bit_len.to_be_bytes());
    let mut w = [0u32; 64];
    for chunk in data.chunks_exact(64) {
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes(word.try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

/// Model-heavy tests of one binary take turns (a 2-core machine gains
/// nothing from two forward passes at once).
#[allow(dead_code)]
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The prompts (token ids) of a model's golden logits cases.
#[allow(dead_code)]
pub fn golden_prompts(model_dir: &str) -> Vec<Vec<u32>> {
    golden_json(model_dir, "logits.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| json_ids(&c["prompt_ids"]))
        .collect()
}

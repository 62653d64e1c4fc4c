//! The key/value cache of one sequence.
//!
//! Keys (after RoPE) and values of every past position, per layer, so each new
//! token attends to the past without recomputing it. Storage grows with the
//! sequence up to a fixed maximum, so a short chat does not pay for the whole
//! context window. A cache can be cloned (several samples sharing one prompt)
//! and truncated (rolling back rejected speculative tokens).
//!
//! Keys and values are stored as f16 by default, as llama.cpp's default
//! cache is: half the memory, and half the bytes attention reads per
//! position. Either can instead be q8_0 ([`KvType`], llama.cpp's
//! `--cache-type-k/-v q8_0`): 8-bit quants and one scale per 32 elements,
//! which halves the cache again, and the bytes a decode step at long context
//! reads; results then move by the quantization error (the test models stay
//! within the golden tolerances, `tests/golden_models.rs`). The attention
//! kernel's arithmetic for each format is described in
//! `minnow_kernels::attention`.

use crate::model::ModelConfig;
use half::f16;
use minnow_kernels::attention::{extend_q8_0, KvRows, Q8_BLOCK};
use std::fmt;
use std::str::FromStr;

/// How cached keys or values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half-precision floats (llama.cpp's default).
    #[default]
    F16,
    /// llama.cpp's q8_0: 8-bit quants, one scale per 32 elements.
    Q8_0,
}

impl KvType {
    /// Bytes per cached element (a q8_0 scale is held as an f32 beside its
    /// 32 quants).
    pub fn bytes_per_element(self) -> f64 {
        match self {
            KvType::F16 => 2.0,
            KvType::Q8_0 => 1.0 + 4.0 / Q8_BLOCK as f64,
        }
    }
}

impl FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<KvType, String> {
        match s {
            "f16" => Ok(KvType::F16),
            "q8_0" => Ok(KvType::Q8_0),
            _ => Err(format!("unknown KV cache type {s:?}: use f16 or q8_0")),
        }
    }
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        })
    }
}

/// The storage of a cache's keys and of its values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheTypes {
    pub k: KvType,
    pub v: KvType,
}

impl CacheTypes {
    /// Whether a model with heads of `head_dim` can use these types (q8_0
    /// needs whole 32-element blocks); the error says why not.
    pub fn check(self, head_dim: usize) -> Result<(), UnfitCacheType> {
        let q8 = self.k == KvType::Q8_0 || self.v == KvType::Q8_0;
        if q8 && !head_dim.is_multiple_of(Q8_BLOCK) {
            return Err(UnfitCacheType { head_dim });
        }
        Ok(())
    }
}

/// A q8_0 cache for heads that are not whole 32-element blocks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("a q8_0 KV cache needs a head dimension that is a multiple of {Q8_BLOCK}; this model's is {head_dim}: use f16")]
pub struct UnfitCacheType {
    pub head_dim: usize,
}

/// One KV head's keys or values of one layer, [len, head_dim].
#[derive(Clone)]
enum HeadRows {
    F16(Vec<f16>),
    /// `quants[i] * scales[i / 32]`.
    Q8_0 {
        quants: Vec<i8>,
        scales: Vec<f32>,
    },
}

impl HeadRows {
    fn new(ty: KvType) -> HeadRows {
        match ty {
            KvType::F16 => HeadRows::F16(Vec::new()),
            KvType::Q8_0 => HeadRows::Q8_0 { quants: Vec::new(), scales: Vec::new() },
        }
    }

    /// Elements held.
    fn len(&self) -> usize {
        self.rows().len()
    }

    fn rows(&self) -> KvRows<'_> {
        match self {
            HeadRows::F16(x) => KvRows::F16(x),
            HeadRows::Q8_0 { quants, scales } => KvRows::Q8_0 { quants, scales },
        }
    }

    /// Appends `x` (whole positions) in this storage's format.
    fn extend(&mut self, x: &[f32]) {
        match self {
            HeadRows::F16(dst) => extend_f16(dst, x),
            HeadRows::Q8_0 { quants, scales } => extend_q8_0(x, quants, scales),
        }
    }

    /// Keeps the first `n` elements (whole positions, so whole blocks).
    fn truncate(&mut self, n: usize) {
        match self {
            HeadRows::F16(x) => x.truncate(n),
            HeadRows::Q8_0 { quants, scales } => {
                quants.truncate(n);
                scales.truncate(n / Q8_BLOCK);
            }
        }
    }

    /// A copy of the first `n` elements, sized to fit.
    fn prefix(&self, n: usize) -> HeadRows {
        match self {
            HeadRows::F16(x) => HeadRows::F16(x[..n].to_vec()),
            HeadRows::Q8_0 { quants, scales } => {
                HeadRows::Q8_0 { quants: quants[..n].to_vec(), scales: scales[..n / Q8_BLOCK].to_vec() }
            }
        }
    }

    /// Bytes allocated.
    fn bytes(&self) -> usize {
        match self {
            HeadRows::F16(x) => x.capacity() * 2,
            HeadRows::Q8_0 { quants, scales } => quants.capacity() + scales.capacity() * 4,
        }
    }
}

#[derive(Clone)]
pub struct KvCache {
    /// Per layer and KV head, shape [len, head_dim]: keys after RoPE. Head
    /// by head rather than position by position, so that attention reads one
    /// head's keys as one contiguous stream: interleaved, a head's 128–256
    /// bytes every `kv_dim` elements defeated the hardware prefetcher, and a
    /// decode step (which finds the cache in memory, not in L2) ran at half
    /// speed (criterion `attention/9x64/ctx1024/cold`: 107 vs 64 µs).
    keys: Vec<Vec<HeadRows>>,
    /// Per layer and KV head, shape [len, head_dim].
    values: Vec<Vec<HeadRows>>,
    /// Positions stored.
    len: usize,
    /// Positions this cache may hold.
    max_len: usize,
    head_dim: usize,
}

impl KvCache {
    /// An empty cache for `cfg` holding at most `max_len` positions, its
    /// keys and values stored as `types` says (which must suit the model:
    /// [`CacheTypes::check`]).
    pub fn new(cfg: &ModelConfig, max_len: usize, types: CacheTypes) -> KvCache {
        assert!(types.check(cfg.head_dim).is_ok(), "KvCache::new: {types:?} unfit for head_dim {}", cfg.head_dim);
        let empty = |ty| vec![vec![HeadRows::new(ty); cfg.n_head_kv]; cfg.n_layer];
        KvCache { keys: empty(types.k), values: empty(types.v), len: 0, max_len, head_dim: cfg.head_dim }
    }

    /// Bytes one position takes in a cache for `cfg`: keys and values of
    /// every layer.
    pub fn bytes_per_position(cfg: &ModelConfig, types: CacheTypes) -> usize {
        let per_element = types.k.bytes_per_element() + types.v.bytes_per_element();
        (cfg.n_layer as f64 * cfg.kv_dim() as f64 * per_element).round() as usize
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this cache may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Every (layer, head) buffer of keys and values.
    fn buffers_mut(&mut self) -> impl Iterator<Item = &mut HeadRows> {
        self.keys.iter_mut().chain(&mut self.values).flatten()
    }

    /// Forgets every position from `len` on. Also drops keys and values a
    /// failed forward pass appended to some layers but not the last (which
    /// would otherwise misalign the layers), so `truncate(len())` restores a
    /// consistent cache after an error.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        let n = len * self.head_dim;
        self.buffers_mut().for_each(|b| b.truncate(n));
        self.len = len;
    }

    /// A copy of the first `len` positions (all of them if `len` is larger),
    /// sized to fit: cheaper than `clone` + `truncate`, which copies the
    /// whole cache and keeps its spare capacity.
    pub fn clone_prefix(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        let n = len * self.head_dim;
        let prefix = |layers: &Vec<Vec<HeadRows>>| {
            layers.iter().map(|heads| heads.iter().map(|h| h.prefix(n)).collect()).collect()
        };
        KvCache {
            keys: prefix(&self.keys),
            values: prefix(&self.values),
            len,
            max_len: self.max_len,
            head_dim: self.head_dim,
        }
    }

    /// Appends keys and values (each [n, kv_dim]) of layer `layer` for the
    /// positions `len .. len + n`. The last layer's append advances `len`.
    /// (Rounded to the nearest f16, or quantized to q8_0.)
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let n_kv = self.keys[layer].len();
        for (row_k, row_v) in k.chunks_exact(n_kv * hd).zip(v.chunks_exact(n_kv * hd)) {
            for h in 0..n_kv {
                self.keys[layer][h].extend(&row_k[h * hd..(h + 1) * hd]);
                self.values[layer][h].extend(&row_v[h * hd..(h + 1) * hd]);
            }
        }
        if layer + 1 == self.keys.len() {
            self.len = self.keys[layer][0].len() / hd;
        }
    }

    /// Keys of `layer`'s KV head `head`, shape [positions, head_dim]
    /// (including positions appended for the current step).
    pub(crate) fn keys(&self, layer: usize, head: usize) -> KvRows<'_> {
        self.keys[layer][head].rows()
    }

    /// Values of `layer`'s KV head `head`, shape [positions, head_dim].
    pub(crate) fn values(&self, layer: usize, head: usize) -> KvRows<'_> {
        self.values[layer][head].rows()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).flatten().map(HeadRows::bytes).sum()
    }
}

/// Appends `x` rounded to f16 (`half`'s slice conversion: F16C where the
/// CPU has it, round to nearest even either way).
fn extend_f16(dst: &mut Vec<f16>, x: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    let start = dst.len();
    dst.resize(start + x.len(), f16::ZERO);
    dst[start..].convert_from_f32_slice(x);
}

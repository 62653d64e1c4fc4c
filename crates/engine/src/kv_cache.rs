//! The key/value cache of one sequence.
//!
//! Keys (after RoPE) and values of every past position, per layer, so each new
//! token attends to the past without recomputing it. Storage grows with the
//! sequence up to a fixed maximum, so a short chat does not pay for the whole
//! context window. A cache can be cloned (several samples sharing one prompt)
//! and truncated (rolling back rejected speculative tokens).
//!
//! Keys and values are stored as f16, as llama.cpp's default cache is: half
//! the memory, and half the bytes attention reads per position (the
//! attention kernel's f16 arithmetic is described in
//! `minnow_kernels::attention`).

use crate::model::ModelConfig;
use half::f16;

#[derive(Clone)]
pub struct KvCache {
    /// Per layer and KV head, shape [len, head_dim]: keys after RoPE. Head
    /// by head rather than position by position, so that attention reads one
    /// head's keys as one contiguous stream: interleaved, a head's 128–256
    /// bytes every `kv_dim` elements defeated the hardware prefetcher, and a
    /// decode step (which finds the cache in memory, not in L2) ran at half
    /// speed (criterion `attention/9x64/ctx1024/cold`: 107 vs 64 µs).
    keys: Vec<Vec<Vec<f16>>>,
    /// Per layer and KV head, shape [len, head_dim].
    values: Vec<Vec<Vec<f16>>>,
    /// Positions stored.
    len: usize,
    /// Positions this cache may hold.
    max_len: usize,
    head_dim: usize,
}

impl KvCache {
    /// An empty cache for `cfg` holding at most `max_len` positions.
    pub fn new(cfg: &ModelConfig, max_len: usize) -> KvCache {
        let empty = vec![vec![Vec::new(); cfg.n_head_kv]; cfg.n_layer];
        KvCache { keys: empty.clone(), values: empty, len: 0, max_len, head_dim: cfg.head_dim }
    }

    /// Bytes one position takes in a cache for `cfg`: keys and values of
    /// every layer, f16.
    pub fn bytes_per_position(cfg: &ModelConfig) -> usize {
        2 * cfg.n_layer * cfg.kv_dim() * std::mem::size_of::<f16>()
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
    fn buffers_mut(&mut self) -> impl Iterator<Item = &mut Vec<f16>> {
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
        let prefix = |layers: &Vec<Vec<Vec<f16>>>| {
            layers.iter().map(|heads| heads.iter().map(|h| h[..n].to_vec()).collect()).collect()
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
    /// (Rounded to the nearest f16.)
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let n_kv = self.keys[layer].len();
        for (row_k, row_v) in k.chunks_exact(n_kv * hd).zip(v.chunks_exact(n_kv * hd)) {
            for h in 0..n_kv {
                extend_f16(&mut self.keys[layer][h], &row_k[h * hd..(h + 1) * hd]);
                extend_f16(&mut self.values[layer][h], &row_v[h * hd..(h + 1) * hd]);
            }
        }
        if layer + 1 == self.keys.len() {
            self.len = self.keys[layer][0].len() / hd;
        }
    }

    /// Keys of `layer`'s KV head `head`, shape [positions, head_dim]
    /// (including positions appended for the current step).
    pub(crate) fn keys(&self, layer: usize, head: usize) -> &[f16] {
        &self.keys[layer][head]
    }

    /// Values of `layer`'s KV head `head`, shape [positions, head_dim].
    pub(crate) fn values(&self, layer: usize, head: usize) -> &[f16] {
        &self.values[layer][head]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).flatten().map(|v| v.capacity() * std::mem::size_of::<f16>()).sum()
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

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
    /// Per layer, shape [len, kv_dim]: keys after RoPE.
    keys: Vec<Vec<f16>>,
    /// Per layer, shape [len, kv_dim].
    values: Vec<Vec<f16>>,
    /// Positions stored.
    len: usize,
    /// Positions this cache may hold.
    max_len: usize,
    /// n_head_kv * head_dim.
    kv_dim: usize,
}

impl KvCache {
    /// An empty cache for `cfg` holding at most `max_len` positions.
    pub fn new(cfg: &ModelConfig, max_len: usize) -> KvCache {
        KvCache {
            keys: vec![Vec::new(); cfg.n_layer],
            values: vec![Vec::new(); cfg.n_layer],
            len: 0,
            max_len,
            kv_dim: cfg.kv_dim(),
        }
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

    /// Forgets every position from `len` on. Also drops keys and values a
    /// failed forward pass appended to some layers but not the last (which
    /// would otherwise misalign the layers), so `truncate(len())` restores a
    /// consistent cache after an error.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for l in 0..self.keys.len() {
            self.keys[l].truncate(len * self.kv_dim);
            self.values[l].truncate(len * self.kv_dim);
        }
        self.len = len;
    }

    /// A copy of the first `len` positions (all of them if `len` is larger),
    /// sized to fit: cheaper than `clone` + `truncate`, which copies the
    /// whole cache and keeps its spare capacity.
    pub fn clone_prefix(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        let n = len * self.kv_dim;
        KvCache {
            keys: self.keys.iter().map(|k| k[..n].to_vec()).collect(),
            values: self.values.iter().map(|v| v[..n].to_vec()).collect(),
            len,
            max_len: self.max_len,
            kv_dim: self.kv_dim,
        }
    }

    /// Appends keys and values (each [n, kv_dim]) of layer `layer` for the
    /// positions `len .. len + n`. The last layer's append advances `len`.
    /// (Rounded to the nearest f16.)
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        extend_f16(&mut self.keys[layer], k);
        extend_f16(&mut self.values[layer], v);
        if layer + 1 == self.keys.len() {
            self.len = self.keys[layer].len() / self.kv_dim;
        }
    }

    /// Keys of `layer`, shape [positions, kv_dim] (including positions
    /// appended for the current step).
    pub(crate) fn keys(&self, layer: usize) -> &[f16] {
        &self.keys[layer]
    }

    pub(crate) fn values(&self, layer: usize) -> &[f16] {
        &self.values[layer]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.capacity() * std::mem::size_of::<f16>()).sum()
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

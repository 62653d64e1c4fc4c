//! The key/value cache of one sequence.
//!
//! Keys (after RoPE) and values of every past position, per layer, so each new
//! token attends to the past without recomputing it. Storage grows with the
//! sequence up to a fixed maximum, so a short chat does not pay for the whole
//! context window. A cache can be cloned (several samples sharing one prompt)
//! and truncated (rolling back rejected speculative tokens).

use crate::model::ModelConfig;

#[derive(Clone)]
pub struct KvCache {
    /// Per layer, shape [len, kv_dim]: keys after RoPE.
    keys: Vec<Vec<f32>>,
    /// Per layer, shape [len, kv_dim].
    values: Vec<Vec<f32>>,
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
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
        if layer + 1 == self.keys.len() {
            self.len = self.keys[layer].len() / self.kv_dim;
        }
    }

    /// Keys of `layer`, shape [positions, kv_dim] (including positions
    /// appended for the current step).
    pub(crate) fn keys(&self, layer: usize) -> &[f32] {
        &self.keys[layer]
    }

    pub(crate) fn values(&self, layer: usize) -> &[f32] {
        &self.values[layer]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.capacity() * 4).sum()
    }
}

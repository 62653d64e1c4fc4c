//! Model hyperparameters read from GGUF metadata (`{arch}.*` keys), checked
//! for sanity before anything is allocated from them.

use super::ModelError;
use minnow_gguf::GgufFile;

/// The architecture families minnow runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and its descendants (SmolLM2): adjacent-pair RoPE, no biases.
    Llama,
    /// Qwen2 / Qwen2.5: q/k/v biases, NEOX RoPE.
    Qwen2,
    /// Gemma 3: scaled embeddings, q/k norms, pre and post norms, GELU FFN,
    /// interleaved sliding-window and global attention.
    Gemma3,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Arch, ModelError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "gemma3" => Ok(Arch::Gemma3),
            other => Err(ModelError::new(format!(
                "architecture '{other}' is not supported (minnow runs: llama, qwen2, gemma3)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Hyperparameters of a decoder-only transformer.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Hidden width of the feed-forward network.
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Width of one attention head (keys, queries and values).
    pub head_dim: usize,
    /// Rotated dimensions of each head.
    pub n_rot: usize,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3).
    pub rope_base_local: f32,
    pub norm_eps: f32,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// Sliding attention window of local layers (Gemma 3), if any.
    pub sliding_window: Option<usize>,
    pub vocab_size: usize,
}

/// Upper bounds that keep a hostile file from making us allocate absurd
/// buffers; far above any model minnow targets.
const MAX_WIDTH: u64 = 1 << 20;
const MAX_LAYERS: u64 = 4096;
const MAX_HEADS: u64 = 4096;

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch_name = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::new("metadata key 'general.architecture' is missing"))?;
        let arch = Arch::from_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str, max: u64| -> Result<usize, ModelError> {
            let v = file
                .get(&key(k))
                .ok_or_else(|| ModelError::new(format!("metadata key '{}' is missing", key(k))))?;
            let n = v.as_u64().ok_or_else(|| {
                ModelError::new(format!("metadata key '{}' must be a non-negative integer, found {v:?}", key(k)))
            })?;
            if n == 0 || n > max {
                return Err(ModelError::new(format!("metadata key '{}' = {n} is out of range 1..={max}", key(k))));
            }
            Ok(n as usize)
        };
        let opt = |k: &str, max: u64| -> Result<Option<usize>, ModelError> {
            if file.get(&key(k)).is_none() {
                return Ok(None);
            }
            req(k, max).map(Some)
        };
        let float = |k: &str, default: f32| -> Result<f32, ModelError> {
            match file.get(&key(k)) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .map(|f| f as f32)
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or_else(|| ModelError::new(format!("metadata key '{}' must be a positive number", key(k)))),
            }
        };

        let n_layer = req("block_count", MAX_LAYERS)?;
        let n_embd = req("embedding_length", MAX_WIDTH)?;
        let n_ff = req("feed_forward_length", MAX_WIDTH)?;
        let n_head = req("attention.head_count", MAX_HEADS)?;
        let n_head_kv = opt("attention.head_count_kv", MAX_HEADS)?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(ModelError::new(format!(
                "{n_head} attention heads cannot be shared evenly by {n_head_kv} key/value heads"
            )));
        }
        let head_dim = match opt("attention.key_length", MAX_WIDTH)? {
            Some(d) => d,
            None => {
                if n_embd % n_head != 0 {
                    return Err(ModelError::new(format!(
                        "embedding width {n_embd} is not divisible by {n_head} heads"
                    )));
                }
                n_embd / n_head
            }
        };
        if let Some(vd) = opt("attention.value_length", MAX_WIDTH)? {
            if vd != head_dim {
                return Err(ModelError::new(format!(
                    "value head width {vd} differs from key head width {head_dim}: not supported"
                )));
            }
        }
        let n_rot = opt("rope.dimension_count", MAX_WIDTH)?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 || n_rot > 1024 {
            return Err(ModelError::new(format!(
                "rope.dimension_count {n_rot} must be even and at most the head width {head_dim}"
            )));
        }
        if let Some(kind) = file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            if kind != "none" {
                return Err(ModelError::new(format!("RoPE scaling '{kind}' is not supported yet")));
            }
        }
        let rope_base = float("rope.freq_base", 10_000.0)?;
        let rope_base_local = float("rope.freq_base_swa", 10_000.0)?;
        let norm_eps = float("attention.layer_norm_rms_epsilon", 1e-5)?;
        let context_length = opt("context_length", 1 << 24)?.unwrap_or(2048);
        let sliding_window = match arch {
            Arch::Gemma3 => Some(opt("attention.sliding_window", 1 << 24)?.unwrap_or(512)),
            _ => None,
        };
        let vocab_size = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            .ok_or_else(|| ModelError::new("metadata key 'tokenizer.ggml.tokens' is missing"))?;
        Ok(ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_base,
            rope_base_local,
            norm_eps,
            context_length,
            sliding_window,
            vocab_size,
        })
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Whether layer `l` uses sliding-window attention (Gemma 3: five local
    /// layers, then one global).
    pub fn is_sliding(&self, l: usize) -> bool {
        self.sliding_window.is_some() && l % 6 < 5
    }
}

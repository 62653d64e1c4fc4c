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
    /// Qwen1.5-MoE / Qwen2-MoE: Qwen2 attention, routed experts whose top-k
    /// weights are not renormalised, plus a sigmoid-gated shared expert.
    Qwen2Moe,
    /// Qwen3-MoE: per-head q/k RMSNorm, NEOX RoPE, a head width of its own
    /// (`attention.key_length`), routed experts with renormalised top-k weights.
    Qwen3Moe,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Arch, ModelError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "gemma3" => Ok(Arch::Gemma3),
            "qwen2moe" => Ok(Arch::Qwen2Moe),
            "qwen3moe" => Ok(Arch::Qwen3Moe),
            other => Err(ModelError::new(format!(
                "architecture '{other}' is not supported (minnow runs: llama, qwen2, gemma3, qwen2moe, qwen3moe)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
        }
    }

    /// Whether every model of this architecture is a mixture of experts
    /// (`llama` may or may not be: Mixtral is `llama` with experts).
    pub fn requires_experts(self) -> bool {
        matches!(self, Arch::Qwen2Moe | Arch::Qwen3Moe)
    }

    /// Whether the architecture may have experts at all.
    pub fn allows_experts(self) -> bool {
        matches!(self, Arch::Llama | Arch::Qwen2Moe | Arch::Qwen3Moe)
    }
}

/// The mixture-of-experts part of a config: how the FFN of every layer is
/// split into experts and how tokens are routed to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts per layer (`expert_count`).
    pub n_expert: usize,
    /// Experts each token is routed to (`expert_used_count`, the k of top-k).
    pub n_expert_used: usize,
    /// Hidden width of one expert's FFN.
    pub n_ff_exp: usize,
    /// Hidden width of the always-on shared expert (qwen2moe), if the
    /// architecture has one.
    pub n_ff_shared: Option<usize>,
    /// Whether the chosen experts' router probabilities are rescaled to sum
    /// to 1 (Mixtral, qwen3moe) or used as they are (qwen2moe).
    pub norm_topk: bool,
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
    /// Experts, for mixture-of-experts models; `None` for dense ones.
    pub moe: Option<MoeConfig>,
}

/// Upper bounds that keep a hostile file from making us allocate absurd
/// buffers; far above any model minnow targets.
const MAX_WIDTH: u64 = 1 << 20;
const MAX_LAYERS: u64 = 4096;
const MAX_HEADS: u64 = 4096;
/// The largest MoE models have a few hundred experts per layer.
const MAX_EXPERTS: u64 = 4096;

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch_name = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::new("metadata key 'general.architecture' is missing"))?;
        let arch = Arch::from_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str, max: u64| -> Result<usize, ModelError> {
            let v =
                file.get(&key(k)).ok_or_else(|| ModelError::new(format!("metadata key '{}' is missing", key(k))))?;
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
        // MoE files may omit the dense FFN width (it then defaults to the
        // expert width); dense files must have it.
        let n_ff_key = opt("feed_forward_length", MAX_WIDTH)?;
        let moe = moe_config(file, arch, arch_name, n_ff_key)?;
        let n_ff = match (n_ff_key, &moe) {
            (Some(n), _) => n,
            (None, Some(m)) => m.n_ff_exp,
            (None, None) => req("feed_forward_length", MAX_WIDTH)?,
        };
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
            moe,
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

/// Reads and checks the expert metadata. A file whose experts do not add up
/// (k of top-k above the expert count, expert tensors without experts, an MoE
/// architecture without experts) is refused here with the keys named, before
/// any tensor is looked at.
fn moe_config(
    file: &GgufFile,
    arch: Arch,
    arch_name: &str,
    n_ff: Option<usize>,
) -> Result<Option<MoeConfig>, ModelError> {
    let key = |k: &str| format!("{arch_name}.{k}");
    // Unlike the other sizes, 0 is meaningful here: some dense llama files
    // say `expert_count = 0`.
    let count = |k: &str| -> Result<Option<u64>, ModelError> {
        match file.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ModelError::new(format!("metadata key '{}' must be a non-negative integer, found {v:?}", key(k)))
            }),
        }
    };
    let n_expert = count("expert_count")?.unwrap_or(0);
    let n_used = count("expert_used_count")?.unwrap_or(0);
    let has_expert_tensors =
        file.tensors().iter().any(|t| t.name.ends_with("_exps.weight") || t.name.ends_with(".ffn_gate_inp.weight"));

    if n_expert == 0 {
        if arch.requires_experts() {
            return Err(ModelError::new(format!(
                "'{arch_name}' is a mixture-of-experts architecture but metadata key '{}' is missing or 0",
                key("expert_count")
            )));
        }
        if has_expert_tensors {
            return Err(ModelError::new(format!(
                "the file has expert tensors (ffn_*_exps / ffn_gate_inp) but metadata key '{}' is missing or 0",
                key("expert_count")
            )));
        }
        if n_used > 0 {
            return Err(ModelError::new(format!(
                "metadata key '{}' = {n_used} but '{}' is missing or 0: there are no experts to route to",
                key("expert_used_count"),
                key("expert_count")
            )));
        }
        return Ok(None);
    }
    if !arch.allows_experts() {
        return Err(ModelError::new(format!(
            "metadata key '{}' = {n_expert}, but minnow runs '{arch_name}' only as a dense model",
            key("expert_count")
        )));
    }
    if n_expert > MAX_EXPERTS {
        return Err(ModelError::new(format!(
            "metadata key '{}' = {n_expert} is out of range 1..={MAX_EXPERTS}",
            key("expert_count")
        )));
    }
    if n_used == 0 {
        return Err(ModelError::new(format!(
            "metadata key '{}' is missing or 0: each token must be routed to at least one of the {n_expert} experts",
            key("expert_used_count")
        )));
    }
    if n_used > n_expert {
        return Err(ModelError::new(format!(
            "metadata key '{}' = {n_used} exceeds '{}' = {n_expert}: a token cannot use more experts than exist",
            key("expert_used_count"),
            key("expert_count")
        )));
    }
    let width = |k: &str| -> Result<Option<usize>, ModelError> {
        match count(k)? {
            None => Ok(None),
            Some(n) if n == 0 || n > MAX_WIDTH => {
                Err(ModelError::new(format!("metadata key '{}' = {n} is out of range 1..={MAX_WIDTH}", key(k))))
            }
            Some(n) => Ok(Some(n as usize)),
        }
    };
    // Without the key, Mixtral's experts are as wide as `feed_forward_length`;
    // older Qwen MoE conversions split that width over the k chosen experts
    // (llama.cpp's fallback, followed here so those files load alike).
    let n_ff_exp = match (width("expert_feed_forward_length")?, n_ff) {
        (Some(w), _) => w,
        (None, Some(n)) if arch == Arch::Llama => n,
        (None, Some(n)) if n % n_used as usize == 0 => n / n_used as usize,
        _ => {
            return Err(ModelError::new(format!(
                "metadata key '{}' is missing and cannot be derived from '{}'",
                key("expert_feed_forward_length"),
                key("feed_forward_length")
            )))
        }
    };
    let n_ff_shared = match arch {
        Arch::Qwen2Moe => Some(match width("expert_shared_feed_forward_length")? {
            Some(w) => w,
            None => n_ff.ok_or_else(|| {
                ModelError::new(format!(
                    "metadata keys '{}' and '{}' are both missing: the shared expert's width is unknown",
                    key("expert_shared_feed_forward_length"),
                    key("feed_forward_length")
                ))
            })?,
        }),
        _ => None,
    };
    Ok(Some(MoeConfig {
        n_expert: n_expert as usize,
        n_expert_used: n_used as usize,
        n_ff_exp,
        n_ff_shared,
        norm_topk: arch != Arch::Qwen2Moe,
    }))
}

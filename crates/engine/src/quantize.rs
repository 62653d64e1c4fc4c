//! `minnow quantize`: a model file re-encoded in another block format, with
//! llama.cpp's per-tensor mixes for the `_M` types.
//!
//! Which tensor gets which type (the one rule, [`tensor_type`]):
//! - vectors (norms, biases) stay F32;
//! - a matrix whose rows are not whole blocks of the chosen type falls back
//!   as llama.cpp's does: a k-quant to the legacy type of about its size
//!   (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), anything else to F16;
//! - `output.weight` (the head) gets Q6_K under every type below 8 bits, as
//!   llama.cpp does: the head's errors go straight into the logits (a model
//!   whose head is its embedding table, SmolLM2's, gets it for
//!   `token_embd.weight`);
//! - `Q4_K_M` and `Q5_K_M` are Q4_K / Q5_K with `attn_v` and `ffn_down`
//!   raised to Q6_K in the first eighth of the layers, the last eighth, and
//!   every third layer between (llama.cpp's "more bits" layers), and a fused
//!   `attn_qkv` at Q5_K / Q6_K;
//! - `Q3_K_M` is Q3_K with `attn_v` at Q5_K in the first two layers and Q4_K
//!   after, `ffn_down` at Q5_K in the first sixteenth of the layers and Q4_K
//!   after, `attn_output` and a fused `attn_qkv` at Q4_K;
//! - `Q2_K` is Q2_K with `ffn_down` and `attn_output` at Q3_K, and `attn_v`
//!   at Q3_K (Q4_K when four or more query heads share each key/value head);
//! - the plain types put every other matrix in that type.
//!
//! Where a row is not whole blocks, Q2_K and Q3_K fall back to Q4_0, as
//! llama.cpp's do. llama.cpp's extra rules for 8-expert models are not
//! followed.
//!
//! With an importance matrix (`minnow imatrix`, or `llama-imatrix`'s), the
//! scale fits of the k-quants and of Q4_0/Q4_1/Q5_0/Q5_1 weigh each
//! weight's error by its input column's mean squared activation on the
//! user's data (`quantize_weighted_to_vec`; Q8_0 ignores it), and Q4_0 /
//! Q5_0 raise the first eighth of `ffn_down` to Q4_1 / Q5_1 (llama.cpp's
//! guard for those layers).
//!
//! Input tensors in F32, F16 or BF16 are quantized from their values; an
//! input that is already quantized is dequantized first (a second rounding:
//! the report counts those tensors, and the command warns).

use crate::imatrix::Imatrix;
use minnow_gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value};
use minnow_kernels::formats::dequantize;
use minnow_kernels::quantize::{is_weighted, quantize_to_vec, quantize_weighted_to_vec};
use std::collections::BTreeMap;
use std::path::Path;

/// The output types `minnow quantize` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6K,
    Q5KM,
    Q5_0,
    Q4KM,
    Q4_0,
    Q3KM,
    Q2K,
}

impl QuantType {
    pub const ALL: [QuantType; 11] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q6K,
        QuantType::Q5KM,
        QuantType::Q5_0,
        QuantType::Q4KM,
        QuantType::Q4_0,
        QuantType::Q3KM,
        QuantType::Q2K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::BF16 => "BF16",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q6K => "Q6_K",
            QuantType::Q5KM => "Q5_K_M",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q4KM => "Q4_K_M",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q3KM => "Q3_K_M",
            QuantType::Q2K => "Q2_K",
        }
    }

    /// `Q4_K_M`, `q4_k_m`…; an error listing the types for anything else.
    pub fn parse(s: &str) -> Result<QuantType, String> {
        let up = s.to_ascii_uppercase();
        if let Some(t) = QuantType::ALL.into_iter().find(|t| t.name() == up) {
            return Ok(t);
        }
        let names: Vec<&str> = QuantType::ALL.iter().map(|t| t.name()).collect();
        Err(format!("{s:?} is not a quantization type minnow makes: use one of {}", names.join(", ")))
    }

    /// The type of the bulk of the matrices.
    pub fn base(self) -> GgmlType {
        match self {
            QuantType::F32 => GgmlType::F32,
            QuantType::F16 => GgmlType::F16,
            QuantType::BF16 => GgmlType::BF16,
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q6K => GgmlType::Q6_K,
            QuantType::Q5KM => GgmlType::Q5_K,
            QuantType::Q5_0 => GgmlType::Q5_0,
            QuantType::Q4KM => GgmlType::Q4_K,
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q3KM => GgmlType::Q3_K,
            QuantType::Q2K => GgmlType::Q2_K,
        }
    }

    /// llama.cpp's `general.file_type` for this mix (`llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 7,
            QuantType::Q5_0 => 8,
            QuantType::Q2K => 10,
            QuantType::Q3KM => 12,
            QuantType::Q4KM => 15,
            QuantType::Q5KM => 17,
            QuantType::Q6K => 18,
            QuantType::BF16 => 32,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, QuantType::F32 | QuantType::F16 | QuantType::BF16)
    }
}

/// llama.cpp's "more bits" layers: the first and last eighth, and every
/// third layer between.
fn more_bits(layer: usize, n_layer: usize) -> bool {
    let e = n_layer / 8;
    layer < e || layer >= 7 * n_layer / 8 || (layer - e) % 3 == 2
}

/// What the mixes need to know about the model.
#[derive(Debug, Clone, Copy)]
pub struct MixShape {
    pub n_layer: usize,
    /// Query heads per key/value head.
    pub n_gqa: usize,
    /// The model has no `output.weight`: its embedding table is the head.
    pub tied: bool,
    /// Quantizing with an importance matrix (Q4_0 and Q5_0 then raise the
    /// first eighth of `ffn_down` to Q4_1 / Q5_1, as llama.cpp does).
    pub imatrix: bool,
}

impl MixShape {
    /// The shape of the model in `file` (layers and heads from its
    /// metadata; zeros where it has none).
    pub fn of(file: &GgufFile, imatrix: bool) -> MixShape {
        let cfg = crate::model::ModelConfig::from_gguf(file).ok();
        MixShape {
            n_layer: cfg.as_ref().map_or(0, |c| c.n_layer),
            n_gqa: cfg.as_ref().map_or(1, |c| c.n_head / c.n_head_kv.max(1)),
            tied: file.tensor("output.weight").is_none(),
            imatrix,
        }
    }
}

/// The type tensor `name` (ggml dims `dims`) is written as under `ty` in a
/// model of shape `m`. See the module doc.
pub fn tensor_type(name: &str, dims: &[u64], ty: QuantType, m: MixShape) -> GgmlType {
    use GgmlType as G;
    if dims.len() < 2 {
        return G::F32;
    }
    let mut want = ty.base();
    let head = name == "output.weight" || (m.tied && name == "token_embd.weight");
    let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
    let is = |part: &str| name.contains(part);
    if head {
        if !ty.is_float() && ty != QuantType::Q8_0 {
            want = G::Q6_K;
        }
    } else if let Some(l) = layer {
        let n = m.n_layer;
        want = match ty {
            QuantType::Q4KM | QuantType::Q5KM if (is("attn_v.weight") || is("ffn_down")) && more_bits(l, n) => G::Q6_K,
            QuantType::Q4KM if is("attn_qkv") => G::Q5_K,
            QuantType::Q5KM if is("attn_qkv") => G::Q6_K,
            QuantType::Q3KM if is("attn_v.weight") => [G::Q4_K, G::Q5_K][usize::from(l < 2)],
            QuantType::Q3KM if is("ffn_down") => [G::Q4_K, G::Q5_K][usize::from(l < n / 16)],
            QuantType::Q3KM if is("attn_output") || is("attn_qkv") => G::Q4_K,
            QuantType::Q2K if is("attn_v.weight") => [G::Q3_K, G::Q4_K][usize::from(m.n_gqa >= 4)],
            QuantType::Q2K if is("ffn_down") || is("attn_output") => G::Q3_K,
            QuantType::Q4_0 if m.imatrix && is("ffn_down") && l < n / 8 => G::Q4_1,
            QuantType::Q5_0 if m.imatrix && is("ffn_down") && l < n / 8 => G::Q5_1,
            _ => want,
        };
    }
    if dims[0].is_multiple_of(want.block_size() as u64) {
        return want;
    }
    let fallback = match want {
        G::Q2_K | G::Q3_K => G::Q4_0,
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        _ => G::F16,
    };
    if dims[0].is_multiple_of(fallback.block_size() as u64) {
        fallback
    } else {
        G::F16
    }
}

/// What a quantization did.
#[derive(Debug, Default)]
pub struct QuantReport {
    pub tensors: usize,
    /// Tensors whose input was already quantized (dequantized, then re-encoded).
    pub requantized: usize,
    /// Tensors quantized with importance weights.
    pub weighted: usize,
    /// Output type → tensors and elements.
    pub mix: BTreeMap<String, (usize, u64)>,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

/// Re-encodes `input` as `ty` into `out` (written atomically), quantizing
/// with `threads` threads, weighted by `imatrix` where it has the tensor;
/// `progress` hears each tensor's name.
pub fn quantize_file(
    input: &GgufFile,
    out: &Path,
    ty: QuantType,
    imatrix: Option<&Imatrix>,
    threads: usize,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<QuantReport> {
    use anyhow::Context;
    let shape = MixShape::of(input, imatrix.is_some());
    let mut w = GgufWriter::new();
    for (key, value) in input.metadata() {
        if key != "general.file_type" && key != "general.quantization_version" {
            w.add_metadata(key.clone(), value.clone())?;
        }
    }
    w.add_metadata("general.file_type", Value::U32(ty.file_type()))?;
    w.add_metadata("general.quantization_version", Value::U32(2))?;
    let mut report = QuantReport { in_bytes: input.file_size(), ..Default::default() };
    for info in input.tensors() {
        progress(&info.name);
        let want = tensor_type(&info.name, &info.dims, ty, shape);
        let bytes = if info.ty == want {
            input.tensor_data(info).to_vec()
        } else {
            if !matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                report.requantized += 1;
            }
            // A tied head's statistics are recorded as the head's.
            let imp = imatrix.and_then(|m| {
                m.importance(&info.name)
                    .or_else(|| {
                        (shape.tied && info.name == "token_embd.weight")
                            .then(|| m.importance("output.weight"))
                            .flatten()
                    })
                    .filter(|v| v.len() as u64 == info.dims[0])
            });
            let weighted = imp.is_some() && is_weighted(want);
            report.weighted += usize::from(weighted);
            encode(input, info, want, imp.as_deref(), threads).with_context(|| format!("tensor '{}'", info.name))?
        };
        w.add_tensor(info.name.clone(), &info.dims, want, bytes)?;
        report.tensors += 1;
        let e = report.mix.entry(want.name().to_string()).or_default();
        e.0 += 1;
        e.1 += info.n_elements();
    }
    w.write_file(out).with_context(|| format!("cannot write {}", out.display()))?;
    report.out_bytes = std::fs::metadata(out)?.len();
    Ok(report)
}

/// One tensor's values in `want`, its rows split over `threads` threads.
fn encode(
    input: &GgufFile,
    info: &TensorInfo,
    want: GgmlType,
    imp: Option<&[f32]>,
    threads: usize,
) -> anyhow::Result<Vec<u8>> {
    let n = info.n_elements() as usize;
    let mut values = vec![0f32; n];
    dequantize(info.ty, input.tensor_data(info), &mut values).map_err(|e| anyhow::anyhow!("{e}"))?;
    if values.iter().any(|v| !v.is_finite()) {
        anyhow::bail!("it holds non-finite values");
    }
    let row = info.dims[0] as usize;
    let rows = n / row.max(1);
    let per = rows.div_ceil(threads.max(1)).max(1);
    let parts: Vec<anyhow::Result<Vec<u8>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = values
            .chunks(per * row)
            .map(|chunk| {
                sc.spawn(move || {
                    match imp {
                        Some(imp) => quantize_weighted_to_vec(want, chunk, imp),
                        None => quantize_to_vec(want, chunk),
                    }
                    .map_err(|e| anyhow::anyhow!("{e}"))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a quantizer thread panicked"))))
            .collect()
    });
    let mut out = Vec::with_capacity(want.bytes_for(n as u64).unwrap_or(0) as usize);
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixes_follow_llama_cpp() {
        const M30: MixShape = MixShape { n_layer: 30, n_gqa: 3, tied: false, imatrix: false };
        const TIED: MixShape = MixShape { tied: true, ..M30 };
        let m = [2048u64, 576];
        // 30 layers: the first and last 3, and every third layer between.
        let raised: Vec<usize> = (0..30).filter(|&l| more_bits(l, 30)).collect();
        assert_eq!(raised, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert_eq!(tensor_type("blk.5.attn_v.weight", &m, QuantType::Q4KM, M30), GgmlType::Q6_K);
        assert_eq!(tensor_type("blk.6.attn_v.weight", &m, QuantType::Q4KM, M30), GgmlType::Q4_K);
        assert_eq!(tensor_type("blk.0.ffn_down.weight", &m, QuantType::Q5KM, M30), GgmlType::Q6_K);
        assert_eq!(tensor_type("blk.0.attn_q.weight", &m, QuantType::Q5KM, M30), GgmlType::Q5_K);
        assert_eq!(tensor_type("output.weight", &m, QuantType::Q4_0, M30), GgmlType::Q6_K);
        assert_eq!(tensor_type("output.weight", &m, QuantType::Q8_0, M30), GgmlType::Q8_0);
        assert_eq!(tensor_type("token_embd.weight", &m, QuantType::Q4_0, TIED), GgmlType::Q6_K);
        assert_eq!(tensor_type("token_embd.weight", &m, QuantType::Q4_0, M30), GgmlType::Q4_0);
        assert_eq!(tensor_type("blk.0.attn_norm.weight", &[576], QuantType::Q4KM, M30), GgmlType::F32);
        // Rows of 576 (SmolLM2's width) are not whole 256-element k-quant
        // blocks: the legacy type of about the same size instead.
        assert_eq!(tensor_type("blk.6.attn_q.weight", &[576, 576], QuantType::Q4KM, M30), GgmlType::Q5_0);
        assert_eq!(tensor_type("blk.6.attn_q.weight", &[576, 576], QuantType::Q5KM, M30), GgmlType::Q5_1);
        assert_eq!(tensor_type("blk.5.attn_v.weight", &[576, 192], QuantType::Q4KM, M30), GgmlType::Q8_0);
        assert_eq!(tensor_type("blk.0.ffn_up.weight", &[100, 64], QuantType::Q4KM, M30), GgmlType::F16);
        // Q3_K_M: attn_v Q5_K in layers 0-1, ffn_down Q5_K below n/16.
        assert_eq!(tensor_type("blk.1.attn_v.weight", &m, QuantType::Q3KM, M30), GgmlType::Q5_K);
        assert_eq!(tensor_type("blk.2.attn_v.weight", &m, QuantType::Q3KM, M30), GgmlType::Q4_K);
        assert_eq!(tensor_type("blk.0.ffn_down.weight", &m, QuantType::Q3KM, M30), GgmlType::Q5_K);
        assert_eq!(tensor_type("blk.1.ffn_down.weight", &m, QuantType::Q3KM, M30), GgmlType::Q4_K);
        let m40 = MixShape { n_layer: 40, ..M30 };
        assert_eq!(tensor_type("blk.1.ffn_down.weight", &m, QuantType::Q3KM, m40), GgmlType::Q5_K);
        assert_eq!(tensor_type("blk.9.attn_output.weight", &m, QuantType::Q3KM, M30), GgmlType::Q4_K);
        assert_eq!(tensor_type("blk.9.ffn_gate.weight", &m, QuantType::Q3KM, M30), GgmlType::Q3_K);
        assert_eq!(tensor_type("output.weight", &m, QuantType::Q3KM, M30), GgmlType::Q6_K);
        // Q2_K: attn_v by grouping, ffn_down and attn_output Q3_K.
        assert_eq!(tensor_type("blk.9.attn_v.weight", &m, QuantType::Q2K, M30), GgmlType::Q3_K);
        let gqa4 = MixShape { n_gqa: 4, ..M30 };
        assert_eq!(tensor_type("blk.9.attn_v.weight", &m, QuantType::Q2K, gqa4), GgmlType::Q4_K);
        assert_eq!(tensor_type("blk.9.ffn_down.weight", &m, QuantType::Q2K, M30), GgmlType::Q3_K);
        assert_eq!(tensor_type("blk.9.attn_q.weight", &m, QuantType::Q2K, M30), GgmlType::Q2_K);
        assert_eq!(tensor_type("blk.9.attn_q.weight", &[576, 576], QuantType::Q2K, M30), GgmlType::Q4_0);
        // With an importance matrix, Q4_0 guards the first eighth of ffn_down.
        let im = MixShape { imatrix: true, ..M30 };
        assert_eq!(tensor_type("blk.2.ffn_down.weight", &m, QuantType::Q4_0, im), GgmlType::Q4_1);
        assert_eq!(tensor_type("blk.3.ffn_down.weight", &m, QuantType::Q4_0, im), GgmlType::Q4_0);
        assert_eq!(tensor_type("blk.2.ffn_down.weight", &m, QuantType::Q4_0, M30), GgmlType::Q4_0);
        assert_eq!(tensor_type("blk.0.ffn_down.weight", &m, QuantType::Q5_0, im), GgmlType::Q5_1);
        assert!(QuantType::parse("q4_k_m").is_ok());
        assert!(QuantType::parse("q2_k").is_ok());
        assert!(QuantType::parse("Q7").unwrap_err().contains("Q4_K_M"));
    }
}

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
//!   every third layer between (llama.cpp's "more bits" layers);
//! - the plain types put every other matrix in that type.
//!
//! With an importance matrix (`minnow imatrix`, or `llama-imatrix`'s), the
//! k-quant fits (Q4_K, Q5_K, Q6_K) weigh each weight's error by its input
//! column's mean squared activation on the user's data
//! (`quantize_weighted_to_vec`); the legacy types ignore it.
//!
//! Input tensors in F32, F16 or BF16 are quantized from their values; an
//! input that is already quantized is dequantized first (a second rounding:
//! the report counts those tensors, and the command warns).

use crate::imatrix::Imatrix;
use minnow_gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value};
use minnow_kernels::formats::dequantize;
use minnow_kernels::quantize::{quantize_to_vec, quantize_weighted_to_vec};
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
}

impl QuantType {
    pub const ALL: [QuantType; 9] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q6K,
        QuantType::Q5KM,
        QuantType::Q5_0,
        QuantType::Q4KM,
        QuantType::Q4_0,
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
        }
    }

    /// `Q4_K_M`, `q4_k_m`…; an error listing the types for anything else.
    pub fn parse(s: &str) -> Result<QuantType, String> {
        let up = s.to_ascii_uppercase();
        if let Some(t) = QuantType::ALL.into_iter().find(|t| t.name() == up) {
            return Ok(t);
        }
        let names: Vec<&str> = QuantType::ALL.iter().map(|t| t.name()).collect();
        let later = if matches!(up.as_str(), "Q3_K_M" | "Q2_K" | "Q3_K_S" | "Q3_K_L") {
            " (the 2- and 3-bit k-quants have no quantizer in minnow yet)"
        } else {
            ""
        };
        Err(format!("{s:?} is not a quantization type minnow makes{later}: use one of {}", names.join(", ")))
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

/// The type tensor `name` (ggml dims `dims`) is written as under `ty` in a
/// model of `n_layer` layers, `tied` when the model has no `output.weight`
/// (its embedding table is the head). See the module doc.
pub fn tensor_type(name: &str, dims: &[u64], ty: QuantType, n_layer: usize, tied: bool) -> GgmlType {
    if dims.len() < 2 {
        return GgmlType::F32;
    }
    let mut want = ty.base();
    let head = name == "output.weight" || (tied && name == "token_embd.weight");
    if !ty.is_float() && ty != QuantType::Q8_0 && head {
        want = GgmlType::Q6_K;
    }
    if matches!(ty, QuantType::Q4KM | QuantType::Q5KM) {
        let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
        let raised = name.contains("attn_v.weight") || name.contains("ffn_down");
        if raised && layer.is_some_and(|l| more_bits(l, n_layer)) {
            want = GgmlType::Q6_K;
        }
    }
    if dims[0].is_multiple_of(want.block_size() as u64) {
        return want;
    }
    let fallback = match want {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    if dims[0].is_multiple_of(fallback.block_size() as u64) {
        fallback
    } else {
        GgmlType::F16
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
    let n_layer = crate::model::ModelConfig::from_gguf(input).map(|c| c.n_layer).unwrap_or(0);
    let tied = input.tensor("output.weight").is_none();
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
        let want = tensor_type(&info.name, &info.dims, ty, n_layer, tied);
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
                        (tied && info.name == "token_embd.weight").then(|| m.importance("output.weight")).flatten()
                    })
                    .filter(|v| v.len() as u64 == info.dims[0])
            });
            let weighted = imp.is_some() && matches!(want, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K);
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
        let m = [2048u64, 576];
        // 30 layers: the first and last 3, and every third layer between.
        let raised: Vec<usize> = (0..30).filter(|&l| more_bits(l, 30)).collect();
        assert_eq!(raised, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert_eq!(tensor_type("blk.5.attn_v.weight", &m, QuantType::Q4KM, 30, false), GgmlType::Q6_K);
        assert_eq!(tensor_type("blk.6.attn_v.weight", &m, QuantType::Q4KM, 30, false), GgmlType::Q4_K);
        assert_eq!(tensor_type("blk.0.ffn_down.weight", &m, QuantType::Q5KM, 30, false), GgmlType::Q6_K);
        assert_eq!(tensor_type("blk.0.attn_q.weight", &m, QuantType::Q5KM, 30, false), GgmlType::Q5_K);
        assert_eq!(tensor_type("output.weight", &m, QuantType::Q4_0, 30, false), GgmlType::Q6_K);
        assert_eq!(tensor_type("output.weight", &m, QuantType::Q8_0, 30, false), GgmlType::Q8_0);
        assert_eq!(tensor_type("token_embd.weight", &m, QuantType::Q4_0, 30, true), GgmlType::Q6_K);
        assert_eq!(tensor_type("token_embd.weight", &m, QuantType::Q4_0, 30, false), GgmlType::Q4_0);
        assert_eq!(tensor_type("blk.0.attn_norm.weight", &[576], QuantType::Q4KM, 30, false), GgmlType::F32);
        // Rows of 576 (SmolLM2's width) are not whole 256-element k-quant
        // blocks: the legacy type of about the same size instead.
        assert_eq!(tensor_type("blk.6.attn_q.weight", &[576, 576], QuantType::Q4KM, 30, false), GgmlType::Q5_0);
        assert_eq!(tensor_type("blk.6.attn_q.weight", &[576, 576], QuantType::Q5KM, 30, false), GgmlType::Q5_1);
        assert_eq!(tensor_type("blk.5.attn_v.weight", &[576, 192], QuantType::Q4KM, 30, false), GgmlType::Q8_0);
        assert_eq!(tensor_type("blk.0.ffn_up.weight", &[100, 64], QuantType::Q4KM, 30, false), GgmlType::F16);
        assert!(QuantType::parse("q4_k_m").is_ok());
        assert!(QuantType::parse("Q3_K_M").unwrap_err().contains("no quantizer"));
        assert!(QuantType::parse("Q7").unwrap_err().contains("Q4_K_M"));
    }
}

//! Writing the trained student as a GGUF that `minnow run`/`serve` load.
//!
//! All metadata of the base file is kept (tokenizer, chat template,
//! hyperparameters), and every tensor keeps its name, shape and position.
//! Tensors training did not change are copied byte for byte; changed ones
//! (LoRA merged in) are encoded as the requested type — vectors (norms,
//! biases) always as F32, and a matrix whose rows are not whole blocks of
//! the type falls back to F16. The file appears atomically
//! ([`GgufWriter::write_file`]).
//!
//! Below 8 bits ([`export_quantized`]) the merged model is written in F16
//! first, an importance matrix is collected by running it over the training
//! examples, and `minnow quantize`'s mix turns the whole model into the
//! output with it.

use super::model::{to_f32_vec, Student};
use anyhow::{bail, Context, Result};
use minnow_gguf::{GgmlType, GgufFile, GgufWriter};
use minnow_kernels::quantize::quantize_to_vec;
use std::path::Path;

/// The type a changed tensor of ggml `dims` is written as.
fn type_for(dims: &[u64], want: GgmlType) -> GgmlType {
    if dims.len() < 2 {
        return GgmlType::F32;
    }
    if !dims[0].is_multiple_of(want.block_size() as u64) {
        return GgmlType::F16;
    }
    want
}

/// Writes the LoRA adapters of `lora` (trained on `base`) to `out` as
/// llama.cpp's LoRA GGUF: `general.type = adapter`, `adapter.type = lora`,
/// `adapter.lora.alpha`, the base's architecture, and for each adapted
/// tensor `<name>.lora_a` (ggml dims [in, r]) and `<name>.lora_b` ([r,
/// out]) in F32. The adapters apply to the weights as the GGUF stores them
/// (llama-family Q/K rows already permuted), as llama.cpp's own adapters
/// do. Returns the file size.
pub fn export_adapter(base: &GgufFile, lora: &super::lora::LoraSet, out: &Path) -> Result<u64> {
    use minnow_gguf::Value;
    let arch = base
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .context("the base model has no general.architecture")?
        .to_string();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String(arch))?;
    w.add_metadata("general.type", Value::String("adapter".into()))?;
    w.add_metadata("adapter.type", Value::String("lora".into()))?;
    w.add_metadata("adapter.lora.alpha", Value::F32(lora.alpha as f32))?;
    if let Some(name) = base.get("general.name").and_then(|v| v.as_str()) {
        w.add_metadata("general.name", Value::String(format!("{name} LoRA adapter")))?;
    }
    for (name, a, b) in lora.pairs() {
        let (r, inp) = a.dims2()?;
        let (outd, _) = b.dims2()?;
        for (suffix, t, dims) in [("lora_a", a, [inp as u64, r as u64]), ("lora_b", b, [r as u64, outd as u64])] {
            let values = to_f32_vec(t)?;
            if values.iter().any(|v| !v.is_finite()) {
                bail!("adapter '{name}' has non-finite values after training: lower the learning rate");
            }
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.add_tensor(format!("{name}.{suffix}"), &dims, GgmlType::F32, bytes)?;
        }
    }
    w.write_file(out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(std::fs::metadata(out)?.len())
}

/// Writes the LoRA adapters of `lora` (trained on `base`, whose model
/// config is `cfg`) to the directory `dir` in Hugging Face PEFT's layout:
/// `adapter_config.json` and `adapter_model.safetensors` with Hugging Face
/// tensor names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`),
/// F32, and the llama-family q/k row permutation of GGUF undone in B, so
/// `peft.PeftModel.from_pretrained` applies it to the Hugging Face model.
pub fn export_peft(
    base: &GgufFile,
    cfg: &minnow_engine::model::ModelConfig,
    lora: &super::lora::LoraSet,
    dir: &Path,
) -> Result<()> {
    use minnow_engine::lora::{gguf_to_hf_rows, peft_module, peft_stem, permuted_heads, Proj};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors = std::collections::HashMap::new();
    let mut modules = std::collections::BTreeSet::new();
    for (name, a, b) in lora.pairs() {
        // "blk.N.attn_q.weight" → layer N, projection q.
        let parsed = name.strip_prefix("blk.").and_then(|r| r.strip_suffix(".weight")).and_then(|r| {
            let (l, stem) = r.split_once('.')?;
            Some((l.parse::<usize>().ok()?, Proj::ALL.into_iter().find(|p| p.stem() == stem)?))
        });
        let (layer, p) = parsed.with_context(|| format!("adapter on '{name}': not a projection PEFT knows"))?;
        let (outd, r) = b.dims2()?;
        let mut bv = to_f32_vec(b)?;
        if let Some(heads) = permuted_heads(cfg, p) {
            bv = gguf_to_hf_rows(&bv, heads, r);
        }
        let stem = format!("base_model.model.{}", peft_stem(layer, p));
        tensors.insert(format!("{stem}.lora_A.weight"), a.to_dtype(candle_core::DType::F32)?);
        tensors.insert(format!("{stem}.lora_B.weight"), candle_core::Tensor::from_vec(bv, (outd, r), a.device())?);
        modules.insert(peft_module(p));
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": modules.into_iter().collect::<Vec<_>>(),
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "base_model_name_or_path": base.get("general.name").and_then(|v| v.as_str()).unwrap_or(""),
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("cannot write {}", dir.display()))?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))
        .with_context(|| format!("cannot write {}", dir.display()))?;
    Ok(())
}

/// Writes `student` (based on `base`) to `out`; returns the file size.
pub fn export(base: &GgufFile, student: &Student, out: &Path, out_type: GgmlType) -> Result<u64> {
    let changed = student.changed_tensors();
    let mut w = GgufWriter::new();
    for (key, value) in base.metadata() {
        w.add_metadata(key.clone(), value.clone())?;
    }
    for info in base.tensors() {
        if !changed.contains(&info.name) {
            w.add_tensor(info.name.clone(), &info.dims, info.ty, base.tensor_data(info))?;
            continue;
        }
        let values = to_f32_vec(&student.merged(&info.name)?)?;
        if values.iter().any(|v| !v.is_finite()) {
            bail!("tensor '{}' has non-finite values after training: lower the learning rate", info.name);
        }
        let ty = type_for(&info.dims, out_type);
        let bytes = quantize_to_vec(ty, &values).map_err(|e| anyhow::anyhow!("tensor '{}': {e}", info.name))?;
        w.add_tensor(info.name.clone(), &info.dims, ty, bytes)?;
    }
    w.write_file(out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(std::fs::metadata(out)?.len())
}

/// Training tokens an output's importance matrix is collected on, at most
/// (llama-imatrix's usual run is about 100 chunks of 512).
pub const IMATRIX_TOKENS: usize = 64 * 1024;

/// Writes `student` as the whole model quantized to `mix`, weighted by an
/// importance matrix of the merged model's activations on `train` (token
/// ids of the training examples, read until [`IMATRIX_TOKENS`]); returns
/// the file size and the tokens read. `threads` compute it. The merged F16 model is written
/// beside `out` first (`OUT.f16.partial`) and removed after.
pub fn export_quantized<'a>(
    base: &GgufFile,
    student: &Student,
    out: &Path,
    mix: minnow_engine::quantize::QuantType,
    train: impl IntoIterator<Item = &'a [u32]>,
    threads: usize,
) -> Result<(u64, usize)> {
    use minnow_engine::imatrix::Imatrix;
    let mut name = out.file_name().context("the output path has no file name")?.to_os_string();
    name.push(".f16.partial");
    let partial = out.with_file_name(name);
    let result = (|| -> Result<(u64, usize)> {
        export(base, student, &partial, GgmlType::F16)?;
        let file = std::sync::Arc::new(GgufFile::open(&partial)?);
        let model = minnow_engine::model::Model::from_gguf(file.clone())
            .map_err(|e| anyhow::anyhow!("the merged student: {e}"))?;
        let pool = minnow_kernels::pool::ThreadPool::new(threads);
        let (im, tokens) = Imatrix::collect(&model, &pool, train, 512, Some(IMATRIX_TOKENS), "training data")?;
        drop(model);
        minnow_engine::quantize::quantize_file(&file, out, mix, Some(&im), threads, |_| {})?;
        Ok((std::fs::metadata(out)?.len(), tokens))
    })();
    let _ = std::fs::remove_file(&partial);
    result
}

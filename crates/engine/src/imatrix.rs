//! Importance matrices: per weight matrix, the sum over every token the
//! model read of each input column's squared activation — what a quantizer
//! weighs its errors by, so columns that carry large activations on the
//! user's own data are kept most precisely.
//!
//! The file is llama.cpp's GGUF imatrix (`general.type = imatrix`,
//! `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`; per
//! matrix `<name>.in_sum2` F32 [cols, 1] and `<name>.counts` F32 [1, 1]),
//! which `llama-imatrix` writes and `llama-quantize --imatrix` reads.
//!
//! Collection is off unless [`Collector::run`] is active on the thread that
//! calls `Model::forward`: the forward pass hands each matrix's input to
//! `record`, which does nothing otherwise (one thread-local check per
//! matrix).

use crate::lora::Proj;
use minnow_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

/// Sums of squared inputs per column, and the rows summed, per matrix name.
#[derive(Debug, Default, Clone)]
pub struct Imatrix {
    pub sums: BTreeMap<String, (Vec<f64>, u64)>,
    pub datasets: Vec<String>,
    pub chunks: u32,
    pub chunk_size: u32,
}

thread_local! {
    static ACTIVE: RefCell<Option<Imatrix>> = const { RefCell::new(None) };
}

/// The GGUF name of projection `p` of `layer`.
fn weight_name(layer: usize, p: Proj) -> String {
    format!("blk.{layer}.{}.weight", p.stem())
}

/// Whether this thread is collecting (inside [`Collector::run`]).
pub(crate) fn collecting() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// Adds the rows of `x` ([n, cols]) to the statistics of matrix `name`, if
/// this thread is collecting.
pub(crate) fn record_named(name: impl FnOnce() -> String, x: &[f32], n: usize) {
    record_for(|| vec![name()], x, n)
}

/// [`record_named`] for a layer's projections that all read `x` (q, k and
/// v; gate and up).
pub(crate) fn record(layer: usize, ps: &[Proj], x: &[f32], n: usize) {
    record_for(|| ps.iter().map(|&p| weight_name(layer, p)).collect(), x, n)
}

/// Adds the rows of `x` to the statistics of every matrix `names` gives
/// (named only when collecting): the squares are summed once for all.
fn record_for(names: impl FnOnce() -> Vec<String>, x: &[f32], n: usize) {
    ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let Some(m) = a.as_mut() else { return };
        if n == 0 {
            return;
        }
        let cols = x.len() / n;
        let mut sums = vec![0f64; cols];
        for row in x.chunks_exact(cols) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += (*v as f64) * (*v as f64);
            }
        }
        for name in names() {
            let e = m.sums.entry(name).or_insert_with(|| (vec![0.0; cols], 0));
            if e.0.len() == cols {
                e.0.iter_mut().zip(&sums).for_each(|(a, b)| *a += b);
                e.1 += n as u64;
            }
        }
    })
}

/// Runs `f` with collection on for this thread and returns what it saw.
pub struct Collector;

impl Collector {
    pub fn run<R>(f: impl FnOnce() -> R) -> (R, Imatrix) {
        ACTIVE.with(|a| *a.borrow_mut() = Some(Imatrix::default()));
        let r = f();
        let m = ACTIVE.with(|a| a.borrow_mut().take()).unwrap_or_default();
        (r, m)
    }
}

impl Imatrix {
    /// Runs `model` over each token sequence (a fresh cache per sequence,
    /// read in pieces of `chunk` tokens) with collection on, until
    /// `max_tokens` tokens have been read; returns the statistics (with
    /// `datasets` and the chunk counts set) and the tokens read.
    pub fn collect<'a>(
        model: &crate::model::Model,
        pool: &minnow_kernels::pool::ThreadPool,
        sequences: impl IntoIterator<Item = &'a [u32]>,
        chunk: usize,
        max_tokens: Option<usize>,
        dataset: &str,
    ) -> anyhow::Result<(Imatrix, usize)> {
        use crate::model::{Logits, SeqBatch};
        anyhow::ensure!(chunk > 0, "the chunk size must be at least 1");
        let mut total = Imatrix { datasets: vec![dataset.to_string()], chunk_size: chunk as u32, ..Default::default() };
        let mut tokens = 0usize;
        for ids in sequences {
            if ids.is_empty() {
                continue;
            }
            let mut cache = model.new_cache(ids.len());
            let (r, stats) = Collector::run(|| -> anyhow::Result<()> {
                for piece in ids.chunks(chunk) {
                    // No logits are needed: the head's input is recorded
                    // for every row anyway (`output_logits`).
                    let mut seqs = [SeqBatch { tokens: piece, cache: &mut cache, logits: Logits::None, adapter: None }];
                    model.forward(pool, &mut seqs)?;
                    total.chunks += 1;
                }
                Ok(())
            });
            r?;
            total.merge(stats);
            tokens += ids.len();
            if max_tokens.is_some_and(|max| tokens >= max) {
                break;
            }
        }
        Ok((total, tokens))
    }

    /// Folds `other` (more data) into this one.
    pub fn merge(&mut self, other: Imatrix) {
        for (name, (s, c)) in other.sums {
            let e = self.sums.entry(name).or_insert_with(|| (vec![0.0; s.len()], 0));
            if e.0.len() == s.len() {
                e.0.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
                e.1 += c;
            }
        }
    }

    /// Mean squared input per column of matrix `name` (what quantizers
    /// weigh by), `None` when it was not seen.
    pub fn importance(&self, name: &str) -> Option<Vec<f32>> {
        let (s, c) = self.sums.get(name)?;
        (*c > 0).then(|| s.iter().map(|v| (v / *c as f64) as f32).collect())
    }

    /// Writes llama.cpp's GGUF imatrix (atomically).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut w = GgufWriter::new();
        w.add_metadata("general.type", Value::String("imatrix".into()))?;
        w.add_metadata(
            "imatrix.datasets",
            Value::Array(minnow_gguf::ValueType::String, self.datasets.iter().cloned().map(Value::String).collect()),
        )?;
        w.add_metadata("imatrix.chunk_count", Value::U32(self.chunks))?;
        w.add_metadata("imatrix.chunk_size", Value::U32(self.chunk_size))?;
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (name, (s, c)) in &self.sums {
            let sums: Vec<f32> = s.iter().map(|&v| v as f32).collect();
            w.add_tensor(format!("{name}.in_sum2"), &[s.len() as u64, 1], GgmlType::F32, f32s(&sums))?;
            w.add_tensor(format!("{name}.counts"), &[1, 1], GgmlType::F32, f32s(&[*c as f32]))?;
        }
        w.write_file(path)?;
        Ok(())
    }

    /// Reads a GGUF imatrix (ours or `llama-imatrix`'s). Matrices with
    /// several experts (`counts` of more than one) are summed over them.
    pub fn read(path: &Path) -> anyhow::Result<Imatrix> {
        use anyhow::{bail, Context};
        let f = GgufFile::open(path).with_context(|| format!("imatrix {}", path.display()))?;
        let d = path.display();
        if f.get("general.type").and_then(|v| v.as_str()) != Some("imatrix") {
            bail!("{d} is not an importance matrix (general.type = imatrix)");
        }
        let read = |t: &minnow_gguf::TensorInfo| -> anyhow::Result<Vec<f32>> {
            if t.ty != GgmlType::F32 {
                bail!("{d}: {} is {}, not F32", t.name, t.ty);
            }
            Ok(f.tensor_data(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let mut m = Imatrix {
            datasets: f
                .get("imatrix.datasets")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
            chunks: f.get("imatrix.chunk_count").and_then(|v| v.as_u64()).unwrap_or(0) as u32,
            chunk_size: f.get("imatrix.chunk_size").and_then(|v| v.as_u64()).unwrap_or(0) as u32,
            ..Default::default()
        };
        for t in f.tensors() {
            let Some(name) = t.name.strip_suffix(".in_sum2") else { continue };
            let counts =
                f.tensor(&format!("{name}.counts")).with_context(|| format!("{d}: {name}.counts is missing"))?;
            let (sums, counts) = (read(t)?, read(counts)?);
            let cols = *t.dims.first().unwrap_or(&0) as usize;
            if cols == 0 || sums.len() != cols * counts.len().max(1) {
                bail!("{d}: {name}.in_sum2 has {} values for {} experts", sums.len(), counts.len());
            }
            let mut total = vec![0.0f64; cols];
            for chunk in sums.chunks_exact(cols) {
                total.iter_mut().zip(chunk).for_each(|(a, &b)| *a += b as f64);
            }
            let c: f64 = counts.iter().map(|&c| c as f64).sum();
            m.sums.insert(name.to_string(), (total, c as u64));
        }
        if m.sums.is_empty() {
            bail!("{d} holds no statistics (<name>.in_sum2 tensors)");
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_imatrix_reads_back() {
        let mut m = Imatrix { datasets: vec!["d.jsonl".into()], chunks: 3, chunk_size: 256, ..Default::default() };
        let (_, seen) = Collector::run(|| {
            record(2, &[Proj::Q, Proj::K], &[1.0, 2.0, 3.0, -1.0, 0.0, 1.0], 2);
            record_named(|| "output.weight".into(), &[0.5, 0.5], 1);
        });
        m.merge(seen);
        // Nothing is recorded outside `Collector::run`.
        record(2, &[Proj::Q], &[9.0, 9.0, 9.0], 1);
        let path = std::env::temp_dir().join(format!("minnow-imatrix-{}.gguf", std::process::id()));
        m.write(&path).unwrap();
        let back = Imatrix::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(back.importance("blk.2.attn_q.weight").unwrap(), vec![1.0, 2.0, 5.0]);
        assert_eq!(back.importance("blk.2.attn_k.weight").unwrap(), vec![1.0, 2.0, 5.0]);
        assert_eq!(back.importance("output.weight").unwrap(), vec![0.25, 0.25]);
        assert_eq!((back.datasets, back.chunks, back.chunk_size), (vec!["d.jsonl".to_string()], 3, 256));
    }
}

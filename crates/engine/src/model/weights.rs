//! Typed access to a model's tensors: quantized matrices left in the memory
//! map or, for the formats with an 8-row interleaved layout, repacked into it
//! once at load (the file's pages are then released); small vectors (norms,
//! biases) converted to f32 once at load. Every
//! tensor's type and shape is checked against the model config, so a file
//! whose tensors do not fit its metadata is refused at load with the tensor's
//! name, never misread.

use super::ModelError;
use minnow_gguf::{GgmlType, GgufFile, TensorInfo};
use minnow_kernels::formats::{dequantize, is_supported_weight};
use minnow_kernels::matmul::{InterleavedMatrix, Layout, QMatrix};
use std::sync::Arc;

/// A weight matrix of `rows × cols` (ggml dims `[cols, rows]`) in one of
/// the block formats: read in place from the file (row-major), or repacked
/// into the 8-row interleaved layout, whose kernels are 2-3× faster.
pub struct Matrix {
    file: Arc<GgufFile>,
    info: TensorInfo,
    /// The interleaved copy, when the format has that layout.
    interleaved: Option<InterleavedMatrix>,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    /// The matrix as the kernels see it.
    pub fn q(&self) -> QMatrix<'_> {
        match &self.interleaved {
            Some(m) => m.q(),
            None => QMatrix {
                ty: self.ty,
                rows: self.rows,
                cols: self.cols,
                data: self.file.tensor_data(&self.info),
                layout: Layout::RowMajor,
            },
        }
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
        self.q().row_f32(r, out).map_err(ModelError::from)
    }
}

/// The matrices of every expert of one MoE layer, stacked in one 3-D tensor
/// of ggml dims `[cols, rows, n_expert]`: expert `e`'s `rows × cols` matrix
/// is the `e`-th contiguous run of `rows` rows. Each expert is repacked into
/// the 8-row interleaved layout at load under the same rule as a layer's
/// dense matrices (so an expert runs on the same kernels as the dense FFN
/// it may have been upcycled from); other formats are read in place.
pub struct ExpertMatrices {
    file: Arc<GgufFile>,
    info: TensorInfo,
    /// Per expert, the interleaved copy; empty when the format keeps the
    /// file's layout.
    interleaved: Vec<InterleavedMatrix>,
    pub ty: GgmlType,
    pub n_expert: usize,
    pub rows: usize,
    pub cols: usize,
}

impl ExpertMatrices {
    /// Expert `e`'s matrix as the kernels see it.
    pub fn expert(&self, e: usize) -> QMatrix<'_> {
        assert!(e < self.n_expert, "expert {e} of {}", self.n_expert);
        if let Some(m) = self.interleaved.get(e) {
            return m.q();
        }
        self.in_file(e)
    }

    /// Expert `e`'s rows as the file holds them.
    fn in_file(&self, e: usize) -> QMatrix<'_> {
        let q = QMatrix { ty: self.ty, rows: self.rows, cols: self.cols, data: &[], layout: Layout::RowMajor };
        let size = self.rows * q.row_bytes();
        QMatrix { data: &self.file.tensor_data(&self.info)[e * size..(e + 1) * size], ..q }
    }
}

/// Which matrices are repacked into the 8-row interleaved layout.
///
/// The interleaved kernels sum each block exactly and then scale it, where
/// the row-major kernels scale eight partial sums per block: the same value
/// up to f32 rounding. Inside the network that rounding reaches the next
/// 8-bit activation quantization and can flip a quant, and Gemma 3 is
/// sensitive to that: moving its inner Q8_0 matrices (`attn_v` in half its
/// layers) to the exact-sum order moved its golden log-likelihood gap to
/// llama.cpp from 0.018 to 0.022 (limit 0.02). A bit-
/// exact interleaved Q8_0 (eight lane accumulators) measured slower than the
/// row-major kernel. So inner Q8_0 matrices keep the file's layout; the
/// output head, whose products are the logits and feed nothing else, and the
/// 4- and 5-bit formats (which the golden tests accept) are interleaved.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Interleave {
    Layer,
    Head,
}

impl Interleave {
    fn applies_to(self, ty: GgmlType) -> bool {
        match ty {
            // Q4_K's and Q6_K's interleaved kernels are bit-identical to
            // their row-major ones.
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q4_K | GgmlType::Q6_K => true,
            GgmlType::Q8_0 => self == Interleave::Head,
            _ => false,
        }
    }
}

/// Reads tensors by name from a GGUF file, checking shapes.
pub struct TensorLoader {
    pub file: Arc<GgufFile>,
}

impl TensorLoader {
    fn info(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.file.tensor(name).ok_or_else(|| ModelError::new(format!("tensor '{name}' is missing from the model file")))
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    /// A `rows × cols` matrix inside the network (its products are
    /// normalized and re-quantized downstream).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        self.matrix_as(name, rows, cols, Interleave::Layer)
    }

    /// The output head (`rows` = vocabulary), also the embedding table when
    /// the two are tied: its products are the logits, nothing downstream.
    pub fn output_head(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        self.matrix_as(name, rows, cols, Interleave::Head)
    }

    fn matrix_as(&self, name: &str, rows: usize, cols: usize, interleave: Interleave) -> Result<Matrix, ModelError> {
        let info = self.info(name)?;
        let want = [cols as u64, rows as u64];
        if info.dims != want {
            return Err(ModelError::new(format!(
                "tensor '{name}' has shape {:?}, expected {:?} (ggml order) from the model's metadata",
                info.dims, want
            )));
        }
        if !is_supported_weight(info.ty) {
            return Err(ModelError::new(format!(
                "tensor '{name}' has type {} which minnow cannot compute with",
                info.ty
            )));
        }
        let mut m = Matrix { file: self.file.clone(), info: info.clone(), interleaved: None, ty: info.ty, rows, cols };
        if !interleave.applies_to(info.ty) {
            return Ok(m);
        }
        // The file's pages are released as each stretch is copied.
        let file = &self.file;
        m.interleaved = m
            .q()
            .interleave_with(|done| file.release_pages(done))
            .map_err(|e| ModelError::new(format!("tensor '{name}': {e}")))?;
        Ok(m)
    }

    /// `n_expert` matrices of `rows × cols` stacked in one 3-D tensor.
    pub fn experts(&self, name: &str, n_expert: usize, rows: usize, cols: usize) -> Result<ExpertMatrices, ModelError> {
        let info = self.info(name)?;
        let want = [cols as u64, rows as u64, n_expert as u64];
        if info.dims != want {
            return Err(ModelError::new(format!(
                "expert tensor '{name}' has shape {:?}, expected {:?} (ggml order: {cols} wide, {rows} rows, \
                 {n_expert} experts) from the model's metadata",
                info.dims, want
            )));
        }
        if !is_supported_weight(info.ty) {
            return Err(ModelError::new(format!(
                "tensor '{name}' has type {} which minnow cannot compute with",
                info.ty
            )));
        }
        // The reader checked the innermost dimension is whole blocks, so each
        // expert's slice starts on a block boundary; this is the remaining
        // arithmetic the slicing relies on.
        let per_expert = rows * (cols / info.ty.block_size()) * info.ty.type_size();
        if per_expert * n_expert != self.file.tensor_data(info).len() {
            return Err(ModelError::new(format!("expert tensor '{name}': data size does not match its shape")));
        }
        let mut m = ExpertMatrices {
            file: self.file.clone(),
            info: info.clone(),
            interleaved: Vec::new(),
            ty: info.ty,
            n_expert,
            rows,
            cols,
        };
        if Interleave::Layer.applies_to(info.ty) {
            let file = &self.file;
            let mut packed = Vec::with_capacity(n_expert);
            for e in 0..n_expert {
                // The file's pages are released as each stretch is copied.
                match m.in_file(e).interleave_with(|done| file.release_pages(done)) {
                    Ok(Some(p)) => packed.push(p),
                    Ok(None) => break,
                    Err(err) => return Err(ModelError::new(format!("expert tensor '{name}', expert {e}: {err}"))),
                }
            }
            // All or none: a shape without the layout keeps every expert in place.
            if packed.len() == n_expert {
                m.interleaved = packed;
            }
        }
        Ok(m)
    }

    /// A vector of `len` values, converted to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.info(name)?;
        if info.dims != [len as u64] {
            return Err(ModelError::new(format!(
                "tensor '{name}' has shape {:?}, expected [{len}] from the model's metadata",
                info.dims
            )));
        }
        let mut out = vec![0f32; len];
        dequantize(info.ty, self.file.tensor_data(info), &mut out)
            .map_err(|e| ModelError::new(format!("tensor '{name}': {e}")))?;
        Ok(out)
    }
}

/// The embedding table and the output head: one shared matrix when the file
/// ties them (no `output.weight`), loaded as a head either way.
pub fn embedding_and_head(
    t: &TensorLoader,
    vocab: usize,
    n_embd: usize,
) -> Result<(Arc<Matrix>, Arc<Matrix>), ModelError> {
    if t.has("output.weight") {
        let embd = t.matrix("token_embd.weight", vocab, n_embd)?;
        Ok((Arc::new(embd), Arc::new(t.output_head("output.weight", vocab, n_embd)?)))
    } else {
        let tied = Arc::new(t.output_head("token_embd.weight", vocab, n_embd)?);
        Ok((tied.clone(), tied))
    }
}

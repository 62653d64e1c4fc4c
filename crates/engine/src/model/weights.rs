//! Typed access to a model's tensors: quantized matrices left in the memory
//! map, small vectors (norms, biases) converted to f32 once at load. Every
//! tensor's type and shape is checked against the model config, so a file
//! whose tensors do not fit its metadata is refused at load with the tensor's
//! name, never misread.

use super::ModelError;
use minnow_gguf::{GgmlType, GgufFile, TensorInfo};
use minnow_kernels::formats::{dequantize, is_supported_weight};
use minnow_kernels::matmul::QMatrix;
use std::sync::Arc;

/// A weight matrix of `rows × cols` (ggml dims `[cols, rows]`), row-major,
/// in one of the block formats, read in place from the file.
pub struct Matrix {
    file: Arc<GgufFile>,
    info: TensorInfo,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    /// The matrix as the kernels see it.
    pub fn q(&self) -> QMatrix<'_> {
        QMatrix { ty: self.ty, rows: self.rows, cols: self.cols, data: self.file.tensor_data(&self.info) }
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
        let q = self.q();
        let rb = q.row_bytes();
        dequantize(self.ty, &q.data[r * rb..(r + 1) * rb], out).map_err(|e| ModelError::new(e.to_string()))
    }
}

/// The matrices of every expert of one MoE layer, stacked in one 3-D tensor
/// of ggml dims `[cols, rows, n_expert]`: expert `e`'s `rows × cols` matrix
/// is the `e`-th contiguous run of `rows` rows, so it is read in place like
/// any other matrix.
pub struct ExpertMatrices {
    file: Arc<GgufFile>,
    info: TensorInfo,
    pub ty: GgmlType,
    pub n_expert: usize,
    pub rows: usize,
    pub cols: usize,
}

impl ExpertMatrices {
    /// Expert `e`'s matrix as the kernels see it.
    pub fn expert(&self, e: usize) -> QMatrix<'_> {
        assert!(e < self.n_expert, "expert {e} of {}", self.n_expert);
        let q = QMatrix { ty: self.ty, rows: self.rows, cols: self.cols, data: &[] };
        let size = self.rows * q.row_bytes();
        QMatrix { data: &self.file.tensor_data(&self.info)[e * size..(e + 1) * size], ..q }
    }
}

/// Reads tensors by name from a GGUF file, checking shapes.
pub struct TensorLoader {
    pub file: Arc<GgufFile>,
}

impl TensorLoader {
    fn info(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.file
            .tensor(name)
            .ok_or_else(|| ModelError::new(format!("tensor '{name}' is missing from the model file")))
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    /// A `rows × cols` matrix.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        let info = self.info(name)?;
        let want = [cols as u64, rows as u64];
        if info.dims != want {
            return Err(ModelError::new(format!(
                "tensor '{name}' has shape {:?}, expected {:?} (ggml order) from the model's metadata",
                info.dims, want
            )));
        }
        if !is_supported_weight(info.ty) {
            return Err(ModelError::new(format!("tensor '{name}' has type {} which minnow cannot compute with", info.ty)));
        }
        Ok(Matrix { file: self.file.clone(), info: info.clone(), ty: info.ty, rows, cols })
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
            return Err(ModelError::new(format!("tensor '{name}' has type {} which minnow cannot compute with", info.ty)));
        }
        // The reader checked the innermost dimension is whole blocks, so each
        // expert's slice starts on a block boundary; this is the remaining
        // arithmetic the slicing relies on.
        let per_expert = rows * (cols / info.ty.block_size()) * info.ty.type_size();
        if per_expert * n_expert != self.file.tensor_data(info).len() {
            return Err(ModelError::new(format!("expert tensor '{name}': data size does not match its shape")));
        }
        Ok(ExpertMatrices { file: self.file.clone(), info: info.clone(), ty: info.ty, n_expert, rows, cols })
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

//! minnow's compute kernels. Knows nothing of models.
//!
//! - [`formats`]: one `#[repr(C)]` type per block format, each with a scalar
//!   reference dequantization and dot product, and an AVX2+FMA dot product
//!   chosen at run time; a uniform byte-level dispatch over [`GgmlType`].
//! - [`matmul`]: quantized weight matrix × f32 activations, multithreaded.
//! - [`attention`]: one head's attention over a span of the KV cache.
//! - [`attention_batch`]: a batch's attention on the thread pool, split in
//!   even tasks (rows × KV heads × span parts) and merged exactly.
//! - [`ops`]: the f32 element-wise pieces of a transformer (RMSNorm, RoPE,
//!   softmax, activations).
//! - [`mix`]: the one SplitMix64 generator and FNV-1a hash every crate uses.
//! - [`pool`]: a persistent thread pool, because per-op thread spawning costs
//!   more than a decode step's small matvecs.
//! - [`quantize`]: f32 → any supported format (requantizing, upcycling).
//! - [`weight_memory`]: repacked weights on transparent huge pages.

pub mod attention;
pub mod attention_batch;
pub mod formats;
pub mod lowrank;
pub mod matmul;
pub mod mix;
pub mod ops;
pub mod pool;
pub mod quantize;
pub mod weight_memory;

pub use minnow_gguf::GgmlType;

//! Quantized weight matrix × f32 activations.
//!
//! `out[t, r] = Σ_c W[r, c] · x[t, c]` for a weight matrix `W` of `rows × cols`
//! stored row-major in one of the block formats, and `n` activation rows.
//! The activations are first quantized to the format's dot block type (as
//! llama.cpp does), then threads take tiles of weight rows and compute every
//! token's dot product against each row of the tile while it is in cache, so
//! the weights are read from memory once per call whatever `n` is.
//!
//! Tokens go in groups of four through the format's `vec_dot_multi`, which
//! decodes each weight block once for the four of them (the remainder goes
//! two at a time, then through `vec_dot`). Every output element is, bit for
//! bit, the format's `vec_dot` over the whole row (`vec_dot_multi` is held to
//! that, see `tests/multi_dot.rs`): the result for a token does not depend on
//! how many other tokens are in the batch, nor on the thread count (batch
//! invariance).

use crate::formats::{cast_blocks, group_scales, ActBlock, BlockFormat, GroupScales, LayoutError};
use crate::pool::{SharedMut, ThreadPool};
use crate::GgmlType;

/// A weight matrix in a block format: `rows` rows of `cols` elements each,
/// row-major, in `data`.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl QMatrix<'_> {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// Checks that `data` holds exactly `rows` whole rows of whole blocks.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.cols % self.ty.block_size() != 0 {
            return Err(LayoutError(format!(
                "row length {} is not a multiple of the {} block size {}",
                self.cols,
                self.ty,
                self.ty.block_size()
            )));
        }
        if self.data.len() != self.rows * self.row_bytes() {
            return Err(LayoutError(format!(
                "{} matrix {}×{} needs {} bytes, has {}",
                self.ty,
                self.rows,
                self.cols,
                self.rows * self.row_bytes(),
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// Reusable scratch space for quantized activations, 8-byte aligned so any
/// activation block type can be cast from it.
#[derive(Default)]
pub struct ActBuffer {
    words: Vec<u64>,
    /// The token groups' f32 scales, `[group][block]` (see `GroupScales`).
    scales: Vec<GroupScales>,
    /// Scratch for one group's scales.
    group: Vec<GroupScales>,
}

/// `n_blocks` activation blocks over `words`, grown as needed.
fn blocks_mut<A: ActBlock>(words: &mut Vec<u64>, n_blocks: usize) -> &mut [A] {
    let bytes = n_blocks * std::mem::size_of::<A>();
    let n_words = bytes.div_ceil(8);
    if words.len() < n_words {
        words.resize(n_words, 0);
    }
    let raw: &mut [u8] = bytemuck::cast_slice_mut(&mut words[..n_words]);
    bytemuck::cast_slice_mut(&mut raw[..bytes])
}

/// Rows per task handed to a thread: enough to amortize the scheduling,
/// small enough to balance across threads.
const ROW_TILE: usize = 16;

/// Tokens handed together to `BlockFormat::vec_dot_multi`, which decodes
/// each weight block once for all of them. Its results are bit-identical to
/// `vec_dot`'s, so the grouping never shows in the output.
const TOKEN_GROUP: usize = 4;

/// `out[t*rows + r] = dot(W[r], x[t*cols ..])` for `t < n`.
///
/// `x` has shape [n, cols], `out` shape [n, rows].
pub fn matmul(
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut ActBuffer,
) -> Result<(), LayoutError> {
    w.validate()?;
    if x.len() != n * w.cols || out.len() != n * w.rows {
        return Err(LayoutError(format!(
            "matmul shapes: W {}×{}, x has {} (want {}), out has {} (want {})",
            w.rows,
            w.cols,
            x.len(),
            n * w.cols,
            out.len(),
            n * w.rows
        )));
    }
    crate::dispatch_format!(
        w.ty,
        matmul_typed(pool, w, x, n, out, scratch),
        Err(LayoutError(format!("{} weights are not supported by matmul", w.ty)))
    )
}

fn matmul_typed<B: BlockFormat>(
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut ActBuffer,
) -> Result<(), LayoutError> {
    let weights: &[B] = cast_blocks(w.data)?;
    let w_blocks_per_row = w.cols / B::BLOCK;
    let a_blocks_per_row = w.cols / <B::Dot as ActBlock>::BLOCK;
    let ActBuffer { words, scales, group } = scratch;
    let acts: &mut [B::Dot] = blocks_mut(words, n * a_blocks_per_row);
    quantize_rows(pool, x, w.cols, acts, a_blocks_per_row);
    let acts: &[B::Dot] = acts;
    let act_row = |t: usize| &acts[t * a_blocks_per_row..(t + 1) * a_blocks_per_row];

    // Tokens in groups of TOKEN_GROUP and one group of the 1-3 left over
    // (one pass over the weights for them: a speculative verification of
    // 3 tokens unpacks each weight block once, not twice), and each group's
    // scales in f32 for the multi-row kernels.
    let full = n / TOKEN_GROUP;
    let tail = n - full * TOKEN_GROUP;
    let group_at = |g: usize| if g < full { (g * TOKEN_GROUP, TOKEN_GROUP) } else { (full * TOKEN_GROUP, tail) };
    let n_groups = full + (tail > 0) as usize;
    scales.clear();
    if n > 1 {
        for g in 0..n_groups {
            let (t, step) = group_at(g);
            if step == 1 {
                // A lone token left over goes through `vec_dot`, which takes
                // no group scales; it is the last group, so skipping it
                // leaves every other group's scales where `group_scales_of`
                // looks.
                continue;
            }
            let rows: [&[B::Dot]; TOKEN_GROUP] = std::array::from_fn(|k| act_row(t + k.min(step - 1)));
            group_scales(&rows[..step], group);
            scales.extend_from_slice(group);
        }
    }
    let scales: &[GroupScales] = scales;
    let group_scales_of = |g: usize| &scales[g * a_blocks_per_row..(g + 1) * a_blocks_per_row];

    let rows = w.rows;
    let out_ptr = SharedMut(out.as_mut_ptr());
    pool.parallel_for(rows, ROW_TILE, &|tile| {
        let out_ptr = out_ptr;
        let w_row = |r: usize| &weights[r * w_blocks_per_row..(r + 1) * w_blocks_per_row];
        // Within a group the tile's weight rows, which stay in cache, each
        // meet the group's activations.
        for g in 0..n_groups {
            let (t, step) = group_at(g);
            for r in tile.clone() {
                let mut v = [0.0f32; TOKEN_GROUP];
                // (A lone token has no group scales: one token's matmul
                // builds none.)
                let w = w_row(r);
                match step {
                    TOKEN_GROUP => dot_group::<B, TOKEN_GROUP>(w, &act_row, t, group_scales_of(g), &mut v),
                    3 => dot_group::<B, 3>(w, &act_row, t, group_scales_of(g), &mut v),
                    2 => dot_group::<B, 2>(w, &act_row, t, group_scales_of(g), &mut v),
                    _ => v[0] = B::vec_dot(w, act_row(t)),
                }
                for (k, &v) in v[..step].iter().enumerate() {
                    // SAFETY: each (t + k, r) is written by exactly one tile's
                    // thread, and (t + k)*rows + r < n*rows == out.len().
                    unsafe { *out_ptr.0.add((t + k) * rows + r) = v };
                }
            }
        }
    });
    Ok(())
}

/// `vec_dot_multi` of weight row `w` with the `N` activation rows from token
/// `t`, into `v[..N]`.
#[inline(always)]
fn dot_group<'a, B: BlockFormat, const N: usize>(
    w: &[B],
    act_row: &impl Fn(usize) -> &'a [B::Dot],
    t: usize,
    scales: &[GroupScales],
    v: &mut [f32; TOKEN_GROUP],
) where
    B::Dot: 'a,
{
    let a: [&[B::Dot]; N] = std::array::from_fn(|k| act_row(t + k));
    let mut out = [0.0f32; N];
    B::vec_dot_multi(w, a, scales, &mut out);
    v[..N].copy_from_slice(&out);
}

/// Quantizes each of the `n` rows of `x` into its activation blocks, in
/// parallel over rows when there are several.
fn quantize_rows<A: ActBlock>(pool: &ThreadPool, x: &[f32], cols: usize, acts: &mut [A], per_row: usize) {
    let n = x.len() / cols.max(1);
    if n <= 1 {
        A::quantize(x, acts);
        return;
    }
    let ptr = SharedMut(acts.as_mut_ptr());
    pool.parallel_for(n, 4, &|range| {
        let ptr = ptr;
        for t in range {
            // SAFETY: row t's blocks are disjoint from every other row's.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(t * per_row), per_row) };
            A::quantize(&x[t * cols..(t + 1) * cols], dst);
        }
    });
}

/// The plain reference: dequantize each row to f32 and take f32 dot
/// products. Slow; for tests.
pub fn matmul_reference(w: &QMatrix, x: &[f32], n: usize) -> Result<Vec<f32>, LayoutError> {
    w.validate()?;
    let mut row = vec![0f32; w.cols];
    let mut out = vec![0f32; n * w.rows];
    let rb = w.row_bytes();
    for r in 0..w.rows {
        crate::formats::dequantize(w.ty, &w.data[r * rb..(r + 1) * rb], &mut row)?;
        for t in 0..n {
            let xt = &x[t * w.cols..(t + 1) * w.cols];
            out[t * w.rows + r] = row.iter().zip(xt).map(|(a, b)| a * b).sum();
        }
    }
    Ok(out)
}

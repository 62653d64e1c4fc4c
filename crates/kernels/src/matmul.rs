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
//!
//! Each product is prepared (shapes checked, activations quantized) and then
//! run as tiles of 16 output rows on the thread pool; `matmul_many` runs the
//! tiles of several products of the same activations (a layer's q, k and v)
//! as one job.

use crate::formats::interleaved::{self, ActMeta, Interleaved};
use crate::formats::{cast_blocks, group_scales, ActBlock, BlockFormat, GroupScales, LayoutError};
use crate::pool::{SharedMut, ThreadPool};
use crate::weight_memory::WeightWords;
use crate::GgmlType;
use std::ops::Range;

/// How a matrix's blocks are arranged in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Row after row, as in the GGUF file.
    #[default]
    RowMajor,
    /// Groups of 8 rows interleaved block column by block column
    /// (`formats::interleaved`), for the formats that have such a layout;
    /// rows a multiple of 8. Same size as row-major.
    Interleaved8,
}

/// A weight matrix in a block format: `rows` rows of `cols` elements each,
/// in `data`, arranged as `layout` says.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    pub layout: Layout,
}

impl QMatrix<'_> {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// Checks that `data` holds exactly `rows` whole rows of whole blocks.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if !self.cols.is_multiple_of(self.ty.block_size()) {
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
        if self.layout == Layout::Interleaved8
            && (!self.rows.is_multiple_of(interleaved::ROWS) || !interleaved::has_layout(self.ty))
        {
            return Err(LayoutError(format!(
                "a {} matrix of {} rows has no 8-row interleaved layout",
                self.ty, self.rows
            )));
        }
        Ok(())
    }

    /// Appends row `r` to `out` in the file's (row-major) block format,
    /// whatever this matrix's layout.
    pub fn copy_row(&self, r: usize, out: &mut Vec<u8>) -> Result<(), LayoutError> {
        self.check_row(r)?;
        let rb = self.row_bytes();
        match self.layout {
            Layout::RowMajor => out.extend_from_slice(&self.data[r * rb..(r + 1) * rb]),
            Layout::Interleaved8 => crate::dispatch_interleaved!(
                self.ty,
                copy_packed_row(self.data, self.cols, r, out),
                unreachable!("validate checked the format has an interleaved layout")
            )?,
        }
        Ok(())
    }

    /// A valid matrix, and `r` one of its rows.
    fn check_row(&self, r: usize) -> Result<(), LayoutError> {
        self.validate()?;
        if r >= self.rows {
            return Err(LayoutError(format!("row {r} of a {}-row matrix", self.rows)));
        }
        Ok(())
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<(), LayoutError> {
        match self.layout {
            Layout::RowMajor => {
                self.check_row(r)?;
                let rb = self.row_bytes();
                crate::formats::dequantize(self.ty, &self.data[r * rb..(r + 1) * rb], out)
            }
            Layout::Interleaved8 => {
                let mut row = Vec::with_capacity(self.row_bytes());
                self.copy_row(r, &mut row)?;
                crate::formats::dequantize(self.ty, &row, out)
            }
        }
    }

    /// The same matrix repacked into the 8-row interleaved layout: `None`
    /// when this format or row count has none, or it is interleaved already.
    pub fn interleave(&self) -> Result<Option<InterleavedMatrix>, LayoutError> {
        self.interleave_with(|_| {})
    }

    /// [`QMatrix::interleave`], calling `done` with each stretch of this
    /// matrix's bytes once it has been copied (whole row groups, about 4 MiB
    /// at a time, in order), so a loader can release the source as it goes
    /// and never hold both copies of a large matrix.
    pub fn interleave_with(&self, mut done: impl FnMut(&[u8])) -> Result<Option<InterleavedMatrix>, LayoutError> {
        self.validate()?;
        if self.layout != Layout::RowMajor
            || !self.rows.is_multiple_of(interleaved::ROWS)
            || !interleaved::has_layout(self.ty)
        {
            return Ok(None);
        }
        let mut words = WeightWords::zeroed(self.data.len().div_ceil(8));
        let dst = &mut bytemuck::cast_slice_mut::<u64, u8>(words.as_mut_slice())[..self.data.len()];
        let group_bytes = interleaved::ROWS * self.row_bytes();
        let stretch = ((4 << 20) / group_bytes).max(1) * group_bytes;
        for (src, dst) in self.data.chunks(stretch).zip(dst.chunks_mut(stretch)) {
            crate::dispatch_interleaved!(self.ty, pack_bytes(src, self.cols, dst), unreachable!("checked above"))?;
            done(src);
        }
        Ok(Some(InterleavedMatrix { ty: self.ty, rows: self.rows, cols: self.cols, len: self.data.len(), words }))
    }
}

/// A matrix repacked into the 8-row interleaved layout, owning its bytes
/// (`u64` words, so every block type is aligned; on huge pages where the OS
/// has them, see `weight_memory`).
pub struct InterleavedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    len: usize,
    words: WeightWords,
}

impl InterleavedMatrix {
    /// The matrix as the kernels see it.
    pub fn q(&self) -> QMatrix<'_> {
        let data = &bytemuck::cast_slice::<u64, u8>(self.words.as_slice())[..self.len];
        QMatrix { ty: self.ty, rows: self.rows, cols: self.cols, data, layout: Layout::Interleaved8 }
    }
}

fn pack_bytes<P: Interleaved>(src: &[u8], cols: usize, dst: &mut [u8]) -> Result<(), LayoutError> {
    let rows: &[P::Row] = cast_blocks(src)?;
    let out: &mut [P] = bytemuck::try_cast_slice_mut(dst).map_err(|e| LayoutError(format!("interleave: {e:?}")))?;
    interleaved::pack_matrix(rows, cols / P::Row::BLOCK, out);
    Ok(())
}

fn copy_packed_row<P: Interleaved>(data: &[u8], cols: usize, r: usize, out: &mut Vec<u8>) -> Result<(), LayoutError> {
    let packed: &[P] = cast_blocks(data)?;
    let mut row = vec![<P::Row as bytemuck::Zeroable>::zeroed(); cols / P::Row::BLOCK];
    interleaved::unpack_row(packed, cols / P::Row::BLOCK, r, &mut row);
    out.extend_from_slice(bytemuck::cast_slice(&row));
    Ok(())
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
    /// The interleaved kernels' per-block activation scales and sums,
    /// `[token][block]`.
    meta: Vec<ActMeta>,
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

/// The first `n_blocks` activation blocks of `words` (filled by `blocks_mut`).
fn blocks<A: ActBlock>(words: &[u64], n_blocks: usize) -> &[A] {
    let bytes = n_blocks * std::mem::size_of::<A>();
    let raw: &[u8] = bytemuck::cast_slice(&words[..bytes.div_ceil(8)]);
    bytemuck::cast_slice(&raw[..bytes])
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
    let job = prepare(pool, w, x, n, out, scratch)?;
    pool.parallel_for(job.tiles, 1, &*job.run);
    Ok(())
}

/// Several products of the same activations, `outs[i] = x · ws[i]ᵀ`, in one
/// job of the pool: e.g. a layer's q, k and v projections, or its FFN's gate
/// and up. [`matmul_each`] with one input for all.
///
/// `scratch` needs one buffer per matrix (each matrix's activations are
/// quantized to its own format's dot type).
pub fn matmul_many(
    pool: &ThreadPool,
    x: &[f32],
    n: usize,
    ws: &[&QMatrix],
    outs: &mut [&mut [f32]],
    scratch: &mut [ActBuffer],
) -> Result<(), LayoutError> {
    if ws.len() != outs.len() {
        return Err(LayoutError(format!("matmul_many: {} matrices, {} outputs", ws.len(), outs.len())));
    }
    let mut products: Vec<Product> = ws.iter().zip(outs.iter_mut()).map(|(w, out)| Product { w, x, n, out }).collect();
    matmul_each(pool, &mut products, scratch)
}

/// One product of [`matmul_each`]: `out = x · wᵀ`, `x` [n, w.cols], `out`
/// [n, w.rows].
pub struct Product<'w, 'a> {
    pub w: &'w QMatrix<'a>,
    pub x: &'w [f32],
    pub n: usize,
    pub out: &'w mut [f32],
}

/// Several products, each with its own activations, in one job of the
/// pool: e.g. the chosen experts of a mixture-of-experts layer, each on
/// the rows routed to it.
///
/// Each output element is the one [`matmul`] gives, bit for bit. What
/// changes is the scheduling: the products' row tiles form one index space
/// that the threads split into contiguous runs, so a thread done with its
/// part of one product goes straight on to the next instead of waiting for
/// the others at the end of each. In decode, where each product is a few
/// hundred microseconds or less, those waits and the fresh start of every
/// thread's memory stream were a measurable share of the time.
///
/// Activations are quantized once per input and weight format and layout:
/// products over the same input slice whose matrices share both (a layer's
/// q, k and v, or one expert's gate and up) read the same buffer.
/// `scratch` needs one buffer per product.
pub fn matmul_each(pool: &ThreadPool, products: &mut [Product], scratch: &mut [ActBuffer]) -> Result<(), LayoutError> {
    if scratch.len() < products.len() {
        return Err(LayoutError(format!(
            "matmul_each: {} products, {} scratch buffers",
            products.len(),
            scratch.len()
        )));
    }
    let same_input = |a: &Product, b: &Product| {
        a.x.as_ptr() == b.x.as_ptr() && a.x.len() == b.x.len() && a.w.ty == b.w.ty && a.w.layout == b.w.layout
    };
    let mut source = Vec::with_capacity(products.len());
    for i in 0..products.len() {
        let p = &products[i];
        check_shapes(p.w, p.x, p.n, p.out)?;
        match (0..i).find(|&j| same_input(&products[j], p)) {
            Some(j) => source.push(source[j]),
            None => {
                quantize_for(pool, p.w, p.x, p.n, &mut scratch[i])?;
                source.push(i);
            }
        }
    }
    let scratch: &[ActBuffer] = scratch;
    let mut jobs = Vec::with_capacity(products.len());
    for (p, &s) in products.iter_mut().zip(&source) {
        jobs.push(job_for(p.w, p.n, &mut *p.out, &scratch[s])?);
    }
    // first[i]: the first tile of job i in the joint index space.
    let mut first = Vec::with_capacity(jobs.len() + 1);
    first.push(0);
    for job in &jobs {
        first.push(first.last().unwrap() + job.tiles);
    }
    let total = *first.last().unwrap();
    pool.parallel_for(total, 1, &|tiles| {
        let mut i = first.partition_point(|&f| f <= tiles.start) - 1;
        let mut at = tiles.start;
        while at < tiles.end {
            while first[i + 1] <= at {
                i += 1;
            }
            let end = tiles.end.min(first[i + 1]);
            (jobs[i].run)(at - first[i]..end - first[i]);
            at = end;
        }
    });
    Ok(())
}

/// A product ready to run: activations quantized, output rows cut into
/// `tiles` tiles of `ROW_TILE` rows that threads may run in any order, each
/// writing only its own rows of the output.
struct Prepared<'a> {
    tiles: usize,
    run: Box<dyn Fn(Range<usize>) + Sync + 'a>,
}

/// Checks shapes, quantizes the activations into `scratch` and returns the
/// product's tiles.
fn prepare<'a>(
    pool: &ThreadPool,
    w: &QMatrix<'a>,
    x: &'a [f32],
    n: usize,
    out: &'a mut [f32],
    scratch: &'a mut ActBuffer,
) -> Result<Prepared<'a>, LayoutError> {
    check_shapes(w, x, n, out)?;
    quantize_for(pool, w, x, n, scratch)?;
    job_for(w, n, out, scratch)
}

/// That `w` is whole and `x` [n, w.cols] and `out` [n, w.rows] fit it.
fn check_shapes(w: &QMatrix, x: &[f32], n: usize, out: &[f32]) -> Result<(), LayoutError> {
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
    Ok(())
}

/// Quantizes the `n` rows of `x` into `scratch` as `w`'s kernels take them
/// (the activation blocks of its format, and what the kernels precompute
/// of them). `w` and the shapes were checked (`check_shapes`).
fn quantize_for(
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    scratch: &mut ActBuffer,
) -> Result<(), LayoutError> {
    match w.layout {
        Layout::RowMajor => {
            crate::dispatch_format!(w.ty, quantize_typed(pool, w.cols, x, n, scratch), return Err(unsupported(w.ty)))
        }
        Layout::Interleaved8 => crate::dispatch_interleaved!(
            w.ty,
            quantize_interleaved(pool, w.cols, x, n, scratch),
            unreachable!("validate checked the format has an interleaved layout")
        ),
    }
    Ok(())
}

fn unsupported(ty: GgmlType) -> LayoutError {
    LayoutError(format!("{ty} weights are not supported by matmul"))
}

/// The product's tiles over activations `acts` that `quantize_for` filled
/// for a matrix of `w`'s format and layout.
fn job_for<'a>(
    w: &QMatrix<'a>,
    n: usize,
    out: &'a mut [f32],
    acts: &'a ActBuffer,
) -> Result<Prepared<'a>, LayoutError> {
    match w.layout {
        Layout::RowMajor => crate::dispatch_format!(w.ty, job_typed(*w, n, out, acts), Err(unsupported(w.ty))),
        Layout::Interleaved8 => crate::dispatch_interleaved!(
            w.ty,
            job_interleaved(*w, n, out, acts),
            unreachable!("validate checked the format has an interleaved layout")
        ),
    }
}

/// `quantize_for` a matrix in the 8-row interleaved layout of `P`: the
/// activation blocks and their `ActMeta`.
fn quantize_interleaved<P: Interleaved>(pool: &ThreadPool, cols: usize, x: &[f32], n: usize, scratch: &mut ActBuffer) {
    let per_row = cols / P::Row::BLOCK;
    let ActBuffer { words, meta, .. } = scratch;
    let acts: &mut [Dot<P>] = blocks_mut(words, n * per_row);
    quantize_rows(pool, x, cols, acts, per_row);
    meta.clear();
    meta.extend(acts.iter().map(P::meta));
}

/// An interleaved format's activation block type.
type Dot<P> = <<P as Interleaved>::Row as BlockFormat>::Dot;

/// A matrix in the 8-row interleaved layout: a tile is `ROW_TILE / 8` row
/// groups; each group meets the tokens four at a time
/// (`Interleaved::dot`, whose per-token results do not depend on how many
/// tokens share the call).
fn job_interleaved<'a, P: Interleaved>(
    w: QMatrix<'a>,
    n: usize,
    out: &'a mut [f32],
    scratch: &'a ActBuffer,
) -> Result<Prepared<'a>, LayoutError> {
    let groups: &'a [P] = cast_blocks(w.data)?;
    let per_row = w.cols / P::Row::BLOCK;
    let acts: &'a [Dot<P>] = blocks(&scratch.words, n * per_row);
    let meta: &'a [ActMeta] = &scratch.meta[..n * per_row];

    let rows = w.rows;
    let n_groups = rows / interleaved::ROWS;
    const GROUPS_PER_TILE: usize = ROW_TILE / interleaved::ROWS;
    let out_ptr = SharedMut::new(out.as_mut_ptr());
    let run = move |tiles: Range<usize>| {
        let act_row = |t: usize| &acts[t * per_row..(t + 1) * per_row];
        let meta_row = |t: usize| &meta[t * per_row..(t + 1) * per_row];
        let tile_groups = tiles.start * GROUPS_PER_TILE..(tiles.end * GROUPS_PER_TILE).min(n_groups);
        let mut t = 0;
        while t < n {
            let step = (n - t).min(TOKEN_GROUP);
            for g in tile_groups.clone() {
                let wg = &groups[g * per_row..(g + 1) * per_row];
                let mut v = [[0.0f32; interleaved::ROWS]; TOKEN_GROUP];
                match step {
                    4 => dot_interleaved::<P, 4>(wg, &act_row, &meta_row, t, &mut v),
                    3 => dot_interleaved::<P, 3>(wg, &act_row, &meta_row, t, &mut v),
                    2 => dot_interleaved::<P, 2>(wg, &act_row, &meta_row, t, &mut v),
                    _ => dot_interleaved::<P, 1>(wg, &act_row, &meta_row, t, &mut v),
                }
                for (k, v) in v[..step].iter().enumerate() {
                    // SAFETY: rows 8g..8g+8 of token t + k are written only
                    // by the thread running this tile, and lie inside out
                    // ((t + k) < n, 8g + 8 <= rows).
                    unsafe {
                        let dst = out_ptr.get().add((t + k) * rows + g * interleaved::ROWS);
                        std::ptr::copy_nonoverlapping(v.as_ptr(), dst, interleaved::ROWS);
                    }
                }
            }
            t += step;
        }
    };
    Ok(Prepared { tiles: n_groups.div_ceil(GROUPS_PER_TILE), run: Box::new(run) })
}

/// `Interleaved::dot` of row group `w` with the `N` tokens from `t`.
#[inline(always)]
fn dot_interleaved<'a, P: Interleaved, const N: usize>(
    w: &[P],
    act_row: &impl Fn(usize) -> &'a [<P::Row as BlockFormat>::Dot],
    meta_row: &impl Fn(usize) -> &'a [ActMeta],
    t: usize,
    v: &mut [[f32; interleaved::ROWS]; TOKEN_GROUP],
) where
    <P::Row as BlockFormat>::Dot: 'a,
{
    let mut out = [[0.0f32; interleaved::ROWS]; N];
    P::dot(w, std::array::from_fn(|k| act_row(t + k)), std::array::from_fn(|k| meta_row(t + k)), &mut out);
    v[..N].copy_from_slice(&out);
}

/// `quantize_for` a row-major matrix of `B`: the activation blocks, and each
/// token group's f32 scales.
fn quantize_typed<B: BlockFormat>(pool: &ThreadPool, cols: usize, x: &[f32], n: usize, scratch: &mut ActBuffer) {
    let a_blocks_per_row = cols / <B::Dot as ActBlock>::BLOCK;
    let ActBuffer { words, scales, group, .. } = scratch;
    let acts: &mut [B::Dot] = blocks_mut(words, n * a_blocks_per_row);
    quantize_rows(pool, x, cols, acts, a_blocks_per_row);
    let acts: &[B::Dot] = acts;
    let act_row = |t: usize| &acts[t * a_blocks_per_row..(t + 1) * a_blocks_per_row];
    // Each token group's scales in f32 for the multi-row kernels (groups as
    // `token_groups` cuts them).
    let (n_groups, group_at) = token_groups(n);
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
}

/// Tokens in groups of TOKEN_GROUP and one group of the 1-3 left over (one
/// pass over the weights for them: a speculative verification of 3 tokens
/// unpacks each weight block once, not twice): the number of groups, and
/// group g's first token and size.
fn token_groups(n: usize) -> (usize, impl Fn(usize) -> (usize, usize) + Copy) {
    let full = n / TOKEN_GROUP;
    let tail = n - full * TOKEN_GROUP;
    let group_at = move |g: usize| if g < full { (g * TOKEN_GROUP, TOKEN_GROUP) } else { (full * TOKEN_GROUP, tail) };
    (full + (tail > 0) as usize, group_at)
}

/// A row-major matrix: a tile is `ROW_TILE` rows; tokens meet them in groups
/// of `TOKEN_GROUP` through `vec_dot_multi`.
fn job_typed<'a, B: BlockFormat>(
    w: QMatrix<'a>,
    n: usize,
    out: &'a mut [f32],
    scratch: &'a ActBuffer,
) -> Result<Prepared<'a>, LayoutError> {
    let weights: &'a [B] = cast_blocks(w.data)?;
    let w_blocks_per_row = w.cols / B::BLOCK;
    let a_blocks_per_row = w.cols / <B::Dot as ActBlock>::BLOCK;
    let acts: &'a [B::Dot] = blocks(&scratch.words, n * a_blocks_per_row);
    let act_row = move |t: usize| &acts[t * a_blocks_per_row..(t + 1) * a_blocks_per_row];
    let (n_groups, group_at) = token_groups(n);
    let scales: &'a [GroupScales] = &scratch.scales;
    let group_scales_of = move |g: usize| &scales[g * a_blocks_per_row..(g + 1) * a_blocks_per_row];

    let rows = w.rows;
    let out_ptr = SharedMut::new(out.as_mut_ptr());
    let run = move |tiles: Range<usize>| {
        let tile = tiles.start * ROW_TILE..(tiles.end * ROW_TILE).min(rows);
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
                    // SAFETY: each (t + k, r) is written only by the thread
                    // running this tile, and (t + k)*rows + r < n*rows ==
                    // out.len().
                    unsafe { *out_ptr.get().add((t + k) * rows + r) = v };
                }
            }
        }
    };
    Ok(Prepared { tiles: rows.div_ceil(ROW_TILE), run: Box::new(run) })
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
    let ptr = SharedMut::new(acts.as_mut_ptr());
    pool.parallel_for(n, 4, &|range| {
        for t in range {
            // SAFETY: row t's blocks are disjoint from every other row's.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(t * per_row), per_row) };
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
    for r in 0..w.rows {
        w.row_f32(r, &mut row)?;
        for t in 0..n {
            let xt = &x[t * w.cols..(t + 1) * w.cols];
            out[t * w.rows + r] = row.iter().zip(xt).map(|(a, b)| a * b).sum();
        }
    }
    Ok(out)
}

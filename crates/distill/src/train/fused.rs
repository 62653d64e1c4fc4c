//! Fused CPU ops of the training forward pass, each with its backward: one
//! pass over the rows where candle's composite ops take four to seven, each
//! allocating (and page-faulting) a tensor the size of the activation, and
//! autograd keeps every one of them until the step ends.
//!
//! - [`rms_norm`]: `y = x · w / sqrt(mean(x²) + eps)` per row; backward
//!   `dx = r·(dy⊙w − x̂·mean(dy⊙w⊙x̂))`, `dw = Σ_rows dy⊙x̂` (x̂ = x·r).
//! - [`silu_mul`]: `y = silu(g) ⊙ u` (the gated FFN); backward
//!   `dg = dy⊙u⊙σ(g)⊙(1 + g⊙(1−σ(g)))`, `du = dy⊙silu(g)`.
//! - [`log_softmax_last`]: per row; backward `dx = dy − softmax(x)·Σdy`.
//! - [`softmax_backward`]: `dx = p⊙(dy − Σ dy⊙p)` per row, for the fused
//!   attention softmax in `model.rs`.
//! - [`frozen_matmul`]: `x·Wᵀ` for a W that does not train; backward
//!   `dx = g·W` only (no weight gradient).
//! - [`lora_linear`]: `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, a frozen projection with its
//!   adapter; backward `dx = g·W + s·(g·B)·A`, `dA = s·(g·B)ᵀ·x`,
//!   `dB = s·gᵀ·(x·Aᵀ)`.
//!
//! Off the CPU, or in another dtype, each falls back to the composite form
//! ([`rms_norm_composite`] and so on), which is also the reference the tests
//! (crates/distill/tests/train_ops.rs) hold the fused ops to.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};

/// Rows of `width` of `out` (and the matching rows of the inputs), split
/// over candle's threads: `f(first_row, out_rows)`.
fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
    let threads = candle_core::utils::get_num_threads().max(1).min(rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    if threads <= 1 {
        f(0, out);
        return;
    }
    rayon::scope(|sc| {
        for (c, chunk) in out.chunks_mut(per * width).enumerate() {
            let f = &f;
            sc.spawn(move |_| f(c * per, chunk));
        }
    });
}

/// A new `[rows, width]` buffer from two inputs of that shape, row by row
/// over candle's threads: `f(a_row, b_row, out_row)`.
fn map_rows2(a: &[f32], b: &[f32], width: usize, f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    par_rows(&mut out, width, |row0, out| {
        for (i, o) in out.chunks_exact_mut(width).enumerate() {
            let at = (row0 + i) * width;
            f(&a[at..at + width], &b[at..at + width], o);
        }
    });
    out
}

/// Calls `f` with the tensors' values as contiguous f32 host slices: their
/// own storage, read in place (a copy only of one that is not contiguous).
fn with_host<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> candle_core::Result<R> {
    let owned: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => slices.push(&v[a..b]),
            _ => candle_core::bail!("fused op backward: f32 CPU tensors only"),
        }
    }
    Ok(f(&slices))
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only");
    };
    Ok(&data[a..b])
}

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// RMSNorm of every row of x `[N, width]` with weight w `[width]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(&[x, w]) {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })?);
    }
    rms_norm_composite(x, w, eps)
}

/// [`rms_norm`] from candle's differentiable primitives.
pub fn rms_norm_composite(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

struct RmsNorm {
    eps: f32,
}

/// 1 / sqrt(mean(x²) + eps) of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "minnow-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous(xs, xl, self.name())?, contiguous(ws, wl, self.name())?);
        let width = w.len();
        if *xl.dims().last().unwrap_or(&0) != width {
            candle_core::bail!("rms_norm: rows of {:?} against a weight of {width}", xl.dims());
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, width, |row0, out| {
            for (i, o) in out.chunks_exact_mut(width).enumerate() {
                let xr = &x[(row0 + i) * width..(row0 + i + 1) * width];
                let r = inv_rms(xr, self.eps);
                for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                    *o = xv * r * wv;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_host(&[x, w, grad], |s| self.grads(s[0], s[1], s[2]))?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

impl RmsNorm {
    /// (dx, dw) for input rows `xv`, weight `wv`, output gradient `gv`.
    fn grads(&self, xv: &[f32], wv: &[f32], gv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let width = wv.len();
        let rows = xv.len() / width.max(1);
        let mut dx = vec![0f32; xv.len()];
        // Each thread's share of dw, summed after.
        let threads = candle_core::utils::get_num_threads().max(1).min(rows.max(1));
        let per = rows.div_ceil(threads).max(1);
        let mut partial = vec![vec![0f32; width]; rows.div_ceil(per).max(1)];
        rayon::scope(|sc| {
            for ((c, dxc), dw) in dx.chunks_mut(per * width).enumerate().zip(partial.iter_mut()) {
                sc.spawn(move |_| {
                    for (i, dxr) in dxc.chunks_exact_mut(width).enumerate() {
                        let at = (c * per + i) * width;
                        let (xr, gr) = (&xv[at..at + width], &gv[at..at + width]);
                        let r = inv_rms(xr, self.eps);
                        // mean over the row of (dy⊙w)⊙x̂
                        let mut dot = 0f32;
                        for j in 0..width {
                            dot += gr[j] * wv[j] * xr[j] * r;
                            dw[j] += gr[j] * xr[j] * r;
                        }
                        let mean = dot / width as f32;
                        for j in 0..width {
                            dxr[j] = r * (gr[j] * wv[j] - xr[j] * r * mean);
                        }
                    }
                });
            }
        });
        let mut dw = vec![0f32; width];
        for p in &partial {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        (dx, dw)
    }
}

/// `silu(g) ⊙ u`, both [N, width].
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[g, u]) && g.dims() == u.dims() {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)?);
    }
    silu_mul_composite(g, u)
}

/// [`silu_mul`] from candle's differentiable primitives.
pub fn silu_mul_composite(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok((g.silu()? * u)?)
}

struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "minnow-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous(gs, gl, self.name())?, contiguous(us, ul, self.name())?);
        let width = *gl.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, width, |row0, out| {
            let at = row0 * width;
            for (j, o) in out.iter_mut().enumerate() {
                let gv = g[at + j];
                *o = gv * sigmoid(gv) * u[at + j];
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let width = *g.dims().last().unwrap_or(&1);
        let (dg, du) = with_host(&[g, u, grad], |s| silu_mul_grads(s[0], s[1], s[2], width))?;
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}

/// (dg, du) of `silu(g) ⊙ u` for output gradient `dy`.
fn silu_mul_grads(gv: &[f32], uv: &[f32], dy: &[f32], width: usize) -> (Vec<f32>, Vec<f32>) {
    {
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        par_rows(&mut dg, width, |row0, out| {
            let at = row0 * width;
            for (j, o) in out.iter_mut().enumerate() {
                let (x, s) = (gv[at + j], sigmoid(gv[at + j]));
                *o = dy[at + j] * uv[at + j] * s * (1.0 + x * (1.0 - s));
            }
        });
        par_rows(&mut du, width, |row0, out| {
            let at = row0 * width;
            for (j, o) in out.iter_mut().enumerate() {
                let x = gv[at + j];
                *o = dy[at + j] * x * sigmoid(x);
            }
        });
        (dg, du)
    }
}

/// A matrix operand of [`gemm_into`]: its values and the distance between
/// consecutive rows and consecutive columns, so a transpose is a view.
#[derive(Clone, Copy)]
struct Operand<'a> {
    v: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major `[rows, cols]` matrix.
    fn rows(v: &'a [f32], cols: usize) -> Operand<'a> {
        Operand { v, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of a row-major `[rows, cols]` matrix (a `[cols, rows]` view).
    fn transposed(v: &'a [f32], cols: usize) -> Operand<'a> {
        Operand { v, row_stride: 1, col_stride: cols }
    }

    /// Whether a `[rows, cols]` view stays inside the values.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.v.len()
    }
}

/// `dst = beta·a·b`, or `dst += beta·a·b` when `accumulate`: dst `[m, n]`
/// row-major, a `[m, k]`, b `[k, n]`, on candle's own f32 gemm kernel and
/// threads, straight into `dst` (a candle matmul would allocate its result,
/// and a custom op would then copy it).
fn gemm_into(dst: &mut [f32], (m, n, k): (usize, usize, usize), a: Operand, b: Operand, beta: f32, accumulate: bool) {
    assert!(dst.len() == m * n && a.fits(m, k) && b.fits(k, n), "gemm_into: operands do not fit {m}×{k}·{k}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: every index the kernel touches, (i, j) of dst and (i, l), (l, j)
    // of a and b for i < m, j < n, l < k, is inside its slice (asserted
    // above), and dst does not alias a or b (it is a unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.v.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.v.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// `x · Wᵀ` for a weight `w` [out, in] that does not train, x [N, in]: on
/// the CPU through `FrozenMatmul` (no weight gradient), elsewhere candle's
/// matmul.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x, w]) && x.rank() == 2 {
        return Ok(x.contiguous()?.apply_op1(FrozenMatmul { w: w.contiguous()? })?);
    }
    Ok(x.matmul(&w.t()?)?)
}

/// `x · Wᵀ` for a weight that does not train: x [N, in] (contiguous), w
/// [out, in] → [N, out]. Backward gives only `dx = g · W`; candle's own
/// matmul would also compute `dW = gᵀ · x`, as large as the weight.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "minnow-frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, self.name())?;
        let (n, inp) = layout.shape().dims2()?;
        let (out, w_in) = self.w.dims2()?;
        if w_in != inp {
            candle_core::bail!("{}: x [{n}, {inp}] against W [{out}, {w_in}]", self.name());
        }
        let y = with_host(&[&self.w], |s| {
            let mut y = vec![0f32; n * out];
            gemm_into(&mut y, (n, out, inp), Operand::rows(x, inp), Operand::transposed(s[0], inp), 1.0, false);
            y
        })?;
        Ok((CpuStorage::F32(y), (n, out).into()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// A frozen projection with a LoRA adapter: `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` for
/// x [N, in], W [out, in] (does not train), A [r, in], B [out, r] → [N, out].
/// On the CPU one op whose backward is
/// `dx = g·W + scale·(g·B)·A`, `dA = scale·(g·B)ᵀ·x`, `dB = scale·gᵀ·(x·Aᵀ)`:
/// autograd keeps only x, A and B for it, where the composite form keeps
/// three more `[N, out]` tensors per projection until the step ends (on
/// Qwen2.5 0.5B, 3.6 GB a step of 1,000 tokens) and runs two more passes
/// over each.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32(&[x, w, a, b]) && x.rank() == 2 {
        let op = LoraLinear { w: w.contiguous()?, scale: scale as f32 };
        return Ok(x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?);
    }
    lora_linear_composite(x, w, a, b, scale)
}

/// [`lora_linear`] from candle's differentiable primitives (W as a
/// [`frozen_matmul`]).
pub fn lora_linear_composite(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let low = x.matmul(&a.t()?)?; // [N, r]
    let up = low.matmul(&b.t()?)?; // [N, out]
    Ok((frozen_matmul(x, w)? + (up * scale)?)?)
}

struct LoraLinear {
    w: Tensor,
    scale: f32,
}

impl LoraLinear {
    /// (N, in, out, r), checked against W's shape.
    fn dims(&self, x: &Shape, a: &Shape, b: &Shape) -> candle_core::Result<(usize, usize, usize, usize)> {
        let ((n, inp), (r, a_in), (out, b_r)) = (x.dims2()?, a.dims2()?, b.dims2()?);
        if self.w.dims() != [out, inp] || a_in != inp || b_r != r {
            candle_core::bail!(
                "minnow-lora-linear: x [{n}, {inp}], W {:?}, A [{r}, {a_in}], B [{out}, {b_r}] do not fit",
                self.w.dims()
            );
        }
        Ok((n, inp, out, r))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "minnow-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, inp, out, r) = self.dims(xl.shape(), al.shape(), bl.shape())?;
        let (x, a, b) =
            (contiguous(xs, xl, self.name())?, contiguous(as_, al, self.name())?, contiguous(bs, bl, self.name())?);
        let y = with_host(&[&self.w], |s| {
            let mut y = vec![0f32; n * out];
            gemm_into(&mut y, (n, out, inp), Operand::rows(x, inp), Operand::transposed(s[0], inp), 1.0, false);
            let mut low = vec![0f32; n * r];
            gemm_into(&mut low, (n, r, inp), Operand::rows(x, inp), Operand::transposed(a, inp), 1.0, false);
            gemm_into(&mut y, (n, out, r), Operand::rows(&low, r), Operand::transposed(b, r), self.scale, true);
            y
        })?;
        Ok((CpuStorage::F32(y), (n, out).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, inp, out, r) = self.dims(x.shape(), a.shape(), b.shape())?;
        let s = self.scale;
        let (dx, da, db) = with_host(&[x, a, b, grad, &self.w], |v| {
            let (x, a, b, g, w) = (v[0], v[1], v[2], v[3], v[4]);
            // g·B [N, r] and x·Aᵀ [N, r]: the small products the rest share.
            let mut gb = vec![0f32; n * r];
            gemm_into(&mut gb, (n, r, out), Operand::rows(g, out), Operand::rows(b, r), 1.0, false);
            let mut low = vec![0f32; n * r];
            gemm_into(&mut low, (n, r, inp), Operand::rows(x, inp), Operand::transposed(a, inp), 1.0, false);
            let mut dx = vec![0f32; n * inp];
            gemm_into(&mut dx, (n, inp, out), Operand::rows(g, out), Operand::rows(w, inp), 1.0, false);
            gemm_into(&mut dx, (n, inp, r), Operand::rows(&gb, r), Operand::rows(a, inp), s, true);
            let mut da = vec![0f32; r * inp];
            gemm_into(&mut da, (r, inp, n), Operand::transposed(&gb, r), Operand::rows(x, inp), s, false);
            let mut db = vec![0f32; out * r];
            gemm_into(&mut db, (out, r, n), Operand::transposed(g, out), Operand::rows(&low, r), s, false);
            (dx, da, db)
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, inp), dev)?),
            Some(Tensor::from_vec(da, (r, inp), dev)?),
            Some(Tensor::from_vec(db, (out, r), dev)?),
        ))
    }
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x]) {
        return Ok(x.contiguous()?.apply_op1(LogSoftmax)?);
    }
    log_softmax_composite(x)
}

/// [`log_softmax_last`] from candle's differentiable primitives (the max is
/// a constant shift, detached so autograd does not trace it).
pub fn log_softmax_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

struct LogSoftmax;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "minnow-log-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, self.name())?;
        let width = *layout.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, width, |row0, out| {
            for (i, o) in out.chunks_exact_mut(width).enumerate() {
                let xr = &x[(row0 + i) * width..(row0 + i + 1) * width];
                let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = xr.iter().map(|v| (v - max).exp()).sum();
                let lse = max + sum.ln();
                o.iter_mut().zip(xr).for_each(|(o, v)| *o = v - lse);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let width = *res.dims().last().unwrap_or(&1);
        let dx = with_host(&[res, grad], |s| {
            map_rows2(s[0], s[1], width, |lr, gr, o| {
                let total: f32 = gr.iter().sum();
                for j in 0..width {
                    o[j] = gr[j] - lr[j].exp() * total;
                }
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// The gradient of a row softmax: `dx = p ⊙ (dy − Σ dy⊙p)` per row of the
/// last dimension, one pass.
pub fn softmax_backward(p: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    if !(p.device().is_cpu() && p.dtype() == DType::F32 && dy.dtype() == DType::F32) {
        let dot = (dy * p)?.sum_keepdim(D::Minus1)?;
        return dy.broadcast_sub(&dot)?.mul(p);
    }
    let width = *p.dims().last().unwrap_or(&1);
    let dx = with_host(&[p, dy], |s| {
        map_rows2(s[0], s[1], width, |pr, gr, o| {
            let dot: f32 = pr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for j in 0..width {
                o[j] = pr[j] * (gr[j] - dot);
            }
        })
    })?;
    Tensor::from_vec(dx, p.shape(), p.device())
}

/// RoPE on x `[B, heads, T, hd]` with cos and sin `[B, 1, T, n_rot/2]` (each
/// token's own angles): the first `n_rot` dims of every head rotate in
/// pairs — `(i, i + n_rot/2)` when `neox`, else adjacent `(2i, 2i+1)` —
/// the rest pass through. One pass forward, one back (the transposed
/// rotation); cos and sin are constants. `None` where the fused op does
/// not apply (off the CPU, not f32): the caller builds it from primitives.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, n_rot: usize, neox: bool) -> Result<Option<Tensor>> {
    if !cpu_f32(&[x, cos, sin]) {
        return Ok(None);
    }
    let (b, _, t, hd) = x.dims4()?;
    let half = n_rot / 2;
    if cos.dims() != [b, 1, t, half] || sin.dims() != cos.dims() || n_rot > hd || !n_rot.is_multiple_of(2) {
        anyhow::bail!("rope: x {:?}, cos {:?}, sin {:?}, n_rot {n_rot}", x.dims(), cos.dims(), sin.dims());
    }
    let op =
        Rope { cos: cos.flatten_all()?.to_vec1()?, sin: sin.flatten_all()?.to_vec1()?, t, half, neox, inverse: false };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

#[derive(Clone)]
struct Rope {
    /// [B, T, half], flattened.
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
    half: usize,
    neox: bool,
    /// Rotate by minus the angle (the backward).
    inverse: bool,
}

impl Rope {
    /// Rotates `x` [B, H, T, hd] (flattened) into `out`.
    fn run(&self, x: &[f32], dims: &[usize], out: &mut [f32]) {
        let (h, t, hd) = (dims[1], dims[2], dims[3]);
        let sign = if self.inverse { -1.0 } else { 1.0 };
        par_rows(out, hd, |row0, out| {
            for (i, o) in out.chunks_exact_mut(hd).enumerate() {
                let row = row0 + i; // (b, head, pos) flattened
                let (b, pos) = (row / (h * t), row % t);
                let at = (b * self.t + pos) * self.half;
                let (c, s) = (&self.cos[at..at + self.half], &self.sin[at..at + self.half]);
                let xr = &x[row * hd..(row + 1) * hd];
                o.copy_from_slice(xr);
                for k in 0..self.half {
                    let (i0, i1) = if self.neox { (k, k + self.half) } else { (2 * k, 2 * k + 1) };
                    let (x0, x1, sk) = (xr[i0], xr[i1], sign * s[k]);
                    o[i0] = x0 * c[k] - x1 * sk;
                    o[i1] = x0 * sk + x1 * c[k];
                }
            }
        });
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "minnow-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, self.name())?;
        if layout.dims().len() != 4 {
            candle_core::bail!("rope: [B, H, T, hd] only, got {:?}", layout.dims());
        }
        let mut out = vec![0f32; x.len()];
        self.run(x, layout.dims(), &mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Rope { inverse: !self.inverse, ..self.clone() };
        let dims = res.dims().to_vec();
        let dx = with_host(&[grad], |s| {
            let mut dx = vec![0f32; s[0].len()];
            back.run(s[0], &dims, &mut dx);
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

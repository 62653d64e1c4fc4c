//! The low-rank update of a LoRA adapter, for one row or a group of rows of
//! the same adapter: `out += scale · Bᵀ·(A·x)` with A [r, cols] and Bᵀ
//! [r, rows] stored as
//! f16 bits (B kept transposed so the second product is `r` contiguous
//! axpys rather than `rows` short dot products). Half precision because a
//! batch that mixes adapters reads every adapter's pairs each step: at
//! rank 16 on SmolLM2-135M that is 10 MB an adapter in f16, 20 MB in f32,
//! and the step is bound by memory.
//!
//! A scalar reference ([`lowrank_add_ref`]) and an AVX2+FMA+F16C kernel,
//! picked at run time through [`crate::formats::simd_level`]
//! (`MINNOW_SIMD=scalar` forces the reference); a test holds them together.
//!
//! [`lowrank_add_group`] does up to [`GROUP`] rows of one adapter in one
//! pass over A and Bᵀ (each pair is read once per group instead of once per
//! row: a batch of 16 rows over 4 adapters reads 4 adapters' worth, not 16),
//! with every row's arithmetic in the order the one-row kernel uses, so a
//! row's result is the same bits alone or grouped (batch invariance).

use crate::formats::{simd_level, SimdLevel};
use half::f16;

/// `out += scale · Bᵀ·(A·x)` for one row: `a` [r, x.len()] and `bt`
/// [r, out.len()] as f16 bits; `t` is scratch (resized to `r`).
pub fn lowrank_add(a: &[u16], bt: &[u16], r: usize, scale: f32, x: &[f32], out: &mut [f32], t: &mut Vec<f32>) {
    check(a, bt, r, x, out);
    #[cfg(target_arch = "x86_64")]
    if simd_level() >= SimdLevel::Avx2 {
        // SAFETY: the CPU has AVX2, FMA and F16C (`simd_level` checked), and
        // `check` holds the slices to their shapes.
        unsafe { avx2::lowrank_add(a, bt, r, scale, x, out, t) };
        return;
    }
    lowrank_add_ref(a, bt, r, scale, x, out, t)
}

/// Rows [`lowrank_add_group`] takes at once.
pub const GROUP: usize = 4;

/// [`lowrank_add`] for up to [`GROUP`] rows of the same adapter:
/// `outs[j] += scale · Bᵀ·(A·xs[j])`, each `outs[j]` bit-identical to
/// what [`lowrank_add`] gives it alone.
pub fn lowrank_add_group(a: &[u16], bt: &[u16], r: usize, scale: f32, xs: &[&[f32]], outs: &mut [&mut [f32]]) {
    assert!(xs.len() == outs.len() && xs.len() <= GROUP, "lowrank_add_group: 1..={GROUP} rows, one output each");
    for (x, o) in xs.iter().zip(outs.iter()) {
        check(a, bt, r, x, o);
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() >= SimdLevel::Avx2 {
        // SAFETY: as in `lowrank_add`; every row's shapes were checked.
        unsafe {
            match xs.len() {
                4 => avx2::lowrank_add_group::<4>(a, bt, r, scale, xs, outs),
                3 => avx2::lowrank_add_group::<3>(a, bt, r, scale, xs, outs),
                2 => avx2::lowrank_add_group::<2>(a, bt, r, scale, xs, outs),
                1 => avx2::lowrank_add_group::<1>(a, bt, r, scale, xs, outs),
                _ => {}
            }
        }
        return;
    }
    let mut t = Vec::new();
    for (x, o) in xs.iter().zip(outs.iter_mut()) {
        lowrank_add_ref(a, bt, r, scale, x, o, &mut t);
    }
}

fn check(a: &[u16], bt: &[u16], r: usize, x: &[f32], out: &[f32]) {
    assert!(a.len() == r * x.len() && bt.len() == r * out.len(), "lowrank_add: shapes do not fit");
}

/// The scalar reference of [`lowrank_add`].
pub fn lowrank_add_ref(a: &[u16], bt: &[u16], r: usize, scale: f32, x: &[f32], out: &mut [f32], t: &mut Vec<f32>) {
    check(a, bt, r, x, out);
    let h = |v: u16| f16::from_bits(v).to_f32();
    t.clear();
    t.extend(a.chunks_exact(x.len()).map(|ak| scale * ak.iter().zip(x).map(|(&w, v)| h(w) * v).sum::<f32>()));
    for (tk, bk) in t.iter().zip(bt.chunks_exact(out.len())) {
        for (o, &b) in out.iter_mut().zip(bk) {
            *o += tk * h(b);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Eight f16 at `p` as f32.
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn lowrank_add(
        a: &[u16],
        bt: &[u16],
        r: usize,
        scale: f32,
        x: &[f32],
        out: &mut [f32],
        t: &mut Vec<f32>,
    ) {
        let (cols, rows) = (x.len(), out.len());
        let (c8, r8) = (cols / 8 * 8, rows / 8 * 8);
        t.clear();
        for k in 0..r {
            let ak = a.as_ptr().add(k * cols);
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= c8 {
                s0 = _mm256_fmadd_ps(load8(ak.add(i)), _mm256_loadu_ps(x.as_ptr().add(i)), s0);
                s1 = _mm256_fmadd_ps(load8(ak.add(i + 8)), _mm256_loadu_ps(x.as_ptr().add(i + 8)), s1);
                i += 16;
            }
            if i < c8 {
                s0 = _mm256_fmadd_ps(load8(ak.add(i)), _mm256_loadu_ps(x.as_ptr().add(i)), s0);
            }
            let s = _mm256_add_ps(s0, s1);
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), s);
            let mut sum: f32 = lanes.iter().sum();
            for c in c8..cols {
                sum += f16::from_bits(a[k * cols + c]).to_f32() * x[c];
            }
            t.push(scale * sum);
        }
        for (k, &tk) in t.iter().enumerate() {
            let bk = bt.as_ptr().add(k * rows);
            let tv = _mm256_set1_ps(tk);
            let mut o = 0;
            while o < r8 {
                let p = out.as_mut_ptr().add(o);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(tv, load8(bk.add(o)), _mm256_loadu_ps(p)));
                o += 8;
            }
            for o in r8..rows {
                out[o] += tk * f16::from_bits(bt[k * rows + o]).to_f32();
            }
        }
    }

    /// [`lowrank_add`] for `G` rows: each A row and Bᵀ row is loaded once
    /// for all `G`, and each row's sums run in the one-row kernel's order
    /// (two 8-lane accumulators over 16 columns at a time, then the tail),
    /// so its bits are the same.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn lowrank_add_group<const G: usize>(
        a: &[u16],
        bt: &[u16],
        r: usize,
        scale: f32,
        xs: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) {
        let (cols, rows) = (xs[0].len(), outs[0].len());
        let (c8, r8) = (cols / 8 * 8, rows / 8 * 8);
        let mut t = [[0f32; G]; 64];
        let mut t_big: Vec<[f32; G]> = Vec::new();
        let t: &mut [[f32; G]] = if r <= 64 {
            &mut t[..r]
        } else {
            t_big.resize(r, [0.0; G]);
            &mut t_big
        };
        for (k, tk) in t.iter_mut().enumerate() {
            let ak = a.as_ptr().add(k * cols);
            let mut s0 = [_mm256_setzero_ps(); G];
            let mut s1 = [_mm256_setzero_ps(); G];
            let mut i = 0;
            while i + 16 <= c8 {
                let (w0, w1) = (load8(ak.add(i)), load8(ak.add(i + 8)));
                for j in 0..G {
                    let x = xs[j].as_ptr();
                    s0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i)), s0[j]);
                    s1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(i + 8)), s1[j]);
                }
                i += 16;
            }
            if i < c8 {
                let w0 = load8(ak.add(i));
                for j in 0..G {
                    s0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[j].as_ptr().add(i)), s0[j]);
                }
            }
            for j in 0..G {
                let s = _mm256_add_ps(s0[j], s1[j]);
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), s);
                let mut sum: f32 = lanes.iter().sum();
                for c in c8..cols {
                    sum += f16::from_bits(a[k * cols + c]).to_f32() * xs[j][c];
                }
                tk[j] = scale * sum;
            }
        }
        for (k, tk) in t.iter().enumerate() {
            let bk = bt.as_ptr().add(k * rows);
            let tv: [__m256; G] = std::array::from_fn(|j| _mm256_set1_ps(tk[j]));
            let mut o = 0;
            while o < r8 {
                let b = load8(bk.add(o));
                for j in 0..G {
                    let p = outs[j].as_mut_ptr().add(o);
                    _mm256_storeu_ps(p, _mm256_fmadd_ps(tv[j], b, _mm256_loadu_ps(p)));
                }
                o += 8;
            }
            for o in r8..rows {
                let b = f16::from_bits(bt[k * rows + o]).to_f32();
                for j in 0..G {
                    outs[j][o] += tk[j] * b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grouped rows get exactly the bits each gets alone (and the scalar
    /// path agrees within rounding), for every group size.
    #[test]
    fn a_group_gives_each_row_its_own_bits() {
        let (r, cols, rows) = (7, 45, 27);
        let f = |i: usize, k: f32| (i as f32 * k).sin() * 0.3;
        let h = |v: f32| f16::from_f32(v).to_bits();
        let a: Vec<u16> = (0..r * cols).map(|i| h(f(i, 0.7))).collect();
        let bt: Vec<u16> = (0..r * rows).map(|i| h(f(i, 1.3))).collect();
        let xs: Vec<Vec<f32>> = (0..GROUP).map(|j| (0..cols).map(|i| f(i + 100 * j, 2.1)).collect()).collect();
        let base: Vec<Vec<f32>> = (0..GROUP).map(|j| (0..rows).map(|i| f(i + 7 * j, 0.2)).collect()).collect();
        for g in 1..=GROUP {
            let mut outs = base[..g].to_vec();
            let x_refs: Vec<&[f32]> = xs[..g].iter().map(|x| &x[..]).collect();
            let mut o_refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            lowrank_add_group(&a, &bt, r, 0.5, &x_refs, &mut o_refs);
            for j in 0..g {
                let mut alone = base[j].clone();
                lowrank_add(&a, &bt, r, 0.5, &xs[j], &mut alone, &mut Vec::new());
                assert_eq!(outs[j], alone, "group of {g}, row {j}");
                let mut reference = base[j].clone();
                lowrank_add_ref(&a, &bt, r, 0.5, &xs[j], &mut reference, &mut Vec::new());
                for (o, (&got, &want)) in outs[j].iter().zip(&reference).enumerate() {
                    assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "row {j} {o}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn the_simd_path_agrees_with_the_reference() {
        for (r, cols, rows) in [(5, 37, 21), (16, 576, 192), (1, 8, 8), (3, 1, 1)] {
            let f = |i: usize, k: f32| (i as f32 * k).sin() * 0.3;
            let h = |v: f32| f16::from_f32(v).to_bits();
            let a: Vec<u16> = (0..r * cols).map(|i| h(f(i, 0.7))).collect();
            let bt: Vec<u16> = (0..r * rows).map(|i| h(f(i, 1.3))).collect();
            let x: Vec<f32> = (0..cols).map(|i| f(i, 2.1)).collect();
            let base: Vec<f32> = (0..rows).map(|i| f(i, 0.2)).collect();
            // By hand: out_o += s Σ_k bt[k][o] Σ_c a[k][c] x[c], in f64.
            let g = |v: u16| f16::from_bits(v).to_f64();
            let want: Vec<f64> = (0..rows)
                .map(|o| {
                    base[o] as f64
                        + (0..r)
                            .map(|k| {
                                let tk: f64 = (0..cols).map(|c| g(a[k * cols + c]) * x[c] as f64).sum();
                                0.5 * tk * g(bt[k * rows + o])
                            })
                            .sum::<f64>()
                })
                .collect();
            let (mut got, mut reference) = (base.clone(), base);
            lowrank_add(&a, &bt, r, 0.5, &x, &mut got, &mut Vec::new());
            lowrank_add_ref(&a, &bt, r, 0.5, &x, &mut reference, &mut Vec::new());
            for o in 0..rows {
                let tol = 1e-4 * (1.0 + want[o].abs());
                assert!((got[o] as f64 - want[o]).abs() < tol, "{r}×{cols}→{rows} {o}: {} vs {}", got[o], want[o]);
                assert!((reference[o] as f64 - want[o]).abs() < tol, "{o}: {} vs {}", reference[o], want[o]);
            }
        }
    }
}

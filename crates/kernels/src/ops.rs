//! f32 element-wise operations of a transformer layer: RMSNorm, rotary
//! position embeddings, softmax, activations. Written as plain loops that the
//! compiler vectorizes; they are a small share of the time next to the
//! quantized matrix products.

/// `out[i] = x[i] / rms(x) * w[i]`, with `rms(x) = sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert!(x.len() == w.len() && x.len() == out.len());
    let scale = rms_scale(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * scale * wi;
    }
}

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    let scale = rms_scale(x, eps);
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi *= scale * wi;
    }
}

/// `1 / sqrt(mean(x²) + eps)`, accumulated in f64 so long rows do not lose
/// precision.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    // Eight independent partial sums let the loop vectorize.
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k] * c[k];
        }
    }
    let mut sum: f64 = acc.iter().map(|&a| a as f64).sum();
    sum += rest.iter().map(|&v| (v * v) as f64).sum::<f64>();
    let mean = sum / x.len() as f64;
    (1.0 / (mean + eps as f64).sqrt()) as f32
}

/// Numerically stable softmax in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Every entry masked: nothing to attend to; leave zeros.
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Log-softmax of `x` into `out` (used for log-probabilities).
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 - log_z) as f32;
    }
}

/// SiLU: `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (what Gemma uses).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// `gate[i] = act(gate[i]) * up[i]`: the gated FFN's element-wise step.
/// With AVX2/FMA eight at a time with a polynomial `exp` (`simd`; within
/// a few 1e-7 of [`gated_silu_ref`]): libm's scalar `expf`/`tanhf` were ~10%
/// of Gemma 3's prompt processing.
pub fn gated_silu(gate: &mut [f32], up: &[f32]) {
    gated::<false>(gate, up)
}

/// GELU-gated variant of [`gated_silu`].
pub fn gated_gelu(gate: &mut [f32], up: &[f32]) {
    gated::<true>(gate, up)
}

/// [`gated_gelu`] when `GELU`, else [`gated_silu`].
fn gated<const GELU: bool>(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if crate::formats::has_avx2_fma() {
        // SAFETY: the features were just detected; lengths are equal.
        return unsafe { simd::gated::<GELU>(gate, up) };
    }
    if GELU {
        gated_gelu_ref(gate, up)
    } else {
        gated_silu_ref(gate, up)
    }
}

/// Scalar reference of [`gated_silu`] (libm `exp`).
pub fn gated_silu_ref(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// Scalar reference of [`gated_gelu`] (libm `tanh`).
pub fn gated_gelu_ref(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// AVX2/FMA activations built on an 8-lane `exp`.
/// The scalar mirror of the eight-lane `e^x` (`simd::exp8`): the same
/// operations, each exactly rounded (`mul_add` is a fused multiply-add), so
/// the same bits. For references that must agree with the SIMD kernels.
pub fn exp_poly(x: f32) -> f32 {
    // max/min written so that a NaN passes through, as in `exp8`.
    let x = if x.is_nan() { x } else { x.clamp(-87.3, 88.3) };
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(0.693_359_4, x);
    let r = (-n).mul_add(-2.121_944_4e-4, r);
    let mut p = 1.0f32 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // `_mm256_cvtps_epi32` of NaN is i32::MIN; `as` would give 0.
    let n = if n.is_nan() { i32::MIN } else { n as i32 };
    p * f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;

    /// `e^x` in 8 lanes: `x = n·ln2 + r` with `|r| ≤ ln2/2`, `e^r` by its
    /// Taylor series to `r^7` (truncation error `r^8/8! < 6e-9` relative),
    /// times `2^n` built in the exponent bits. Inputs are clamped to
    /// [-87.3, 88.3], where `2^n` stays a normal float: `e^x` saturates near
    /// 1e-38 and 2e38 instead of reaching 0 or infinity, which the callers'
    /// `1 / (1 + e^x)` forms absorb.
    /// A NaN lane stays NaN (the clamp's constants are the first operands:
    /// `max`/`min` return the second when either is NaN).
    #[inline(always)]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_set1_ps(88.3), _mm256_max_ps(_mm256_set1_ps(-87.3), x));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // ln 2 in two parts so that n·ln2_hi is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n))
    }

    /// `x · sigmoid(x) = x / (1 + e^-x)`.
    #[inline(always)]
    unsafe fn silu8(x: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }

    /// `0.5·x·(1 + tanh(y))`, `y = √(2/π)·(x + 0.044715·x³)`, with
    /// `1 + tanh(y) = 2 − 2 / (1 + e^{2y})`.
    #[inline(always)]
    unsafe fn gelu8(x: __m256) -> __m256 {
        let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        let y = _mm256_mul_ps(_mm256_set1_ps(0.797_884_6), _mm256_fmadd_ps(_mm256_set1_ps(0.044715), x3, x));
        let e = exp8(_mm256_add_ps(y, y));
        let two = _mm256_set1_ps(2.0);
        let one_plus_tanh = _mm256_sub_ps(two, _mm256_div_ps(two, _mm256_add_ps(_mm256_set1_ps(1.0), e)));
        _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), x), one_plus_tanh)
    }

    /// `gate[i] = act(gate[i]) · up[i]`, GELU when `GELU` else SiLU; the
    /// tail of fewer than 8 through the scalar reference.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gated<const GELU: bool>(gate: &mut [f32], up: &[f32]) {
        let n8 = gate.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let a = if GELU { gelu8(g) } else { silu8(g) };
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(a, u));
        }
        if GELU {
            super::gated_gelu_ref(&mut gate[n8..], &up[n8..]);
        } else {
            super::gated_silu_ref(&mut gate[n8..], &up[n8..]);
        }
    }
}

/// Index of the largest value, NaN ignored, the lowest index among equal
/// ones; `None` when no value exceeds −∞ (empty, or all −∞ / NaN). Greedy
/// decoding's step over the vocabulary (151,936 logits for Qwen).
pub fn argmax(x: &[f32]) -> Option<u32> {
    // Two passes the compiler vectorizes: the maximum in 32 lanes (four
    // registers, so the max latency does not serialize; `f32::max` returns
    // the other operand when one is NaN), then the first block of 32 that
    // holds it.
    const LANES: usize = 32;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    for c in chunks.clone() {
        for k in 0..LANES {
            lanes[k] = lanes[k].max(c[k]);
        }
    }
    let best = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if best == f32::NEG_INFINITY {
        return None;
    }
    let block = x.chunks(LANES).position(|c| c.iter().fold(false, |hit, &v| hit | (v == best)))?;
    let within = x[LANES * block..].iter().position(|&v| v == best)?;
    Some((LANES * block + within) as u32)
}

/// The scalar reference of [`argmax`].
pub fn argmax_ref(x: &[f32]) -> Option<u32> {
    let mut best = None;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = Some(i as u32);
        }
    }
    best
}

/// `x[i] += y[i]`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotary position embedding tables for one head size and base frequency.
///
/// Angles are computed in f64 and stored as f32 cos/sin per position and
/// pair, so the rotation itself is a cheap multiply-add.
pub struct Rope {
    /// Number of rotated dimensions (≤ head_dim; the rest pass through).
    pub n_rot: usize,
    /// NEOX style rotates pairs (i, i + n_rot/2); the original GPT-J/llama
    /// style rotates adjacent pairs (2i, 2i+1).
    pub neox: bool,
    /// `inv_freq[i] = base^(-2i/n_rot)`, shape [n_rot/2].
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(n_rot: usize, base: f32, neox: bool) -> Rope {
        assert!(n_rot.is_multiple_of(2) && n_rot <= 1024, "rotary dimension {n_rot} must be even and at most 1024");
        let inv_freq = (0..n_rot / 2).map(|i| (base as f64).powf(-2.0 * i as f64 / n_rot as f64)).collect();
        Rope { n_rot, neox, inv_freq }
    }

    /// Rotates every head of `x` (shape [n_heads, head_dim]) for position `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        self.angles(&[pos]).apply(0, x, head_dim);
    }

    /// cos/sin of every rotated pair at each of `positions`: computed once
    /// per forward pass, since every layer rotates by the same angles.
    pub fn angles(&self, positions: &[usize]) -> RopeAngles {
        let mut cs = Vec::with_capacity(positions.len() * self.inv_freq.len());
        for &pos in positions {
            cs.extend(self.inv_freq.iter().map(|&f| {
                let a = pos as f64 * f;
                (a.cos() as f32, a.sin() as f32)
            }));
        }
        RopeAngles { half: self.n_rot / 2, neox: self.neox, cs }
    }
}

/// The rotation of a batch's rows ([`Rope::angles`]).
pub struct RopeAngles {
    half: usize,
    neox: bool,
    /// (cos, sin) of pair i at row r: `cs[r * half + i]`, shape [n_rows, half].
    cs: Vec<(f32, f32)>,
}

impl RopeAngles {
    /// Rotates every head of `x` (shape [n_heads, head_dim]) by row `row`'s angles.
    pub fn apply(&self, row: usize, x: &mut [f32], head_dim: usize) {
        let half = self.half;
        let cs = &self.cs[row * half..(row + 1) * half];
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(cos, sin)) in cs.iter().enumerate() {
                let (a, b) = if self.neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let x = vec![3.0f32; 64];
        let w: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let mut out = vec![0.0; 64];
        rms_norm(&x, &w, 0.0, &mut out);
        for (o, wi) in out.iter().zip(&w) {
            assert!((o - wi).abs() < 1e-5);
        }
    }

    #[test]
    fn argmax_matches_reference() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        let cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![nan],
            vec![ninf; 20],
            vec![nan, ninf, nan],
            vec![1.0],
            vec![nan, 2.0, 5.0, 5.0, nan],
            // Ties across and within blocks of eight: the lowest index wins.
            (0..100).map(|i| if i % 37 == 35 { 9.0 } else { 0.0 }).collect(),
            (0..17).map(|i| -(i as f32)).collect(),
            (0..17).map(|i| i as f32).collect(),
            // The maximum in the remainder after the last block of eight.
            (0..71).map(|i| if i == 69 { f32::INFINITY } else { nan }).collect(),
            vec![-0.0, 0.0, -0.0],
            vec![0.0, -0.0],
        ];
        for x in &cases {
            assert_eq!(argmax(x), argmax_ref(x), "{x:?}");
        }
        // Pseudo-random rows of every length up to 200, with NaNs and repeats.
        let mut seed = 12345u32;
        for len in 0..200 {
            let x: Vec<f32> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    match seed >> 28 {
                        0 => nan,
                        1 => ninf,
                        k => (k % 5) as f32,
                    }
                })
                .collect();
            assert_eq!(argmax(&x), argmax_ref(&x), "{x:?}");
        }
    }

    /// `exp_poly` is the eight-lane exp's bits, lane by lane, and both are
    /// within 2 ulps of libm's `exp` over the range softmax uses (and then
    /// some); NaN stays NaN and the clamp holds at both ends.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn exp_poly_is_exp8_bit_for_bit() {
        if !crate::formats::has_avx2_fma() {
            return;
        }
        let mut xs: Vec<f32> = (0..200_000).map(|i| -100.0 + i as f32 * 0.000_95).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 88.3, -87.3, 88.4, -87.4, 1e10, -1e10, f32::INFINITY, f32::NEG_INFINITY]);
        xs.push(f32::NAN);
        while !xs.len().is_multiple_of(8) {
            xs.push(0.5);
        }
        let mut simd = vec![0f32; xs.len()];
        for (x, out) in xs.chunks_exact(8).zip(simd.chunks_exact_mut(8)) {
            // SAFETY: AVX2 and FMA were just detected.
            unsafe {
                use std::arch::x86_64::*;
                let e = simd::exp8(_mm256_loadu_ps(x.as_ptr()));
                _mm256_storeu_ps(out.as_mut_ptr(), e);
            }
        }
        for (&x, &e) in xs.iter().zip(&simd) {
            let p = exp_poly(x);
            assert!(p.to_bits() == e.to_bits() || (p.is_nan() && e.is_nan()), "exp({x}): scalar {p}, simd {e}");
            if (-87.0..88.0).contains(&x) {
                let want = (x as f64).exp();
                assert!(((p as f64 - want) / want).abs() < 2.5e-7, "exp({x}) = {p}, libm {want}");
            }
        }
        assert!(exp_poly(f32::NAN).is_nan());
        assert!(exp_poly(-1e10) > 0.0 && exp_poly(-1e10) < 1e-37);
    }

    #[test]
    fn softmax_sums_to_one_and_handles_masks() {
        let mut x = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5];
        softmax_inplace(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[2], 0.0);
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        for neox in [false, true] {
            let rope = Rope::new(64, 10000.0, neox);
            let orig: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut x = orig.clone();
            rope.apply(&mut x, 64, 0);
            assert_eq!(x, orig);
            rope.apply(&mut x, 64, 17);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
        }
    }

    #[test]
    fn rope_rotates_the_documented_pairs() {
        // Position 1, first pair has inv_freq 1: rotation by 1 radian.
        let (c, s) = (1f32.cos(), 1f32.sin());
        let mut x = vec![0f32; 8];
        x[0] = 1.0;
        Rope::new(8, 10000.0, false).apply(&mut x, 8, 1);
        assert!((x[0] - c).abs() < 1e-6 && (x[1] - s).abs() < 1e-6);
        let mut x = vec![0f32; 8];
        x[0] = 1.0;
        Rope::new(8, 10000.0, true).apply(&mut x, 8, 1);
        assert!((x[0] - c).abs() < 1e-6 && (x[4] - s).abs() < 1e-6);
    }

    /// The SIMD activations agree with the libm references over the range a
    /// transformer sees and beyond (saturation at both ends), including the
    /// scalar tail of a length that is not a multiple of 8.
    #[test]
    fn gated_activations_match_references() {
        let n = 8 * 500 + 5;
        let gate: Vec<f32> = (0..n).map(|i| -120.0 + 240.0 * i as f32 / n as f32).collect();
        let up: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        type Gated = fn(&mut [f32], &[f32]);
        let pairs: [(&str, Gated, Gated); 2] =
            [("silu", gated_silu, gated_silu_ref), ("gelu", gated_gelu, gated_gelu_ref)];
        for (name, fast, reference) in pairs {
            let (mut a, mut b) = (gate.clone(), gate.clone());
            fast(&mut a, &up);
            reference(&mut b, &up);
            for i in 0..n {
                let tol = 2e-6 * b[i].abs().max(1.0);
                assert!((a[i] - b[i]).abs() <= tol, "{name}({}) * {}: {} vs reference {}", gate[i], up[i], a[i], b[i]);
                assert!(a[i].is_finite(), "{name}({}) is not finite", gate[i]);
            }
        }
    }
}

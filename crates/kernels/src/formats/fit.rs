//! Scale fitting shared by the quantizers of several block formats: the
//! least-squares searches that pick a block's (or sub-block's) scale, and
//! min, with each element's error optionally weighted by an importance (an
//! importance matrix's mean squared input of the element's column).
//!
//! - [`fit_scale_min`]: `x ≈ scale·q − min`, q ∈ 0..=nmax (Q2_K, Q4_K,
//!   Q5_K sub-blocks; Q4_1, Q5_1 blocks with an importance matrix);
//! - [`fit_symmetric`]: `x ≈ s·q`, q ∈ −n..=n−1 (Q3_K, Q6_K sub-blocks;
//!   Q4_0, Q5_0 blocks with an importance matrix).

/// Fits `x ≈ scale*q - min` (q ∈ 0..=nmax, min ≥ 0) for one sub-block.
///
/// Starts from the plain min/max fit, then tries a handful of slightly
/// different step sizes; for each, quants are assigned by rounding and the
/// scale and offset re-fit by weighted least squares (weights favour large
/// magnitudes, which matter most to a dot product). Keeps the best.
/// Returns `(scale, min)`, both ≥ 0.
///
/// `imp`: each element's importance (an importance matrix's mean squared
/// input of its column), multiplying its weight; `None` weighs all alike.
pub(crate) fn fit_scale_min(x: &[f32], nmax: u8, imp: Option<&[f32]>) -> (f32, f32) {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if hi <= lo {
        return (0.0, -lo);
    }
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let av = mean_sq.sqrt();
    let weight = |i: usize, v: f32| imp.map_or(1.0, |w| w[i]) * (av + v.abs());
    let nmaxf = nmax as f32;
    let err = |scale: f32, min: f32| -> f32 {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let q = if scale > 0.0 { ((v + min) / scale).round().clamp(0.0, nmaxf) } else { 0.0 };
                let e = scale * q - min - v;
                weight(i, v) * e * e
            })
            .sum()
    };
    let mut best = ((hi - lo) / nmaxf, -lo);
    let mut best_err = err(best.0, best.1);
    for step in -10..=10 {
        let iscale = (nmaxf + 0.1 * step as f32) / (hi - lo);
        let (mut sw, mut sl, mut sl2, mut sx, mut sxl) = (0.0f32, 0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for (i, &v) in x.iter().enumerate() {
            let l = (iscale * (v - lo)).round().clamp(0.0, nmaxf);
            let w = weight(i, v);
            sw += w;
            sl += w * l;
            sl2 += w * l * l;
            sx += w * v;
            sxl += w * v * l;
        }
        // Minimise Σw(s*l + o - x)² over s, o (o = -min).
        let det = sw * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut s = (sw * sxl - sx * sl) / det;
        let mut o = (sl2 * sx - sl * sxl) / det;
        if o > 0.0 {
            // The format needs min ≥ 0: pin the offset at 0, re-fit s alone.
            o = 0.0;
            s = sxl / sl2;
        }
        if s <= 0.0 {
            continue;
        }
        let e = err(s, -o);
        if e < best_err {
            best_err = e;
            best = (s, -o);
        }
    }
    best
}

/// The scale `s` of `x ≈ s·q`, q ∈ −n..=n−1 (Q6_K: n = 32, Q5_0: 16, Q4_0: 8, Q3_K: 4),
/// with the least squared error among a few candidates (negative when the
/// largest magnitude is positive, so it lands on the −n side of the
/// asymmetric range): steps that put the largest magnitude at −n down to
/// −3n/4, each also re-fit by least squares to the quants it gives.
pub(crate) fn fit_symmetric(x: &[f32], n: u8, imp: Option<&[f32]>) -> f32 {
    let m = x.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    if m == 0.0 {
        return 0.0;
    }
    let (lo, hi) = (-(n as f32), n as f32 - 1.0);
    // With importances, each element's weight also grows with its
    // magnitude (large weights matter most to a dot product), and the
    // search reaches past the largest magnitude: clipping it may pay.
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let w = |i: usize| imp.map_or(1.0, |w| w[i] * (sigma2 + x[i] * x[i]).sqrt());
    let extra = if imp.is_some() { 8 } else { 0 };
    let err = |s: f32| -> f32 {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let e = s * (v / s).round().clamp(lo, hi) - v;
                w(i) * e * e
            })
            .sum()
    };
    let mut best = m / lo;
    let mut best_err = err(best);
    for k in -extra..=16 {
        let s = m / (lo + n as f32 * k as f32 / 64.0);
        // Least-squares re-fit of the scale to the quants it gives.
        let (mut sxq, mut sqq) = (0.0f32, 0.0f32);
        for (i, &v) in x.iter().enumerate() {
            let q = (v / s).round().clamp(lo, hi);
            sxq += w(i) * v * q;
            sqq += w(i) * q * q;
        }
        for cand in [s, if sqq > 0.0 { sxq / sqq } else { s }] {
            let e = err(cand);
            if cand != 0.0 && e < best_err {
                best = cand;
                best_err = e;
            }
        }
    }
    best
}

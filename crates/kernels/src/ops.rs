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
pub fn gated_silu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// GELU-gated variant of [`gated_silu`].
pub fn gated_gelu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
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
        assert!(n_rot % 2 == 0 && n_rot <= 1024, "rotary dimension {n_rot} must be even and at most 1024");
        let inv_freq = (0..n_rot / 2)
            .map(|i| (base as f64).powf(-2.0 * i as f64 / n_rot as f64))
            .collect();
        Rope { n_rot, neox, inv_freq }
    }

    /// Rotates every head of `x` (shape [n_heads, head_dim]) for position `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.n_rot / 2;
        // cos/sin for this position, shape [half] each.
        let mut cs = [(0f32, 0f32); 512];
        let cs = &mut cs[..half];
        for (c, &f) in cs.iter_mut().zip(&self.inv_freq) {
            let a = pos as f64 * f;
            *c = (a.cos() as f32, a.sin() as f32);
        }
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
}

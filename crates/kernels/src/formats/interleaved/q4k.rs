//! Q4_K in the 8-row interleaved layout.
//!
//! One super-block column of 8 rows (8 × 144 = 1152 bytes, the same size as
//! the rows it replaces):
//! - `d`, `dmin`: the eight rows' f16 super-block scales side by side.
//! - The 6-bit sub-block scales and mins split into their low four bits
//!   (`scales_lo[8b + s]`: scale in the low nibble, min in the high nibble,
//!   for sub-block `b` of row `s`) and their top two bits (`scales_hi`: for
//!   pair `p = 8b + s`, `scale>>4 | (min>>4)<<2` in the low nibble of byte `p`
//!   when `p < 32`, else in the high nibble of byte `p - 32`), so eight rows'
//!   scales come out of a few vector masks and shifts.
//! - `qs[256c + 32m + 4s + b]` = row `s`'s quant byte `32c + 4m + b`: its low
//!   nibble is element `4m + b` of sub-block `2c`, its high nibble the same
//!   element of sub-block `2c + 1`. A 32-byte load holds four elements of
//!   each of the eight rows, lanes = rows, as in the 32-element formats.
//!
//! The arithmetic is the row-major AVX2 kernel's (`kquants::q4k`), to the
//! bit: per super-block the exact integers `isum = Σ_j sc[j]·Σ q·q8` and
//! `msum = Σ_j m[j]·(bsums[2j] + bsums[2j+1])`, then
//! `acc_i = fma(isum, dy·d, acc_i)` and `acc_m = fma(msum, dy·(−dmin), acc_m)`
//! and finally `acc_i + acc_m`. So repacking changes no result.

use super::{ActMeta, Interleaved, Kernels, ROWS};
use crate::formats::kquants::{f16_to_f32, pack_scale_min_k4, unpack_scale_min_k4, BlockQ4K, BlockQ8K, QK_K};
use crate::formats::SimdLevel;
use bytemuck::{Pod, Zeroable};

/// 8 rows of Q4_K: 1152 bytes = 8 × 144.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4Kx8 {
    pub d: [u16; ROWS],
    pub dmin: [u16; ROWS],
    pub scales_lo: [u8; 64],
    pub scales_hi: [u8; 32],
    pub qs: [u8; ROWS * QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4Kx8>() == ROWS * 144);

impl BlockQ4Kx8 {
    /// Row `s`'s six-bit (scale, min) of sub-block `b`.
    fn scale_min(&self, s: usize, b: usize) -> (u8, u8) {
        let p = 8 * b + s;
        let lo = self.scales_lo[p];
        let hi = if p < 32 { self.scales_hi[p] & 0x0F } else { self.scales_hi[p - 32] >> 4 };
        ((lo & 0x0F) | (hi & 0x03) << 4, (lo >> 4) | (hi >> 2) << 4)
    }

    /// Row `s`'s 4-bit quant of element `e` (0..32) of sub-block `b`.
    fn quant(&self, s: usize, b: usize, e: usize) -> i32 {
        let byte = self.qs[256 * (b / 2) + 32 * (e / 4) + 4 * s + e % 4];
        (if b.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 }) as i32
    }
}

impl Interleaved for BlockQ4Kx8 {
    type Row = BlockQ4K;

    fn pack(rows: [&BlockQ4K; ROWS]) -> Self {
        let mut out = BlockQ4Kx8::zeroed();
        for (s, row) in rows.iter().enumerate() {
            out.d[s] = row.d;
            out.dmin[s] = row.dmin;
            let (sc, mn) = unpack_scale_min_k4(&row.scales);
            for b in 0..8 {
                let p = 8 * b + s;
                out.scales_lo[p] = (sc[b] & 0x0F) | (mn[b] & 0x0F) << 4;
                let hi = (sc[b] >> 4) | (mn[b] >> 4) << 2;
                if p < 32 {
                    out.scales_hi[p] |= hi;
                } else {
                    out.scales_hi[p - 32] |= hi << 4;
                }
            }
            for c in 0..4 {
                for m in 0..8 {
                    let dst = 256 * c + 32 * m + 4 * s;
                    out.qs[dst..dst + 4].copy_from_slice(&row.qs[32 * c + 4 * m..32 * c + 4 * m + 4]);
                }
            }
        }
        out
    }

    fn unpack(&self, s: usize) -> BlockQ4K {
        let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
        for b in 0..8 {
            (sc[b], mn[b]) = self.scale_min(s, b);
        }
        let mut qs = [0u8; QK_K / 2];
        for c in 0..4 {
            for m in 0..8 {
                let src = 256 * c + 32 * m + 4 * s;
                qs[32 * c + 4 * m..32 * c + 4 * m + 4].copy_from_slice(&self.qs[src..src + 4]);
            }
        }
        BlockQ4K { d: self.d[s], dmin: self.dmin[s], scales: pack_scale_min_k4(&sc, &mn), qs }
    }

    fn meta(a: &BlockQ8K) -> ActMeta {
        ActMeta { d: a.d, s: 0.0, sum: 0 }
    }

    fn dot_ref(w: &[Self], a: &[BlockQ8K], meta: &[ActMeta]) -> [f32; ROWS] {
        assert!(w.len() == a.len() && w.len() == meta.len(), "interleaved dot: length mismatch");
        std::array::from_fn(|s| {
            let (mut acc_i, mut acc_m) = (0.0f32, 0.0f32);
            for (x, y) in w.iter().zip(a) {
                let (mut isum, mut msum) = (0i32, 0i32);
                for b in 0..8 {
                    let (sc, mn) = x.scale_min(s, b);
                    let dot: i32 = (0..32).map(|e| x.quant(s, b, e) * y.qs[32 * b + e] as i32).sum();
                    isum += sc as i32 * dot;
                    msum += mn as i32 * (y.bsums[2 * b] as i32 + y.bsums[2 * b + 1] as i32);
                }
                acc_i = (isum as f32).mul_add(y.d * f16_to_f32(x.d[s]), acc_i);
                acc_m = (msum as f32).mul_add(y.d * -f16_to_f32(x.dmin[s]), acc_m);
            }
            acc_i + acc_m
        })
    }

    fn dot_at<const N: usize>(
        level: SimdLevel,
        w: &[Self],
        a: [&[BlockQ8K]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        super::dispatch(level, w, a, meta, out, simd!(q4k, vnni))
    }
}

/// `dot_ref` in lanes, the weight super-block's scales and nibbles decoded
/// once for all `N` tokens: one body, instantiated for AVX2 (`avx2::q4k`)
/// and for AVX-512 VNNI (`vnni::q4k`), which differ only in how a
/// sub-block's products are summed.
#[cfg(target_arch = "x86_64")]
mod body {
    use super::super::body::{chunk, load};
    use super::*;
    use std::arch::x86_64::*;

    /// Scales and mins of the 8 rows × 8 sub-blocks, as bytes `[8b + s]`.
    #[inline(always)]
    unsafe fn scales_mins(x: &BlockQ4Kx8) -> ([u8; 64], [u8; 64]) {
        let low4 = _mm256_set1_epi8(0x0F);
        let low2 = _mm256_set1_epi8(0x03);
        let mut sc = [0u8; 64];
        let mut mn = [0u8; 64];
        let hi = load(x.scales_hi.as_ptr());
        for half in 0..2 {
            let lo = load(x.scales_lo.as_ptr().add(32 * half));
            let h =
                if half == 0 { _mm256_and_si256(hi, low4) } else { _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4) };
            // Top bits: ≤ 3 before the shift, so the 16-bit shifts move no
            // bit across a byte.
            let s = _mm256_or_si256(_mm256_and_si256(lo, low4), _mm256_slli_epi16(_mm256_and_si256(h, low2), 4));
            let m_lo = _mm256_and_si256(_mm256_srli_epi16(lo, 4), low4);
            let m_hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), low2), 4);
            _mm256_storeu_si256(sc.as_mut_ptr().add(32 * half).cast(), s);
            _mm256_storeu_si256(mn.as_mut_ptr().add(32 * half).cast(), _mm256_or_si256(m_lo, m_hi));
        }
        (sc, mn)
    }

    /// # Safety
    /// AVX2, FMA and F16C, and with `VNNI` also AVX-512 VL and VNNI; `a[t]`
    /// as long as `w`.
    #[inline(always)]
    pub(super) unsafe fn q4k<const N: usize, const VNNI: bool>(
        w: &[BlockQ4Kx8],
        a: [&[BlockQ8K]; N],
        _meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        let low4 = _mm256_set1_epi8(0x0F);
        let mut acc_i = [_mm256_setzero_ps(); N];
        let mut acc_m = [_mm256_setzero_ps(); N];
        for (j, x) in w.iter().enumerate() {
            let (sc, mn) = scales_mins(x);
            // Mins of sub-blocks 2i and 2i + 1 as an i16 pair in lane s.
            let mut mins = [_mm256_setzero_si256(); 4];
            for (i, m) in mins.iter_mut().enumerate() {
                let even = _mm_loadl_epi64(mn.as_ptr().add(16 * i).cast());
                let odd = _mm_loadl_epi64(mn.as_ptr().add(16 * i + 8).cast());
                *m = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(even, odd));
            }
            // Sub-block b's scale: row s's in lane s, as i32.
            let scale32 = |b: usize| _mm256_cvtepu8_epi32(_mm_loadl_epi64(sc.as_ptr().add(8 * b).cast()));

            let mut isum = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                // Sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles).
                let mut p_lo = [_mm256_setzero_si256(); N];
                let mut p_hi = [_mm256_setzero_si256(); N];
                // With one or two tokens, odd chunks go to a second set of
                // `vpdpbusd` accumulators so that the chains overlap
                // (integer sums: the split changes nothing).
                let mut q_lo = [_mm256_setzero_si256(); N];
                let mut q_hi = [_mm256_setzero_si256(); N];
                for m in 0..8 {
                    let v = load(x.qs.as_ptr().add(256 * c + 32 * m));
                    let lo = _mm256_and_si256(v, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for t in 0..N {
                        let y = &a[t].get_unchecked(j).qs;
                        let (y_lo, y_hi) = (chunk(y, 64 * c + 4 * m), chunk(y, 64 * c + 32 + 4 * m));
                        if VNNI {
                            // Exact i32 sums of the sub-block's products.
                            if N <= 2 && m % 2 == 1 {
                                q_lo[t] = _mm256_dpbusd_epi32(q_lo[t], lo, y_lo);
                                q_hi[t] = _mm256_dpbusd_epi32(q_hi[t], hi, y_hi);
                            } else {
                                p_lo[t] = _mm256_dpbusd_epi32(p_lo[t], lo, y_lo);
                                p_hi[t] = _mm256_dpbusd_epi32(p_hi[t], hi, y_hi);
                            }
                        } else {
                            // q ≤ 15, |q8| ≤ 127: pairs ≤ 3810, eight summed
                            // ≤ 30480 < 2¹⁵.
                            p_lo[t] = _mm256_add_epi16(p_lo[t], _mm256_maddubs_epi16(lo, y_lo));
                            p_hi[t] = _mm256_add_epi16(p_hi[t], _mm256_maddubs_epi16(hi, y_hi));
                        }
                    }
                }
                let (s_lo, s_hi) = (scale32(2 * c), scale32(2 * c + 1));
                // AVX2's `madd` wants the scale in both i16 of the lane (it
                // adds the pair); VNNI multiplies the i32 sums by it.
                let (s_lo, s_hi) = if VNNI {
                    (s_lo, s_hi)
                } else {
                    let pair = |s: __m256i| _mm256_or_si256(s, _mm256_slli_epi32(s, 16));
                    (pair(s_lo), pair(s_hi))
                };
                for t in 0..N {
                    // The same integer either way: scale × the sub-block's sum
                    // (|·| ≤ 63·32·15·127 < 2²³).
                    let (v_lo, v_hi) = if VNNI {
                        let (p_lo, p_hi) = if N <= 2 {
                            (_mm256_add_epi32(p_lo[t], q_lo[t]), _mm256_add_epi32(p_hi[t], q_hi[t]))
                        } else {
                            (p_lo[t], p_hi[t])
                        };
                        (_mm256_mullo_epi32(p_lo, s_lo), _mm256_mullo_epi32(p_hi, s_hi))
                    } else {
                        (_mm256_madd_epi16(p_lo[t], s_lo), _mm256_madd_epi16(p_hi[t], s_hi))
                    };
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(v_lo, v_hi));
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(x.d.as_ptr().cast()));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(x.dmin.as_ptr().cast()));
            let neg_dmin = _mm256_xor_ps(dmin, _mm256_set1_ps(-0.0));
            for t in 0..N {
                let y = a[t].get_unchecked(j);
                // Sub-block sums of q8: bsums pairwise, as i16 (≤ 32·127).
                let b = _mm_loadu_si128(y.bsums.as_ptr().cast());
                let b2 = _mm_loadu_si128(y.bsums.as_ptr().add(8).cast());
                let ys = _mm_hadd_epi16(b, b2);
                let mut msum = _mm256_madd_epi16(mins[0], _mm256_broadcastd_epi32(ys));
                msum =
                    _mm256_add_epi32(msum, _mm256_madd_epi16(mins[1], _mm256_broadcastd_epi32(_mm_srli_si128(ys, 4))));
                msum =
                    _mm256_add_epi32(msum, _mm256_madd_epi16(mins[2], _mm256_broadcastd_epi32(_mm_srli_si128(ys, 8))));
                msum =
                    _mm256_add_epi32(msum, _mm256_madd_epi16(mins[3], _mm256_broadcastd_epi32(_mm_srli_si128(ys, 12))));
                let dy = _mm256_set1_ps(y.d);
                acc_i[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dy, d), acc_i[t]);
                acc_m[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dy, neg_dmin), acc_m[t]);
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), _mm256_add_ps(acc_i[t], acc_m[t]));
        }
    }
}

entry_points! {
    q4k: BlockQ4Kx8, BlockQ8K;
}

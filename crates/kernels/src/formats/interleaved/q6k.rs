//! Q6_K in the 8-row interleaved layout.
//!
//! One super-block column of 8 rows (8 × 210 = 1680 bytes, the same size as
//! the rows it replaces). Element `e` of a row is in chunk `e / 4` (64 chunks
//! of 4 elements), byte `e % 4` of it; sub-block `j` (16 elements, one scale)
//! is chunks `4j..4j + 4`.
//! - `d`: the eight rows' f16 super-block scales side by side.
//! - `scales[8j + s]`: row `s`'s signed scale of sub-block `j`.
//! - `qs`: sixteen steps of 96 bytes, in the order the kernel reads them, so
//!   the block is read front to back (an earlier layout with the low and high
//!   bits in two regions read alternately lost the hardware prefetcher's
//!   stream in decode). Step `i` (0..16) covers chunks `i`, `i + 16`, `i + 32`
//!   and `i + 48`; byte `4s + b` of each of its three 32-byte parts belongs to
//!   row `s`, element `b` of the chunk:
//!   - part 0: low 4 bits of chunk `i` (low nibble) and of chunk `i + 32`
//!     (high nibble);
//!   - part 1: the same for chunks `i + 16` and `i + 48`;
//!   - part 2: the high 2 bits of chunks `i`, `i + 16`, `i + 32`, `i + 48` in
//!     bits 0–1, 2–3, 4–5, 6–7.
//!
//! A 32-byte vector of one chunk's 6-bit quants is then a few masks and
//! shifts away, and the lanes are rows, as in the other layouts.
//!
//! The arithmetic is the row-major AVX2 kernel's (`kquants::q6k`), to the
//! bit: per super-block the exact integer `isum = Σ_j sc[j]·Σ (q − 32)·q8`
//! (formed as `Σ_j sc[j]·Σ q·q8 − 32·Σ_j sc[j]·bsums[j]`), then
//! `acc = fma(isum, dy·d, acc)`. So repacking changes no result.
#![allow(
    clippy::needless_range_loop,
    reason = "SIMD loops index several arrays (registers per token, per step) by one counter"
)]

use super::{ActMeta, ExactSums, Interleaved, Kernels, ROWS};
use crate::formats::kquants::{q6_place, BlockQ6K, BlockQ8K, QK_K};
use crate::formats::SimdLevel;
use bytemuck::{Pod, Zeroable};

/// Steps of `qs`, and bytes per step.
const STEPS: usize = 16;
const STEP: usize = 96;

/// 8 rows of Q6_K: 1680 bytes = 8 × 210.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ6Kx8 {
    pub d: [u16; ROWS],
    pub scales: [i8; ROWS * QK_K / 16],
    pub qs: [u8; STEPS * STEP],
}
const _: () = assert!(std::mem::size_of::<BlockQ6Kx8>() == ROWS * 210);

/// Where chunk `c`'s low bits live: (byte offset of its 32-byte part in
/// `qs`, shift of its nibble), and its high bits: (offset, shift).
fn chunk_place(c: usize) -> ((usize, u32), (usize, u32)) {
    let (i, quarter) = (c % STEPS, c / STEPS);
    let low_part = quarter % 2; // chunks i, i + 32 in part 0; i + 16, i + 48 in part 1
    let low_shift = if quarter < 2 { 0 } else { 4 };
    ((STEP * i + 32 * low_part, low_shift), (STEP * i + 64, 2 * quarter as u32))
}

/// Chunk `c`'s four quants (elements 4c..4c + 4) of a Q6_K row as the bytes
/// of two u32: the low 4 bits, and the high 2 bits (four consecutive bytes
/// of `ql` and of `qh`, see `q6_place`).
#[inline(always)]
fn chunk_bits(row: &BlockQ6K, c: usize) -> (u32, u32) {
    let (lo_at, lo_shift, hi_at, hi_shift) = q6_place(4 * c);
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let lo = word(&row.ql[lo_at..]) >> lo_shift;
    let hi = word(&row.qh[hi_at..]) >> hi_shift;
    (lo & 0x0F0F_0F0F, hi & 0x0303_0303)
}

impl BlockQ6Kx8 {
    /// Row `s`'s unsigned 6-bit quant of element `e`.
    fn quant(&self, s: usize, e: usize) -> u8 {
        let ((lo_at, lo_shift), (hi_at, hi_shift)) = chunk_place(e / 4);
        let at = 4 * s + e % 4;
        ((self.qs[lo_at + at] >> lo_shift) & 0xF) | (((self.qs[hi_at + at] >> hi_shift) & 3) << 4)
    }
}

impl Interleaved for BlockQ6Kx8 {
    type Row = BlockQ6K;

    fn pack(rows: [&BlockQ6K; ROWS]) -> Self {
        let mut out = BlockQ6Kx8::zeroed();
        for (s, row) in rows.iter().enumerate() {
            out.d[s] = row.d;
            for j in 0..QK_K / 16 {
                out.scales[8 * j + s] = row.scales[j];
            }
            // Step by step, each of the row's three 4-byte slots whole.
            for i in 0..STEPS {
                let [(l0, h0), (l1, h1), (l2, h2), (l3, h3)] = std::array::from_fn(|q| chunk_bits(row, i + STEPS * q));
                let at = STEP * i + 4 * s;
                out.qs[at..at + 4].copy_from_slice(&(l0 | l2 << 4).to_le_bytes());
                out.qs[at + 32..at + 36].copy_from_slice(&(l1 | l3 << 4).to_le_bytes());
                out.qs[at + 64..at + 68].copy_from_slice(&(h0 | h1 << 2 | h2 << 4 | h3 << 6).to_le_bytes());
            }
        }
        out
    }

    fn unpack(&self, s: usize) -> BlockQ6K {
        let mut row = BlockQ6K::zeroed();
        row.d = self.d[s];
        for j in 0..QK_K / 16 {
            row.scales[j] = self.scales[8 * j + s];
        }
        for e in 0..QK_K {
            let q = self.quant(s, e);
            let (lo_at, lo_shift, hi_at, hi_shift) = q6_place(e);
            row.ql[lo_at] |= (q & 0xF) << lo_shift;
            row.qh[hi_at] |= (q >> 4) << hi_shift;
        }
        row
    }

    fn meta(a: &BlockQ8K) -> ActMeta {
        ActMeta { d: a.d, s: 0.0, sum: 0 }
    }

    fn dot_ref(w: &[Self], a: &[BlockQ8K], meta: &[ActMeta]) -> [f32; ROWS] {
        super::exact_dot_ref(w, a, meta)
    }

    fn dot_at<const N: usize>(
        level: SimdLevel,
        w: &[Self],
        a: [&[BlockQ8K]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        super::dispatch(level, w, a, meta, out, simd!(q6k, vnni))
    }
}

impl ExactSums for BlockQ6Kx8 {
    fn isum_ref(&self, s: usize, a: &BlockQ8K) -> i32 {
        (0..QK_K / 16)
            .map(|j| {
                let dot: i32 = (16 * j..16 * j + 16).map(|e| (self.quant(s, e) as i32 - 32) * a.qs[e] as i32).sum();
                self.scales[8 * j + s] as i32 * dot
            })
            .sum()
    }

    fn scales(&self) -> [u16; ROWS] {
        self.d
    }
}

/// `dot_ref` in lanes, each step's quants decoded once for all `N` tokens:
/// one body for AVX2 (`avx2::q6k`) and AVX-512 VNNI (`vnni::q6k`).
#[cfg(target_arch = "x86_64")]
mod body {
    use super::super::body::{chunk, load};
    use super::*;
    use std::arch::x86_64::*;

    /// Step `i`'s four chunks of 6-bit quants: chunks `i`, `i + 16`,
    /// `i + 32`, `i + 48`, each byte one row's quant (0..64). The 16-bit
    /// shifts carry bits across bytes only into positions the masks clear.
    #[inline(always)]
    unsafe fn step_quants(x: &BlockQ6Kx8, i: usize) -> [__m256i; 4] {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x30);
        let p = x.qs.as_ptr().add(STEP * i);
        let (l0, l1, h) = (load(p), load(p.add(32)), load(p.add(64)));
        [
            _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2)),
            _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m2)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(h, 2), m2),
            ),
        ]
    }

    /// # Safety
    /// AVX2, FMA and F16C, and with `VNNI` also AVX-512 F/BW/VL and VNNI;
    /// `a[t]` and `meta[t]` as long as `w`.
    #[inline(always)]
    pub(super) unsafe fn q6k<const N: usize, const VNNI: bool>(
        w: &[BlockQ6Kx8],
        a: [&[BlockQ8K]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        for (jb, x) in w.iter().enumerate() {
            // Sub-block j's scales, row s in lane s: as i32 (VNNI) or as the
            // same i16 twice (AVX2's `madd` of a chunk's product pairs).
            let scale32 = |j: usize| _mm256_cvtepi8_epi32(_mm_loadl_epi64(x.scales.as_ptr().add(8 * j).cast()));
            let scale16x2 = |j: usize| {
                let v = scale32(j);
                _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16))
            };
            // Scales of sub-blocks 2p and 2p + 1 as an i16 pair in lane s,
            // for the offset term (once per block, for every token).
            let pairs: [__m256i; 8] = std::array::from_fn(|p| {
                let even = _mm_loadl_epi64(x.scales.as_ptr().add(16 * p).cast());
                let odd = _mm_loadl_epi64(x.scales.as_ptr().add(16 * p + 8).cast());
                _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(even, odd))
            });
            let mut isum = [_mm256_setzero_si256(); N];
            // Steps 4g..4g + 4 complete sub-blocks g, g + 4, g + 8, g + 12.
            for g in 0..4 {
                let mut sb = [[_mm256_setzero_si256(); 4]; N];
                for i in 4 * g..4 * g + 4 {
                    let q = step_quants(x, i);
                    for (quarter, &qv) in q.iter().enumerate() {
                        let c = i + 16 * quarter;
                        // AVX2's scale for this chunk, shared by the tokens.
                        let sc = if VNNI { _mm256_setzero_si256() } else { scale16x2(c / 4) };
                        for t in 0..N {
                            let y = chunk(&a[t].get_unchecked(jb).qs, 4 * c);
                            if VNNI {
                                sb[t][quarter] = _mm256_dpbusd_epi32(sb[t][quarter], qv, y);
                            } else {
                                // q ≤ 63, |q8| ≤ 127: pairs ≤ 16002, no
                                // saturation; × the scale in i32.
                                let p = _mm256_maddubs_epi16(qv, y);
                                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, sc));
                            }
                        }
                    }
                }
                if VNNI {
                    for quarter in 0..4 {
                        let sc = scale32(g + 4 * quarter);
                        for t in 0..N {
                            isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(sb[t][quarter], sc));
                        }
                    }
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(x.d.as_ptr().cast()));
            for t in 0..N {
                let y = a[t].get_unchecked(jb);
                // 32·Σ_j sc[j]·bsums[j]: the −32 of every quant.
                let mut off = _mm256_setzero_si256();
                for p in 0..8 {
                    let b = _mm256_set1_epi32(std::ptr::read_unaligned(y.bsums.as_ptr().add(2 * p).cast::<i32>()));
                    off = if VNNI {
                        _mm256_dpwssd_epi32(off, pairs[p], b)
                    } else {
                        _mm256_add_epi32(off, _mm256_madd_epi16(pairs[p], b))
                    };
                }
                // |isum| ≤ 16·128·(63·127·16 + 32·16·127) < 2²⁹: exact.
                let total = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(off, 5));
                let m = meta[t].get_unchecked(jb);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(dw, _mm256_set1_ps(m.d)), acc[t]);
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }
}

entry_points! {
    q6k: BlockQ6Kx8, BlockQ8K;
}

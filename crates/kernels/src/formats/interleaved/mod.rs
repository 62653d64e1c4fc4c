//! Row-interleaved ("x8") layouts, repacked at load time, and their dot
//! kernels: the [`Interleaved`] trait and the 32-element formats here, Q4_K
//! in `q4k.rs`, Q6_K in `q6k.rs`.
//!
//! Why: in the file's row-major layout a dot product of one weight row ends
//! each 32-element block with float work — convert the block's eight i32
//! partial sums, multiply by `dx·dy` broadcast from two f16 scales, FMA —
//! about as many instructions as the 32 multiply-adds themselves (Q5_0's
//! fifth bits add as many again). Here eight consecutive rows are stored
//! together, four bytes of each row in turn, so a 32-byte load holds four
//! elements of each of the eight rows and the SIMD lanes *are* the rows:
//! multiplied with the token's four matching activation bytes broadcast to
//! every lane, one `maddubs` + `madd` gives each row its partial sum in its
//! own lane. A block ends with one convert, one multiply by eight row scales
//! loaded together and one FMA for all eight rows.
//!
//! Layout of one group of 8 rows × 32 elements (block column `j` of rows
//! `8g..8g+8`), element `e = 4k + b` of row `s` (`k` = chunk 0..8, `b` 0..4):
//! - Q8_0: `qs[32k + 4s + b]`.
//! - Q4_0, Q4_1, Q5_0: the file's nibble bytes, four at a time:
//!   `qs[32m + 4s + b]` is row `s`'s byte `4m + b`, whose low nibble is element
//!   `4m + b` (chunk `m`) and high nibble element `16 + 4m + b` (chunk `m + 4`).
//! - Q5_0's fifth bits: `qh[4s + b]` has bit `k` = the fifth bit of element
//!   `4k + b`, so chunk `k`'s bits are one shift and one mask away.
//! - Scales (and Q4_1's mins): the eight rows' f16 values side by side.
//!
//! Each block's integer sum per row is exact (no overflow: see the bounds at
//! each kernel); then per block and row `acc = fma(Σ, dw·dy, acc)`, in block
//! order (Q4_1's min terms `mw·s` summed apart, added at the end). The
//! scalar reference does exactly these float operations, so the SIMD kernels
//! equal it bit for bit, and a token's result does not depend on how many
//! tokens share the call (the same per-lane operations for N = 1..4): matmul
//! stays batch-invariant.
#![allow(
    clippy::needless_range_loop,
    reason = "SIMD loops index several arrays (registers per token, per step) by one counter"
)]

use super::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ8_0, BlockQ8_1, QK};
use super::{f16_to_f32, simd_level, BlockFormat, SimdLevel};
use bytemuck::{Pod, Zeroable};

/// The SIMD kernels `$name::<N>` of a format as [`Kernels`] (made by
/// `entry_points!`): `simd!(name, vnni)` for a format with an AVX2 and an
/// AVX-512 VNNI kernel; none off x86-64.
macro_rules! simd {
    ($name:ident, vnni) => {{
        #[cfg(target_arch = "x86_64")]
        let k: Kernels<_, _, N> = Kernels { avx2: Some(avx2::$name::<N>), vnni: Some(vnni::$name::<N>) };
        #[cfg(not(target_arch = "x86_64"))]
        let k: Kernels<_, _, N> = Kernels { avx2: None, vnni: None };
        k
    }};
}

/// Rows per interleaved group.
pub const ROWS: usize = 8;

/// A token's activation block as the interleaved kernels use it, computed
/// once per matmul: the scale `d` as f32, `s` (Q8_1's `d·Σq`, f32) and the
/// exact `Σq` (for the `_0` formats' offsets).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ActMeta {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
}

/// A group of 8 rows' block column in a row-interleaved layout.
pub trait Interleaved: Pod + Send + Sync {
    /// The file's block format this layout repacks.
    type Row: BlockFormat;
    /// Interleaves block column `j` of 8 rows.
    fn pack(rows: [&Self::Row; ROWS]) -> Self;
    /// Row `s`'s block back in the file's format.
    fn unpack(&self, s: usize) -> Self::Row;
    /// What the kernels need of one activation block.
    fn meta(a: &<Self::Row as BlockFormat>::Dot) -> ActMeta;

    /// Reference: 8 rows (a row group's blocks `w`) · one token's activation
    /// row `a`.
    fn dot_ref(w: &[Self], a: &[<Self::Row as BlockFormat>::Dot], meta: &[ActMeta]) -> [f32; ROWS];

    /// 8 rows · `N` tokens: `out[t] = dot_ref(w, a[t], meta[t])` bit for bit,
    /// with the best kernel up to `level` that this format has.
    fn dot_at<const N: usize>(
        level: SimdLevel,
        w: &[Self],
        a: [&[<Self::Row as BlockFormat>::Dot]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        let _ = level;
        for t in 0..N {
            out[t] = Self::dot_ref(w, a[t], meta[t]);
        }
    }

    /// [`Interleaved::dot_at`] at the kernels' level ([`simd_level`]).
    #[inline(always)]
    fn dot<const N: usize>(
        w: &[Self],
        a: [&[<Self::Row as BlockFormat>::Dot]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        Self::dot_at(simd_level(), w, a, meta, out)
    }
}

/// The 32-element formats' shared arithmetic: each block's exact integer
/// sum per row, then one float step.
trait ExactSums: Interleaved {
    /// Row `s`'s exact integer sum for this block with activation block `a`
    /// (offsets applied), as the SIMD kernel computes it.
    fn isum_ref(&self, s: usize, a: &<Self::Row as BlockFormat>::Dot) -> i32;
    /// The eight rows' f16 scales.
    fn scales(&self) -> [u16; ROWS];
    /// The float step for one block and row: `acc` updated with the block's
    /// integer sum.
    fn accumulate_ref(&self, s: usize, isum: i32, m: &ActMeta, acc: f32) -> f32 {
        let dw = f16_to_f32(self.scales()[s]);
        (isum as f32).mul_add(dw * m.d, acc)
    }
}

/// `Interleaved::dot_ref` of the formats whose blocks are summed exactly and
/// scaled once.
fn exact_dot_ref<P: ExactSums>(w: &[P], a: &[<P::Row as BlockFormat>::Dot], meta: &[ActMeta]) -> [f32; ROWS] {
    assert!(w.len() == a.len() && w.len() == meta.len(), "interleaved dot: length mismatch");
    let mut acc = [0.0f32; ROWS];
    for ((x, y), m) in w.iter().zip(a).zip(meta) {
        for (s, acc) in acc.iter_mut().enumerate() {
            *acc = x.accumulate_ref(s, x.isum_ref(s, y), m, *acc);
        }
    }
    acc
}

// ---------------------------------------------------------------------------
// The layouts.

/// 8 rows of Q8_0: 272 bytes = 8 × 34.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_0x8 {
    pub d: [u16; ROWS],
    pub qs: [i8; ROWS * QK],
}

/// 8 rows of Q4_0: 144 bytes = 8 × 18.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_0x8 {
    pub d: [u16; ROWS],
    pub qs: [u8; ROWS * QK / 2],
}

/// 8 rows of Q4_1: 160 bytes = 8 × 20.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_1x8 {
    pub d: [u16; ROWS],
    pub m: [u16; ROWS],
    pub qs: [u8; ROWS * QK / 2],
}

/// 8 rows of Q5_0: 176 bytes = 8 × 22.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_0x8 {
    pub d: [u16; ROWS],
    pub qh: [u8; ROWS * 4],
    pub qs: [u8; ROWS * QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0x8>() == ROWS * 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0x8>() == ROWS * 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1x8>() == ROWS * 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0x8>() == ROWS * 22);

/// The file's 16 nibble bytes of 8 rows, four bytes of each row in turn.
fn pack_nibbles(rows: [&[u8; QK / 2]; ROWS]) -> [u8; ROWS * QK / 2] {
    let mut out = [0u8; ROWS * QK / 2];
    for m in 0..4 {
        for (s, row) in rows.iter().enumerate() {
            out[32 * m + 4 * s..32 * m + 4 * s + 4].copy_from_slice(&row[4 * m..4 * m + 4]);
        }
    }
    out
}

/// Row `s`'s 16 nibble bytes back from [`pack_nibbles`].
fn unpack_nibbles(qs: &[u8; ROWS * QK / 2], s: usize) -> [u8; QK / 2] {
    let mut out = [0u8; QK / 2];
    for m in 0..4 {
        out[4 * m..4 * m + 4].copy_from_slice(&qs[32 * m + 4 * s..32 * m + 4 * s + 4]);
    }
    out
}

/// Row `s`'s nibble (0..16) for element `e`.
fn nibble(qs: &[u8; ROWS * QK / 2], s: usize, e: usize) -> i32 {
    let (k, b) = (e / 4, e % 4);
    let byte = qs[32 * (k % 4) + 4 * s + b];
    (if k < 4 { byte & 0x0F } else { byte >> 4 }) as i32
}

/// `Σq` of an activation block: the `_0` formats take their offset out of
/// the integer sum with it.
fn q8_sum(a: &BlockQ8_0) -> i32 {
    a.qs.iter().map(|&q| q as i32).sum()
}

/// Σ q·y over a block for quants given per element.
fn isum_of(q: impl Fn(usize) -> i32, y: &[i8; QK]) -> i32 {
    (0..QK).map(|e| q(e) * y[e] as i32).sum()
}

impl Interleaved for BlockQ8_0x8 {
    type Row = BlockQ8_0;

    fn pack(rows: [&BlockQ8_0; ROWS]) -> Self {
        let mut qs = [0i8; ROWS * QK];
        for k in 0..QK / 4 {
            for (s, row) in rows.iter().enumerate() {
                qs[32 * k + 4 * s..32 * k + 4 * s + 4].copy_from_slice(&row.qs[4 * k..4 * k + 4]);
            }
        }
        BlockQ8_0x8 { d: rows.map(|r| r.d), qs }
    }

    fn unpack(&self, s: usize) -> BlockQ8_0 {
        let mut qs = [0i8; QK];
        for k in 0..QK / 4 {
            qs[4 * k..4 * k + 4].copy_from_slice(&self.qs[32 * k + 4 * s..32 * k + 4 * s + 4]);
        }
        BlockQ8_0 { d: self.d[s], qs }
    }

    fn meta(a: &BlockQ8_0) -> ActMeta {
        // Σy: the VNNI kernel's offset (it multiplies q + 128).
        ActMeta { d: f16_to_f32(a.d), s: 0.0, sum: q8_sum(a) }
    }

    fn dot_ref(w: &[Self], a: &[BlockQ8_0], meta: &[ActMeta]) -> [f32; ROWS] {
        exact_dot_ref(w, a, meta)
    }

    fn dot_at<const N: usize>(
        level: SimdLevel,
        w: &[Self],
        a: [&[BlockQ8_0]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        dispatch(level, w, a, meta, out, simd!(q8_0, vnni))
    }
}

impl ExactSums for BlockQ8_0x8 {
    fn isum_ref(&self, s: usize, a: &BlockQ8_0) -> i32 {
        isum_of(|e| self.qs[32 * (e / 4) + 4 * s + e % 4] as i32, &a.qs)
    }

    fn scales(&self) -> [u16; ROWS] {
        self.d
    }
}

impl Interleaved for BlockQ4_0x8 {
    type Row = BlockQ4_0;

    fn pack(rows: [&BlockQ4_0; ROWS]) -> Self {
        BlockQ4_0x8 { d: rows.map(|r| r.d), qs: pack_nibbles(rows.map(|r| &r.qs)) }
    }

    fn unpack(&self, s: usize) -> BlockQ4_0 {
        BlockQ4_0 { d: self.d[s], qs: unpack_nibbles(&self.qs, s) }
    }

    fn meta(a: &BlockQ8_0) -> ActMeta {
        ActMeta { d: f16_to_f32(a.d), s: 0.0, sum: q8_sum(a) }
    }

    fn dot_ref(w: &[Self], a: &[BlockQ8_0], meta: &[ActMeta]) -> [f32; ROWS] {
        exact_dot_ref(w, a, meta)
    }

    fn dot_at<const N: usize>(
        level: SimdLevel,
        w: &[Self],
        a: [&[BlockQ8_0]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        dispatch(level, w, a, meta, out, simd!(q4_0, vnni))
    }
}

impl ExactSums for BlockQ4_0x8 {
    /// Σ (q − 8)·y = Σ q·y − 8·Σy.
    fn isum_ref(&self, s: usize, a: &BlockQ8_0) -> i32 {
        isum_of(|e| nibble(&self.qs, s, e), &a.qs) - 8 * q8_sum(a)
    }

    fn scales(&self) -> [u16; ROWS] {
        self.d
    }
}

impl Interleaved for BlockQ4_1x8 {
    type Row = BlockQ4_1;

    fn pack(rows: [&BlockQ4_1; ROWS]) -> Self {
        BlockQ4_1x8 { d: rows.map(|r| r.d), m: rows.map(|r| r.m), qs: pack_nibbles(rows.map(|r| &r.qs)) }
    }

    fn unpack(&self, s: usize) -> BlockQ4_1 {
        BlockQ4_1 { d: self.d[s], m: self.m[s], qs: unpack_nibbles(&self.qs, s) }
    }

    fn meta(a: &BlockQ8_1) -> ActMeta {
        ActMeta { d: f16_to_f32(a.d), s: f16_to_f32(a.s), sum: 0 }
    }

    /// Σ (dw q + m)(dy y) = dw dy Σ q y + m s. The min terms go to their own
    /// sum, added at the end, as ggml's Q4_1 dot does: they are large and of
    /// the opposite sign to the rest, so where they are added changes the
    /// rounding noticeably (and this model family is sensitive to it).
    fn dot_ref(w: &[Self], a: &[BlockQ8_1], meta: &[ActMeta]) -> [f32; ROWS] {
        assert!(w.len() == a.len() && w.len() == meta.len(), "interleaved dot: length mismatch");
        let mut acc = [0.0f32; ROWS];
        let mut mins = [0.0f32; ROWS];
        for ((x, y), m) in w.iter().zip(a).zip(meta) {
            for s in 0..ROWS {
                acc[s] = x.accumulate_ref(s, x.isum_ref(s, y), m, acc[s]);
                mins[s] += f16_to_f32(x.m[s]) * m.s;
            }
        }
        std::array::from_fn(|s| acc[s] + mins[s])
    }

    fn dot_at<const N: usize>(
        level: SimdLevel,
        w: &[Self],
        a: [&[BlockQ8_1]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        dispatch(level, w, a, meta, out, simd!(q4_1, vnni))
    }
}

impl ExactSums for BlockQ4_1x8 {
    fn isum_ref(&self, s: usize, a: &BlockQ8_1) -> i32 {
        isum_of(|e| nibble(&self.qs, s, e), &a.qs)
    }

    fn scales(&self) -> [u16; ROWS] {
        self.d
    }
}

impl Interleaved for BlockQ5_0x8 {
    type Row = BlockQ5_0;

    fn pack(rows: [&BlockQ5_0; ROWS]) -> Self {
        let mut qh = [0u8; ROWS * 4];
        for (s, row) in rows.iter().enumerate() {
            let bits = u32::from_le_bytes(row.qh);
            for b in 0..4 {
                qh[4 * s + b] = (0..8).map(|k| (((bits >> (4 * k + b)) & 1) as u8) << k).sum();
            }
        }
        BlockQ5_0x8 { d: rows.map(|r| r.d), qh, qs: pack_nibbles(rows.map(|r| &r.qs)) }
    }

    fn unpack(&self, s: usize) -> BlockQ5_0 {
        let mut bits = 0u32;
        for b in 0..4 {
            for k in 0..8 {
                bits |= (((self.qh[4 * s + b] >> k) & 1) as u32) << (4 * k + b);
            }
        }
        BlockQ5_0 { d: self.d[s], qh: bits.to_le_bytes(), qs: unpack_nibbles(&self.qs, s) }
    }

    fn meta(a: &BlockQ8_0) -> ActMeta {
        ActMeta { d: f16_to_f32(a.d), s: 0.0, sum: q8_sum(a) }
    }

    fn dot_ref(w: &[Self], a: &[BlockQ8_0], meta: &[ActMeta]) -> [f32; ROWS] {
        exact_dot_ref(w, a, meta)
    }

    fn dot_at<const N: usize>(
        level: SimdLevel,
        w: &[Self],
        a: [&[BlockQ8_0]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        dispatch(level, w, a, meta, out, simd!(q5_0, vnni))
    }
}

impl ExactSums for BlockQ5_0x8 {
    /// Σ (q − 16)·y = Σ q·y − 16·Σy, q the 5-bit quant.
    fn isum_ref(&self, s: usize, a: &BlockQ8_0) -> i32 {
        let q = |e: usize| nibble(&self.qs, s, e) | (((self.qh[4 * s + e % 4] >> (e / 4)) & 1) as i32) << 4;
        isum_of(q, &a.qs) - 16 * q8_sum(a)
    }

    fn scales(&self) -> [u16; ROWS] {
        self.d
    }
}

/// A SIMD kernel of this module's shape.
type Kernel<P, A, const N: usize> = unsafe fn(&[P], [&[A]; N], [&[ActMeta]; N], &mut [[f32; ROWS]; N]);

/// A format's SIMD kernels, one per level it has.
struct Kernels<P, A, const N: usize> {
    avx2: Option<Kernel<P, A, N>>,
    vnni: Option<Kernel<P, A, N>>,
}

/// Runs the best of `kernels` that `level` allows (levels above what the CPU
/// has fall back to what it has), the reference when there is none.
#[inline(always)]
fn dispatch<P: Interleaved, const N: usize>(
    level: SimdLevel,
    w: &[P],
    a: [&[<P::Row as BlockFormat>::Dot]; N],
    meta: [&[ActMeta]; N],
    out: &mut [[f32; ROWS]; N],
    kernels: Kernels<P, <P::Row as BlockFormat>::Dot, N>,
) {
    for t in 0..N {
        assert!(w.len() == a[t].len() && w.len() == meta[t].len(), "interleaved dot: length mismatch");
    }
    let level = level.min(SimdLevel::detected());
    let kernel = match level {
        SimdLevel::Avx512Vnni => kernels.vnni.or(kernels.avx2),
        SimdLevel::Avx2 => kernels.avx2,
        SimdLevel::Scalar => None,
    };
    match kernel {
        // SAFETY: the CPU has the features of `level` (capped by what was
        // detected just above), and the lengths the kernel relies on were
        // checked above.
        Some(k) => unsafe { k(w, a, meta, out) },
        None => {
            for t in 0..N {
                out[t] = P::dot_ref(w, a[t], meta[t]);
            }
        }
    }
}

/// The SIMD kernels, each written once as a body generic over `VNNI`; the
/// macro `entry_points!` makes an AVX2 + FMA + F16C (`avx2::NAME`) and an
/// AVX-512 VNNI (`vnni::NAME`) function of each. Per block, each token's
/// eight rows' exact integer sums in the eight i32 lanes, then the float
/// step of `accumulate_ref` in lanes; the weight block is decoded once for
/// all `N` tokens. The two instruction sets differ only in how a chunk's
/// products are summed: AVX2 with `maddubs` into i16 pairs (a few chunks
/// added in i16 where the bounds allow, then `madd` to i32), VNNI with one
/// `vpdpbusd` straight into i32, its activation operand broadcast from
/// memory. The integers are the same, so are the results.
#[cfg(target_arch = "x86_64")]
mod body {
    use super::*;
    use std::arch::x86_64::*;

    /// 32 bytes from `p`.
    #[inline(always)]
    pub(super) unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.cast())
    }

    /// Activation bytes `at..at + 4` of `y` in every 32-bit lane.
    #[inline(always)]
    pub(super) unsafe fn chunk(y: &[i8], at: usize) -> __m256i {
        debug_assert!(at + 4 <= y.len());
        _mm256_set1_epi32(std::ptr::read_unaligned(y.as_ptr().add(at).cast::<i32>()))
    }

    /// Pairs of i16 → i32 lanes (lane s = row s).
    #[inline(always)]
    unsafe fn widen(p: __m256i) -> __m256i {
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// The eight rows' f16 values as f32.
    #[inline(always)]
    unsafe fn halves(h: &[u16; ROWS]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()))
    }

    /// `acc = fma(isum, dw·dy, acc)` in every lane: `accumulate_ref`.
    #[inline(always)]
    unsafe fn scale_add(isum: __m256i, dw: __m256, m: &ActMeta, acc: __m256) -> __m256 {
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(m.d)), acc)
    }

    /// The nibble vectors of a block in chunk order: chunk `m` (low
    /// nibbles) then chunk `m + 4` (high nibbles), each byte one row's quant.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8; ROWS * QK / 2]) -> [__m256i; 8] {
        let mask = _mm256_set1_epi8(0x0F);
        let mut u = [_mm256_setzero_si256(); 8];
        for m in 0..4 {
            let v = _mm256_loadu_si256(qs.as_ptr().add(32 * m).cast());
            u[m] = _mm256_and_si256(v, mask);
            u[m + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        }
        u
    }

    /// `Σ_k u[k]·y[chunk k]` in i32 lanes for unsigned quants `u` ≤ `MAX`.
    #[inline(always)]
    unsafe fn isum8<const VNNI: bool, const MAX: i32>(u: &[__m256i; 8], y: &[i8; QK]) -> __m256i {
        if VNNI {
            // Two chains, so consecutive `vpdpbusd`s do not wait on each other.
            let mut a = _mm256_setzero_si256();
            let mut b = _mm256_setzero_si256();
            for k in (0..8).step_by(2) {
                a = _mm256_dpbusd_epi32(a, u[k], chunk(y, 4 * k));
                b = _mm256_dpbusd_epi32(b, u[k + 1], chunk(y, 4 * k + 4));
            }
            _mm256_add_epi32(a, b)
        } else {
            // Each `maddubs` pair is ≤ 2·MAX·127; as many chunks as stay
            // under 2¹⁵ are summed in i16 before widening: all eight for
            // MAX = 15 (≤ 30480), four for MAX = 31 (≤ 31496).
            let per = if 16 * MAX * 127 < 1 << 15 { 8 } else { 4 };
            let mut total = _mm256_setzero_si256();
            for g in (0..8).step_by(per) {
                let mut p = _mm256_setzero_si256();
                for k in g..g + per {
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(u[k], chunk(y, 4 * k)));
                }
                total = _mm256_add_epi32(total, widen(p));
            }
            total
        }
    }

    /// # Safety
    /// The features of the instruction set (see `entry_points!`); `a[t]`
    /// and `meta[t]` as long as `w`.
    #[inline(always)]
    pub(super) unsafe fn q8_0<const N: usize, const VNNI: bool>(
        w: &[BlockQ8_0x8],
        a: [&[BlockQ8_0]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        for (j, x) in w.iter().enumerate() {
            let dw = halves(&x.d);
            let q = |k: usize| _mm256_loadu_si256(x.qs.as_ptr().add(32 * k).cast());
            if VNNI {
                // The signed quants made unsigned (q + 128): `vpdpbusd` wants
                // its first factor unsigned and its broadcast one signed. The
                // extra 128·Σy is taken off once per block.
                let bias = _mm256_set1_epi8(-128);
                let u: [__m256i; 8] = std::array::from_fn(|k| _mm256_xor_si256(q(k), bias));
                for t in 0..N {
                    let m = meta[t].get_unchecked(j);
                    // |Σ| ≤ 32·255·127 < 2²¹: exact.
                    let isum = _mm256_sub_epi32(
                        isum8::<true, 255>(&u, &a[t].get_unchecked(j).qs),
                        _mm256_set1_epi32(128 * m.sum),
                    );
                    acc[t] = scale_add(isum, dw, m, acc[t]);
                }
            } else {
                let mut isum = [_mm256_setzero_si256(); N];
                for k in 0..QK / 4 {
                    let q = q(k);
                    let abs = _mm256_sign_epi8(q, q);
                    for t in 0..N {
                        // |q|·(±y): each pair ≤ 2·127·127 < 2¹⁵ (our Q8
                        // quantizers never produce −128), widened every chunk.
                        let y = _mm256_sign_epi8(chunk(&a[t].get_unchecked(j).qs, 4 * k), q);
                        isum[t] = _mm256_add_epi32(isum[t], widen(_mm256_maddubs_epi16(abs, y)));
                    }
                }
                for t in 0..N {
                    acc[t] = scale_add(isum[t], dw, meta[t].get_unchecked(j), acc[t]);
                }
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }

    /// # Safety
    /// As [`q8_0`].
    #[inline(always)]
    pub(super) unsafe fn q4_0<const N: usize, const VNNI: bool>(
        w: &[BlockQ4_0x8],
        a: [&[BlockQ8_0]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        for (j, x) in w.iter().enumerate() {
            let u = nibbles(&x.qs);
            let dw = halves(&x.d);
            for t in 0..N {
                let m = meta[t].get_unchecked(j);
                let isum =
                    _mm256_sub_epi32(isum8::<VNNI, 15>(&u, &a[t].get_unchecked(j).qs), _mm256_set1_epi32(8 * m.sum));
                acc[t] = scale_add(isum, dw, m, acc[t]);
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }

    /// # Safety
    /// As [`q8_0`].
    #[inline(always)]
    pub(super) unsafe fn q4_1<const N: usize, const VNNI: bool>(
        w: &[BlockQ4_1x8],
        a: [&[BlockQ8_1]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut mins = [_mm256_setzero_ps(); N];
        for (j, x) in w.iter().enumerate() {
            let u = nibbles(&x.qs);
            let (dw, mw) = (halves(&x.d), halves(&x.m));
            for t in 0..N {
                let m = meta[t].get_unchecked(j);
                acc[t] = scale_add(isum8::<VNNI, 15>(&u, &a[t].get_unchecked(j).qs), dw, m, acc[t]);
                mins[t] = _mm256_add_ps(mins[t], _mm256_mul_ps(mw, _mm256_set1_ps(m.s)));
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), _mm256_add_ps(acc[t], mins[t]));
        }
    }

    /// Chunk `k`'s fifth bits as 0x10 per byte: bit `k` of each byte of `qh`
    /// moved to bit 4. The 16-bit shifts carry bits across bytes, but only
    /// into positions the mask clears (a shift by at most 4).
    #[inline(always)]
    unsafe fn fifth(qh: __m256i, k: usize) -> __m256i {
        let v = match k {
            0 => _mm256_slli_epi16(qh, 4),
            1 => _mm256_slli_epi16(qh, 3),
            2 => _mm256_slli_epi16(qh, 2),
            3 => _mm256_slli_epi16(qh, 1),
            4 => qh,
            5 => _mm256_srli_epi16(qh, 1),
            6 => _mm256_srli_epi16(qh, 2),
            _ => _mm256_srli_epi16(qh, 3),
        };
        _mm256_and_si256(v, _mm256_set1_epi8(0x10))
    }

    /// # Safety
    /// As [`q8_0`].
    #[inline(always)]
    pub(super) unsafe fn q5_0<const N: usize, const VNNI: bool>(
        w: &[BlockQ5_0x8],
        a: [&[BlockQ8_0]; N],
        meta: [&[ActMeta]; N],
        out: &mut [[f32; ROWS]; N],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        for (j, x) in w.iter().enumerate() {
            let mut u = nibbles(&x.qs);
            let qh = _mm256_loadu_si256(x.qh.as_ptr().cast());
            for (k, u) in u.iter_mut().enumerate() {
                *u = _mm256_or_si256(*u, fifth(qh, k));
            }
            let dw = halves(&x.d);
            for t in 0..N {
                let m = meta[t].get_unchecked(j);
                let isum =
                    _mm256_sub_epi32(isum8::<VNNI, 31>(&u, &a[t].get_unchecked(j).qs), _mm256_set1_epi32(16 * m.sum));
                acc[t] = scale_add(isum, dw, m, acc[t]);
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }
}

/// `mod avx2` and `mod vnni`, each with one `#[target_feature]` function per
/// `name: Layout, Activation;` that runs `body::name::<N, VNNI>` compiled for
/// that instruction set (what `simd!` picks from).
macro_rules! entry_points {
    ($($name:ident: $P:ty, $A:ty;)*) => {
        /// AVX2 + FMA + F16C.
        #[cfg(target_arch = "x86_64")]
        mod avx2 {
            use super::*;
            $(
                /// # Safety
                /// AVX2, FMA and F16C; `a[t]` and `meta[t]` as long as `w`.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub(in crate::formats::interleaved) unsafe fn $name<const N: usize>(
                    w: &[$P],
                    a: [&[$A]; N],
                    meta: [&[ActMeta]; N],
                    out: &mut [[f32; ROWS]; N],
                ) {
                    body::$name::<N, false>(w, a, meta, out)
                }
            )*
        }

        /// AVX-512 VNNI on 256-bit vectors (with AVX-512's 32 registers).
        #[cfg(target_arch = "x86_64")]
        mod vnni {
            use super::*;
            $(
                /// # Safety
                /// AVX2, FMA, F16C, AVX-512 F/BW/VL and VNNI; `a[t]` and
                /// `meta[t]` as long as `w`.
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
                pub(in crate::formats::interleaved) unsafe fn $name<const N: usize>(
                    w: &[$P],
                    a: [&[$A]; N],
                    meta: [&[ActMeta]; N],
                    out: &mut [[f32; ROWS]; N],
                ) {
                    body::$name::<N, true>(w, a, meta, out)
                }
            )*
        }
    };
}

entry_points! {
    q8_0: BlockQ8_0x8, BlockQ8_0;
    q4_0: BlockQ4_0x8, BlockQ8_0;
    q4_1: BlockQ4_1x8, BlockQ8_1;
    q5_0: BlockQ5_0x8, BlockQ8_0;
}

mod q4k;
mod q6k;
pub use q4k::BlockQ4Kx8;
pub use q6k::BlockQ6Kx8;

// ---------------------------------------------------------------------------
// Whole matrices.

/// Repacks a row-major matrix of `rows` (a multiple of 8) rows of
/// `blocks_per_row` blocks into row groups: group `g`'s block column `j` at
/// `out[g * blocks_per_row + j]`.
pub fn pack_matrix<P: Interleaved>(rows: &[P::Row], blocks_per_row: usize, out: &mut [P]) {
    assert!(blocks_per_row > 0 && rows.len() % (ROWS * blocks_per_row) == 0, "pack_matrix: not whole row groups");
    assert_eq!(out.len(), rows.len() / ROWS, "pack_matrix: output size");
    for (g, dst) in out.chunks_exact_mut(blocks_per_row).enumerate() {
        let base = g * ROWS * blocks_per_row;
        for (j, d) in dst.iter_mut().enumerate() {
            *d = P::pack(std::array::from_fn(|s| &rows[base + s * blocks_per_row + j]));
        }
    }
}

/// Row `r` of a packed matrix back in the file's format.
pub fn unpack_row<P: Interleaved>(packed: &[P], blocks_per_row: usize, r: usize, out: &mut [P::Row]) {
    assert_eq!(out.len(), blocks_per_row, "unpack_row: output size");
    let group = &packed[(r / ROWS) * blocks_per_row..(r / ROWS + 1) * blocks_per_row];
    for (o, b) in out.iter_mut().zip(group) {
        *o = b.unpack(r % ROWS);
    }
}

/// Whether `ty` has a row-interleaved layout here.
pub fn has_layout(ty: crate::GgmlType) -> bool {
    #[allow(clippy::extra_unused_type_parameters, reason = "dispatch_interleaved! names the packed type")]
    fn yes<P: Interleaved>() -> bool {
        true
    }
    crate::dispatch_interleaved!(ty, yes(), false)
}

/// Calls `$f::<PackedType>($args)` for a type with an interleaved layout;
/// `$other` for the rest.
#[macro_export]
macro_rules! dispatch_interleaved {
    ($ty:expr, $f:ident ( $($args:expr),* ), $other:expr) => {{
        use $crate::formats::interleaved::*;
        use $crate::GgmlType as T;
        match $ty {
            T::Q4_0 => $f::<BlockQ4_0x8>($($args),*),
            T::Q4_1 => $f::<BlockQ4_1x8>($($args),*),
            T::Q5_0 => $f::<BlockQ5_0x8>($($args),*),
            T::Q8_0 => $f::<BlockQ8_0x8>($($args),*),
            T::Q4_K => $f::<BlockQ4Kx8>($($args),*),
            T::Q6_K => $f::<BlockQ6Kx8>($($args),*),
            _ => $other,
        }
    }};
}

//! Block formats and the dispatch over them.
//!
//! Every format is a `#[repr(C)]` block type implementing [`BlockFormat`]:
//! a scalar reference (`dequantize`, `vec_dot_ref`) and the fast `vec_dot`
//! (AVX2+FMA when the CPU has it, detected at run time; the reference
//! otherwise). Weights are multiplied with activations quantized to the
//! format's `Dot` block type, as llama.cpp does (Q8_0/Q8_1 for the 32-element
//! formats, Q8_K for the k-quants, f32 for the float formats).
//!
//! - `float`: F32, F16, BF16
//! - `legacy`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the activation blocks Q8_0, Q8_1
//! - `kquants`: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, and the activation block Q8_K
//! - `interleaved`: Q4_0, Q4_1, Q5_0, Q4_K, Q6_K and Q8_0 repacked at load
//!   into 8-row interleaved tiles, with their own AVX2 and AVX-512 VNNI
//!   kernels beside scalar references
//! - [`f16_to_f32`]: the one f16 → f32 conversion the block scales use

mod fit;
pub mod float;
pub mod interleaved;
pub mod kquants;
pub mod legacy;

use crate::GgmlType;

/// An activation block: what f32 activations are quantized to before a dot
/// product with a weight format.
pub trait ActBlock: bytemuck::Pod + Send + Sync {
    /// Elements per block.
    const BLOCK: usize;
    /// Quantizes `x` (`x.len() == out.len() * BLOCK`).
    fn quantize(x: &[f32], out: &mut [Self]);

    /// The block's scale and sum term as f32 (`(d, s)`; `s` is 0 where the
    /// format has none), for [`GroupScales`]. Formats whose kernels do not
    /// use them keep the default.
    fn scales_f32(&self) -> (f32, f32) {
        (0.0, 0.0)
    }
}

/// The activation scales of up to four tokens at one block position,
/// converted to f32 once per matmul: `d[t]` and `s[t]` of token t, zeros
/// past the group's size. A multi-row kernel loads a whole group's scales
/// in one instruction instead of gathering and converting four f16 halves
/// for every weight row it meets them with.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupScales {
    pub d: [f32; 4],
    pub s: [f32; 4],
}

/// `out[i]` = the scales of `rows` (≤ 4 activation rows of equal length)
/// at block i.
pub fn group_scales<A: ActBlock>(rows: &[&[A]], out: &mut Vec<GroupScales>) {
    assert!(rows.len() <= 4, "group_scales: at most four rows");
    let n_blocks = rows.first().map_or(0, |r| r.len());
    out.clear();
    out.extend((0..n_blocks).map(|i| {
        let mut g = GroupScales::default();
        for (t, row) in rows.iter().enumerate() {
            (g.d[t], g.s[t]) = row[i].scales_f32();
        }
        g
    }));
}

/// A weight block format.
pub trait BlockFormat: bytemuck::Pod + Send + Sync {
    const TYPE: GgmlType;
    /// Elements per block.
    const BLOCK: usize;
    /// The activation block this format is multiplied with; its BLOCK divides
    /// or equals Self::BLOCK so a row of whole weight blocks is a row of whole
    /// activation blocks.
    type Dot: ActBlock;
    /// Reference dequantization (`out.len() == blocks.len() * BLOCK`).
    fn dequantize(blocks: &[Self], out: &mut [f32]);
    /// Reference dot product of one row of weight blocks with activations
    /// covering the same elements.
    fn vec_dot_ref(w: &[Self], a: &[Self::Dot]) -> f32;
    /// The fast dot product: SIMD where available, else the reference.
    fn vec_dot(w: &[Self], a: &[Self::Dot]) -> f32 {
        Self::vec_dot_ref(w, a)
    }
    /// One weight row against `N` activation rows: `out[t] = vec_dot(w, a[t])`
    /// **bit for bit**, for every `t`. Formats override it to decode each
    /// weight block once and apply it to all `N` rows; an override must keep
    /// `vec_dot`'s per-block operations, accumulators and final horizontal
    /// sum for each row, so a token's result never depends on which other
    /// tokens share its batch (batch invariance; `tests/multi_dot.rs`).
    ///
    /// `scales` holds [`group_scales`] of `a` (one per block); formats that
    /// do not need them ignore it.
    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[Self::Dot]; N], scales: &[GroupScales], out: &mut [f32; N]) {
        let _ = scales;
        for (o, a) in out.iter_mut().zip(a) {
            *o = Self::vec_dot(w, a);
        }
    }
}

/// Error for byte slices that do not hold whole, aligned blocks.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LayoutError(pub String);

/// Reinterprets bytes as blocks, checking length and alignment.
pub fn cast_blocks<B: bytemuck::Pod>(bytes: &[u8]) -> Result<&[B], LayoutError> {
    bytemuck::try_cast_slice(bytes).map_err(|e| {
        LayoutError(format!(
            "{} bytes at {:p} are not whole aligned blocks of {} bytes: {e:?}",
            bytes.len(),
            bytes.as_ptr(),
            std::mem::size_of::<B>()
        ))
    })
}

/// Calls `$f::<BlockType>($args)` for the block type of a `GgmlType`;
/// evaluates `$other` for types that are not weight formats.
#[macro_export]
macro_rules! dispatch_format {
    ($ty:expr, $f:ident ( $($args:expr),* ), $other:expr) => {{
        use $crate::formats::{float::*, kquants::*, legacy::*};
        use $crate::GgmlType as T;
        match $ty {
            T::F32 => $f::<BlockF32>($($args),*),
            T::F16 => $f::<BlockF16>($($args),*),
            T::BF16 => $f::<BlockBF16>($($args),*),
            T::Q4_0 => $f::<BlockQ4_0>($($args),*),
            T::Q4_1 => $f::<BlockQ4_1>($($args),*),
            T::Q5_0 => $f::<BlockQ5_0>($($args),*),
            T::Q5_1 => $f::<BlockQ5_1>($($args),*),
            T::Q8_0 => $f::<BlockQ8_0>($($args),*),
            T::Q2_K => $f::<BlockQ2K>($($args),*),
            T::Q3_K => $f::<BlockQ3K>($($args),*),
            T::Q4_K => $f::<BlockQ4K>($($args),*),
            T::Q5_K => $f::<BlockQ5K>($($args),*),
            T::Q6_K => $f::<BlockQ6K>($($args),*),
            _ => $other,
        }
    }};
}

fn dequantize_generic<B: BlockFormat>(src: &[u8], dst: &mut [f32]) -> Result<(), LayoutError> {
    let blocks = cast_blocks::<B>(src)?;
    if blocks.len() * B::BLOCK != dst.len() {
        return Err(LayoutError(format!(
            "{} blocks of {} hold {} elements, destination has {}",
            blocks.len(),
            B::TYPE,
            blocks.len() * B::BLOCK,
            dst.len()
        )));
    }
    B::dequantize(blocks, dst);
    Ok(())
}

/// Dequantizes the bytes of whole blocks of type `ty` into `dst`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), LayoutError> {
    dispatch_format!(
        ty,
        dequantize_generic(src, dst),
        Err(LayoutError(format!("{ty} is not a weight format minnow can dequantize")))
    )
}

/// Whether `ty` is a weight format the kernels can multiply with.
pub fn is_supported_weight(ty: GgmlType) -> bool {
    #[allow(clippy::extra_unused_type_parameters, reason = "dispatch_format! names the block type")]
    fn yes<B: BlockFormat>() -> bool {
        true
    }
    dispatch_format!(ty, yes(), false)
}

/// Whether the AVX2 + FMA + F16C kernels may run: the CPU has all three
/// (every SIMD kernel of this crate needs them) and `MINNOW_SIMD` does not
/// cap the level below AVX2. **The one dispatch question** every kernel
/// asks (through this, or [`simd_level`] where AVX-512 variants exist), so
/// `MINNOW_SIMD=scalar` runs everything on the scalar references. Costs an
/// atomic load once the level is known.
#[inline(always)]
pub(crate) fn has_avx2_fma() -> bool {
    simd_level() >= SimdLevel::Avx2
}

/// What the CPU itself offers, ignoring `MINNOW_SIMD` (for [`SimdLevel::detected`]).
fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instruction sets the integer dot kernels choose between, in order.
///
/// Every level computes the same exact integer sums and the same float
/// operations, so results are bit for bit the same whichever runs; a higher
/// level only needs fewer instructions (AVX-512 VNNI's `vpdpbusd` multiplies
/// unsigned by signed bytes and adds groups of four into i32 lanes in one
/// instruction, where AVX2 needs `maddubs`, `madd` and an add, and its
/// EVEX encoding broadcasts the activation bytes from memory for free).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The above plus AVX-512 F/BW/VL and VNNI, used on 256-bit vectors.
    Avx512Vnni,
}

impl SimdLevel {
    /// The best level this CPU supports (detected once).
    pub fn detected() -> SimdLevel {
        static DETECTED: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Self::detect)
    }

    fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if !cpu_has_avx2_fma() {
                return SimdLevel::Scalar;
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                return SimdLevel::Avx512Vnni;
            }
            SimdLevel::Avx2
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            SimdLevel::Scalar
        }
    }

    /// Every level this CPU can run, lowest first (for tests that hold the
    /// kernels of each level to the same results).
    pub fn available() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni]
            .into_iter()
            .filter(|&l| l <= SimdLevel::detected())
            .collect()
    }
}

impl SimdLevel {
    /// A level named as `MINNOW_SIMD` takes it: `scalar`, `avx2` or `avx512`.
    pub fn from_name(name: &str) -> Option<SimdLevel> {
        match name {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" => Some(SimdLevel::Avx512Vnni),
            _ => None,
        }
    }
}

/// The level the interleaved and Q6_K kernels use: the detected one, capped
/// by the environment variable `MINNOW_SIMD` (`scalar`, `avx2` or `avx512`)
/// when set, so a benchmark can compare levels on one machine. Read once; a
/// value that names no level caps nothing (the `minnow` binary refuses such
/// a value at start with a clear error).
pub fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("MINNOW_SIMD").ok().and_then(|v| SimdLevel::from_name(&v));
        SimdLevel::detected().min(cap.unwrap_or(SimdLevel::Avx512Vnni))
    })
}

/// Converts raw f16 bits (how the blocks store their scales) to f32, exactly.
///
/// Written out rather than calling `half`, whose conversion is an
/// out-of-line call behind a run-time CPU check: twice per super-block that
/// was a measurable share of the SIMD kernels' time. Normal values only
/// need the exponent re-biased (15 → 127); subnormals (< 2^-14) are
/// `mantissa * 2^-24`, done via an exact int→float conversion so no f32
/// denormal ever reaches a multiply; inf/NaN keep their payload.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let em = (h & 0x7fff) as u32;
    let mag = if em < 0x0400 {
        (em as f32 * (1.0 / 16_777_216.0)).to_bits()
    } else if em < 0x7c00 {
        (em << 13) + ((127 - 15) << 23)
    } else {
        (em << 13) | 0x7f80_0000
    };
    f32::from_bits(sign | mag)
}

//! Quantize on write: f32 values to the block formats minnow can produce,
//! for tools that write model files (requantizing, upcycling), plus exact
//! rescaling of already-quantized tensors.
//!
//! - [`quantize`] / [`quantize_to_vec`]: f32 → F32, F16, BF16, Q4_0, Q4_1,
//!   Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K bytes, with the
//!   formats' own quantizers; [`can_quantize`] says which types work.
//! - [`QuantizeOnWrite`]: the same as a method on [`GgufWriter`], which
//!   cannot do it itself: the gguf crate knows block *geometry* but not
//!   block *contents*, and depends on nothing, while this crate depends on it.
//! - [`scale_in_place`]: multiplies a quantized tensor's values by a factor
//!   by rescaling each block's f16 scale (and min), leaving the quants alone:
//!   exact for powers of two, where dequantize → multiply → requantize would
//!   add a second rounding of every weight.

use crate::formats::{float::*, kquants::*, legacy::*, LayoutError};
use crate::GgmlType;
use bytemuck::Pod;
use minnow_gguf::{GgufError, GgufWriter};

/// A block format with an encoder from f32.
trait Encode: Pod {
    /// Elements per block.
    const BLOCK: usize;
    fn encode(x: &[f32], out: &mut [Self]);
}

macro_rules! encode_with {
    ($($block:ty => $n:expr),* $(,)?) => {$(
        impl Encode for $block {
            const BLOCK: usize = $n;
            fn encode(x: &[f32], out: &mut [Self]) {
                <$block>::quantize(x, out)
            }
        }
    )*};
}
encode_with!(
    BlockF16 => 1, BlockBF16 => 1,
    BlockQ4_0 => QK, BlockQ4_1 => QK, BlockQ5_0 => QK, BlockQ5_1 => QK, BlockQ8_0 => QK,
    BlockQ2K => QK_K, BlockQ3K => QK_K, BlockQ4K => QK_K, BlockQ5K => QK_K, BlockQ6K => QK_K,
);

impl Encode for BlockF32 {
    const BLOCK: usize = 1;
    fn encode(x: &[f32], out: &mut [Self]) {
        out.copy_from_slice(bytemuck::cast_slice(x));
    }
}

/// Calls `$f::<Block>($args)` for the types [`quantize`] can produce,
/// `$other` for the rest.
macro_rules! dispatch_encode {
    ($ty:expr, $f:ident ( $($args:expr),* ), $other:expr) => {{
        use GgmlType as T;
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

/// Whether [`quantize`] can produce `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    fn yes<B: Encode>() -> bool {
        true
    }
    dispatch_encode!(ty, yes(), false)
}

/// Blocks encoded per step when `dst` is not aligned for the block type and
/// the blocks go through an aligned scratch buffer.
const SCRATCH_BLOCKS: usize = 1024;

fn encode_into<B: Encode>(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), LayoutError> {
    let size = std::mem::size_of::<B>();
    if !src.len().is_multiple_of(B::BLOCK) {
        return Err(LayoutError(format!("{} values are not a whole number of {ty} blocks of {}", src.len(), B::BLOCK)));
    }
    let n_blocks = src.len() / B::BLOCK;
    if dst.len() != n_blocks * size {
        return Err(LayoutError(format!(
            "{} values as {ty} take {} bytes, the destination has {}",
            src.len(),
            n_blocks * size,
            dst.len()
        )));
    }
    // The quantizers would turn NaN or infinity into meaningless quants (or a
    // scale of NaN that poisons the whole block); a float type keeps them.
    if B::BLOCK > 1 {
        if let Some(i) = src.iter().position(|v| !v.is_finite()) {
            return Err(LayoutError(format!("value {i} is {}: {ty} cannot encode it", src[i])));
        }
    }
    match bytemuck::try_cast_slice_mut::<u8, B>(dst) {
        Ok(blocks) => B::encode(src, blocks),
        // A byte buffer need not be aligned for the block's u16/f32 fields.
        Err(_) => {
            let mut scratch = vec![B::zeroed(); SCRATCH_BLOCKS.min(n_blocks)];
            for (x, d) in src.chunks(SCRATCH_BLOCKS * B::BLOCK).zip(dst.chunks_mut(SCRATCH_BLOCKS * size)) {
                let blocks = &mut scratch[..x.len() / B::BLOCK];
                B::encode(x, blocks);
                d.copy_from_slice(bytemuck::cast_slice(blocks));
            }
        }
    }
    Ok(())
}

/// Encodes `src` as `ty` into `dst`, which must be exactly the size of
/// `src.len()` elements of `ty` (`src.len()` a whole number of blocks).
/// Block-quantized types refuse NaN and infinite values.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), LayoutError> {
    dispatch_encode!(
        ty,
        encode_into(ty, src, dst),
        Err(LayoutError(format!(
            "minnow cannot quantize to {ty} (it can to F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
        )))
    )
}

/// [`quantize`] into a new buffer.
pub fn quantize_to_vec(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, LayoutError> {
    let n_bytes = ty.bytes_for(src.len() as u64).ok_or_else(|| {
        LayoutError(format!("{} values are not a whole number of {ty} blocks of {}", src.len(), ty.block_size()))
    })?;
    let mut out = vec![0u8; n_bytes as usize];
    quantize(ty, src, &mut out)?;
    Ok(out)
}

/// [`quantize_to_vec`] with an importance per column (`importance.len()`
/// is the row length; `src` is whole rows): the k-quants (Q2_K..Q6_K) and
/// Q4_0, Q4_1, Q5_0, Q5_1 weigh each element's error by its column's
/// importance when they fit scales; the other types (Q8_0, the floats) have
/// no weighted quantizer and ignore it.
pub fn quantize_weighted_to_vec(ty: GgmlType, src: &[f32], importance: &[f32]) -> Result<Vec<u8>, LayoutError> {
    let row = importance.len();
    if row == 0 || !src.len().is_multiple_of(row) {
        return Err(LayoutError(format!("{} values are not whole rows of {row}", src.len())));
    }
    let Some(encode) = weighted_encoder(ty) else {
        return quantize_to_vec(ty, src);
    };
    let block = ty.block_size();
    if !src.len().is_multiple_of(block) {
        return Err(LayoutError(format!("{} values are not a whole number of {ty} blocks of {block}", src.len())));
    }
    // A floor keeps columns that were never active from being ignored.
    let mean = importance.iter().sum::<f32>() / row as f32;
    let per_elem: Vec<f32> = (0..src.len()).map(|i| importance[i % row].max(1e-3 * mean)).collect();
    Ok(encode(src, &per_elem))
}

/// An importance-weighted encoder: values, one importance per value → bytes.
type WeightedEncoder = fn(&[f32], &[f32]) -> Vec<u8>;

/// The importance-weighted encoder of `ty`, `None` for types that have
/// none: the one list of them.
fn weighted_encoder(ty: GgmlType) -> Option<WeightedEncoder> {
    fn run<B: Pod>(x: &[f32], block: usize, f: impl FnOnce(&mut [B])) -> Vec<u8> {
        let mut out = vec![B::zeroed(); x.len() / block];
        f(&mut out);
        bytemuck::cast_slice(&out).to_vec()
    }
    use GgmlType as T;
    Some(match ty {
        T::Q4_0 => |x, w| run::<BlockQ4_0>(x, QK, |o| BlockQ4_0::quantize_weighted(x, w, o)),
        T::Q4_1 => |x, w| run::<BlockQ4_1>(x, QK, |o| BlockQ4_1::quantize_weighted(x, w, o)),
        T::Q5_0 => |x, w| run::<BlockQ5_0>(x, QK, |o| BlockQ5_0::quantize_weighted(x, w, o)),
        T::Q5_1 => |x, w| run::<BlockQ5_1>(x, QK, |o| BlockQ5_1::quantize_weighted(x, w, o)),
        T::Q2_K => |x, w| run::<BlockQ2K>(x, QK_K, |o| BlockQ2K::quantize_weighted(x, Some(w), o)),
        T::Q3_K => |x, w| run::<BlockQ3K>(x, QK_K, |o| BlockQ3K::quantize_weighted(x, Some(w), o)),
        T::Q4_K => |x, w| run::<BlockQ4K>(x, QK_K, |o| BlockQ4K::quantize_weighted(x, Some(w), o)),
        T::Q5_K => |x, w| run::<BlockQ5K>(x, QK_K, |o| BlockQ5K::quantize_weighted(x, Some(w), o)),
        T::Q6_K => |x, w| run::<BlockQ6K>(x, QK_K, |o| BlockQ6K::quantize_weighted(x, Some(w), o)),
        _ => return None,
    })
}

/// Whether [`quantize_weighted_to_vec`] uses the importance for `ty`.
pub fn is_weighted(ty: GgmlType) -> bool {
    weighted_encoder(ty).is_some()
}

/// Byte offsets, within one block of `ty`, of the f16 fields that every
/// value of the block is proportional to (scale, and min where there is
/// one). `None` for types without such fields (the float types are scaled
/// element by element instead).
fn f16_scale_fields(ty: GgmlType) -> Option<&'static [usize]> {
    use std::mem::offset_of;
    use GgmlType as T;
    Some(match ty {
        T::Q4_0 => &[offset_of!(BlockQ4_0, d)],
        T::Q4_1 => &[offset_of!(BlockQ4_1, d), offset_of!(BlockQ4_1, m)],
        T::Q5_0 => &[offset_of!(BlockQ5_0, d)],
        T::Q5_1 => &[offset_of!(BlockQ5_1, d), offset_of!(BlockQ5_1, m)],
        T::Q8_0 => &[offset_of!(BlockQ8_0, d)],
        // Q2_K, Q4_K, Q5_K: x = d·scale·q − dmin·min; Q3_K, Q6_K: x = d·scale·q
        // with integer sub-block scales.
        T::Q2_K => &[offset_of!(BlockQ2K, d), offset_of!(BlockQ2K, dmin)],
        T::Q3_K => &[offset_of!(BlockQ3K, d)],
        T::Q4_K => &[offset_of!(BlockQ4K, d), offset_of!(BlockQ4K, dmin)],
        T::Q5_K => &[offset_of!(BlockQ5K, d), offset_of!(BlockQ5K, dmin)],
        T::Q6_K => &[offset_of!(BlockQ6K, d)],
        _ => return None,
    })
}

/// Multiplies every value of the tensor `data` (whole blocks of `ty`) by
/// `factor`, in place.
///
/// Quantized blocks have their f16 scale (and min) multiplied and rounded
/// back to f16; the quants are untouched. For a power-of-two factor that is
/// exact unless a scale overflows f16 (an error) or drops below f16's
/// normal range; other factors add one f16 rounding (2⁻¹¹ relative) per
/// block, far below the quantization error itself. F32/F16/BF16 values are
/// multiplied one by one.
pub fn scale_in_place(ty: GgmlType, data: &mut [u8], factor: f32) -> Result<(), LayoutError> {
    if !factor.is_finite() {
        return Err(LayoutError(format!("scale factor {factor} is not finite")));
    }
    let size = ty.type_size();
    if !data.len().is_multiple_of(size) {
        return Err(LayoutError(format!("{} bytes are not whole {ty} blocks of {size} bytes", data.len())));
    }
    let overflow = |v: f32| LayoutError(format!("scaling a {ty} value {v} by {factor} overflows"));
    match ty {
        GgmlType::F32 => {
            for c in data.chunks_exact_mut(4) {
                let v = f32::from_le_bytes(c.try_into().unwrap());
                let s = v * factor;
                if v.is_finite() && !s.is_finite() {
                    return Err(overflow(v));
                }
                c.copy_from_slice(&s.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            let bf = ty == GgmlType::BF16;
            for c in data.chunks_exact_mut(2) {
                let h = u16::from_le_bytes([c[0], c[1]]);
                let v = if bf { half::bf16::from_bits(h).to_f32() } else { half::f16::from_bits(h).to_f32() };
                let s = v * factor;
                let out = if bf { half::bf16::from_f32(s).to_bits() } else { half::f16::from_f32(s).to_bits() };
                let back = if bf { half::bf16::from_bits(out).to_f32() } else { half::f16::from_bits(out).to_f32() };
                if v.is_finite() && !back.is_finite() {
                    return Err(overflow(v));
                }
                c.copy_from_slice(&out.to_le_bytes());
            }
        }
        _ => {
            let fields = f16_scale_fields(ty)
                .ok_or_else(|| LayoutError(format!("{ty} is not a weight format minnow can rescale")))?;
            for block in data.chunks_exact_mut(size) {
                for &o in fields {
                    let v = half::f16::from_bits(u16::from_le_bytes([block[o], block[o + 1]])).to_f32();
                    let s = half::f16::from_f32(v * factor);
                    if v.is_finite() && !s.is_finite() {
                        return Err(overflow(v));
                    }
                    block[o..o + 2].copy_from_slice(&s.to_bits().to_le_bytes());
                }
            }
        }
    }
    Ok(())
}

/// Quantize on write for [`GgufWriter`].
pub trait QuantizeOnWrite {
    /// Adds tensor `name` of ggml `dims` (innermost first) holding `values`
    /// encoded as `ty` (see [`quantize`]). Fails, naming the tensor, when the
    /// element count does not match `dims`, the innermost dimension is not a
    /// whole number of `ty` blocks, `ty` cannot be produced, or a value is
    /// not finite.
    fn add_tensor_quantized(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        values: &[f32],
    ) -> Result<(), GgufError>;
}

impl QuantizeOnWrite for GgufWriter<'_> {
    fn add_tensor_quantized(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        values: &[f32],
    ) -> Result<(), GgufError> {
        let name = name.into();
        let invalid = |msg: String| GgufError::Invalid(format!("tensor '{name}': {msg}"));
        let n: Option<u64> = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        if n != Some(values.len() as u64) {
            return Err(invalid(format!("{dims:?} holds {n:?} elements, {} values given", values.len())));
        }
        // Checked before quantizing so the message is about the shape, not
        // about blocks; add_tensor would refuse it anyway.
        if dims.first().is_some_and(|&d| !d.is_multiple_of(ty.block_size() as u64)) {
            return Err(invalid(format!(
                "innermost dimension {} is not a multiple of the {ty} block size {}",
                dims[0],
                ty.block_size()
            )));
        }
        let bytes = quantize_to_vec(ty, values).map_err(|e| invalid(e.to_string()))?;
        self.add_tensor(name, dims, ty, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_destination_matches_aligned() {
        let x: Vec<f32> = (0..256 * 3).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F32, GgmlType::F16] {
            let aligned = quantize_to_vec(ty, &x).unwrap();
            let mut buf = vec![0u8; aligned.len() + 1];
            quantize(ty, &x, &mut buf[1..]).unwrap();
            assert_eq!(&buf[1..], &aligned[..], "{ty}");
        }
    }
}

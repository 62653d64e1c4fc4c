//! `BlockFormat::vec_dot_multi` (one weight row against several activation
//! rows, each weight block decoded once) must give, for every activation
//! row, exactly the bits `vec_dot` gives for that row alone. That is what
//! keeps `matmul` batch-invariant: a token's output cannot depend on how
//! many other tokens share its batch, nor on where it falls in the groups
//! of four the matmul hands to `vec_dot_multi`.
//!
//! Weight blocks are random bytes (with their f16 scale fields made finite,
//! subnormals included); activations are real quantized random vectors, so
//! they satisfy the activation formats' invariants (no -128, consistent
//! `s` / `bsums`). Row lengths include odd block counts, which exercise the
//! tail of the two-accumulator loops.

use minnow_kernels::formats::interleaved::*;
use minnow_kernels::formats::kquants::*;
use minnow_kernels::formats::legacy::*;
use minnow_kernels::formats::{group_scales, ActBlock, BlockFormat, SimdLevel};
use minnow_kernels::matmul::{matmul, matmul_each, matmul_many, ActBuffer, Layout, Product, QMatrix};
use minnow_kernels::pool::ThreadPool;
use proptest::prelude::*;

/// A small deterministic generator, so one proptest seed drives everything.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Uniform in [-scale, scale), with the odd exact zero.
    fn f32(&mut self, scale: f32) -> f32 {
        if self.next().is_multiple_of(97) {
            return 0.0;
        }
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
}

/// Any f16 bit pattern with inf/NaN replaced by a finite one.
fn finite_f16(bits: u16) -> u16 {
    if bits & 0x7C00 == 0x7C00 {
        bits & !0x4000
    } else {
        bits
    }
}

/// Byte offsets of each format's f16 fields within its block.
trait Weights: BlockFormat {
    const F16_FIELDS: &'static [usize];
}
impl Weights for BlockQ4_0 {
    const F16_FIELDS: &'static [usize] = &[0];
}
impl Weights for BlockQ4_1 {
    const F16_FIELDS: &'static [usize] = &[0, 2];
}
impl Weights for BlockQ5_0 {
    const F16_FIELDS: &'static [usize] = &[0];
}
impl Weights for BlockQ5_1 {
    const F16_FIELDS: &'static [usize] = &[0, 2];
}
impl Weights for BlockQ8_0 {
    const F16_FIELDS: &'static [usize] = &[0];
}
impl Weights for BlockQ2K {
    const F16_FIELDS: &'static [usize] = &[80, 82];
}
impl Weights for BlockQ3K {
    const F16_FIELDS: &'static [usize] = &[108];
}
impl Weights for BlockQ4K {
    const F16_FIELDS: &'static [usize] = &[0, 2];
}
impl Weights for BlockQ5K {
    const F16_FIELDS: &'static [usize] = &[0, 2];
}
impl Weights for BlockQ6K {
    const F16_FIELDS: &'static [usize] = &[208];
}

fn random_weights<B: Weights>(rng: &mut Rng, n_blocks: usize) -> Vec<B> {
    let size = std::mem::size_of::<B>();
    let mut bytes = rng.bytes(n_blocks * size);
    for b in bytes.chunks_exact_mut(size) {
        for &off in B::F16_FIELDS {
            let bits = finite_f16(u16::from_le_bytes([b[off], b[off + 1]]));
            b[off..off + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
    let mut out = vec![bytemuck::Zeroable::zeroed(); n_blocks];
    bytemuck::cast_slice_mut::<B, u8>(&mut out).copy_from_slice(&bytes);
    out
}

/// One activation row of `cols` elements, quantized; each row gets its own
/// magnitude so the rows' scales differ.
fn random_acts<A: ActBlock>(rng: &mut Rng, cols: usize) -> Vec<A> {
    let scale = [1e-3, 0.5, 3.0, 40.0][(rng.next() % 4) as usize];
    let x: Vec<f32> = (0..cols).map(|_| rng.f32(scale)).collect();
    let mut a = vec![bytemuck::Zeroable::zeroed(); cols / A::BLOCK];
    A::quantize(&x, &mut a);
    a
}

/// `vec_dot_multi::<N>` on every window of N of `rows`, compared bit for bit
/// with `vec_dot`.
fn check_n<B: BlockFormat, const N: usize>(w: &[B], rows: &[Vec<B::Dot>], want: &[f32]) {
    for start in 0..=rows.len() - N {
        let a: [&[B::Dot]; N] = std::array::from_fn(|t| rows[start + t].as_slice());
        let mut got = [f32::NAN; N];
        let mut scales = Vec::new();
        group_scales(&a, &mut scales);
        B::vec_dot_multi(w, a, &scales, &mut got);
        for t in 0..N {
            assert_eq!(
                got[t].to_bits(),
                want[start + t].to_bits(),
                "{}: vec_dot_multi::<{N}> row {t} gives {} but vec_dot gives {} ({} blocks)",
                B::TYPE,
                got[t],
                want[start + t],
                w.len()
            );
        }
    }
}

fn check_format<B: Weights>(seed: u64, n_blocks: usize) {
    let mut rng = Rng(seed);
    let w: Vec<B> = random_weights(&mut rng, n_blocks);
    let rows: Vec<Vec<B::Dot>> = (0..5).map(|_| random_acts(&mut rng, n_blocks * B::BLOCK)).collect();
    let want: Vec<f32> = rows.iter().map(|a| B::vec_dot(&w, a)).collect();
    check_n::<B, 4>(&w, &rows, &want);
    check_n::<B, 2>(&w, &rows, &want);
    check_n::<B, 3>(&w, &rows, &want);
    check_n::<B, 1>(&w, &rows, &want);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn q8_0_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..12) {
        check_format::<BlockQ8_0>(seed, n);
    }

    #[test]
    fn q5_0_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..12) {
        check_format::<BlockQ5_0>(seed, n);
    }

    #[test]
    fn q4_k_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..5) {
        check_format::<BlockQ4K>(seed, n);
    }

    #[test]
    fn q6_k_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..5) {
        check_format::<BlockQ6K>(seed, n);
    }

    #[test]
    fn q4_1_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..12) {
        check_format::<BlockQ4_1>(seed, n);
    }

    #[test]
    fn q4_0_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..12) {
        check_format::<BlockQ4_0>(seed, n);
    }

    #[test]
    fn q5_1_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..12) {
        check_format::<BlockQ5_1>(seed, n);
    }

    /// The formats left on the default (N calls of `vec_dot`) too, so an
    /// override added later is held to the same rule.
    #[test]
    fn other_k_quants_multi_is_bit_identical(seed in any::<u64>(), n in 1usize..4) {
        check_format::<BlockQ2K>(seed, n);
        check_format::<BlockQ3K>(seed, n);
        check_format::<BlockQ5K>(seed, n);
    }
}

/// Batch invariance end to end: `matmul` over n tokens gives, for every
/// token, exactly the bits of `matmul` over that token alone, for batch sizes
/// that leave every remainder of the groups of four, with 1 and 3 threads.
fn check_matmul_invariance<B: Weights>(seed: u64, rows: usize, blocks_per_row: usize) {
    let mut rng = Rng(seed);
    let w: Vec<B> = random_weights(&mut rng, rows * blocks_per_row);
    let cols = blocks_per_row * B::BLOCK;
    let m = QMatrix { ty: B::TYPE, rows, cols, data: bytemuck::cast_slice(&w), layout: Layout::RowMajor };
    check_invariance_of(&mut rng, &m);
    if let Some(p) = m.interleave().unwrap() {
        check_invariance_of(&mut rng, &p.q());
    }
}

fn check_invariance_of(rng: &mut Rng, m: &QMatrix) {
    let (rows, cols) = (m.rows, m.cols);
    let n_max = 11;
    let x: Vec<f32> = (0..n_max * cols).map(|_| rng.f32(2.0)).collect();
    for threads in [1, 3] {
        let pool = ThreadPool::new(threads);
        let mut scratch = ActBuffer::default();
        let single: Vec<Vec<f32>> = (0..n_max)
            .map(|t| {
                let mut out = vec![0.0; rows];
                matmul(&pool, m, &x[t * cols..(t + 1) * cols], 1, &mut out, &mut scratch).unwrap();
                out
            })
            .collect();
        for n in 1..=n_max {
            let mut out = vec![0.0; n * rows];
            matmul(&pool, m, &x[..n * cols], n, &mut out, &mut scratch).unwrap();
            for t in 0..n {
                let got: Vec<u32> = out[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                let want: Vec<u32> = single[t].iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{} {:?}: token {t} of {n}, {threads} threads", m.ty, m.layout);
            }
        }
    }
}

#[test]
fn matmul_is_batch_invariant() {
    check_matmul_invariance::<BlockQ8_0>(1, 37, 5);
    check_matmul_invariance::<BlockQ5_0>(2, 37, 5);
    check_matmul_invariance::<BlockQ4_1>(3, 37, 5);
    check_matmul_invariance::<BlockQ4_0>(4, 37, 5);
    // Whole groups of 8 rows: these also run in the interleaved layout.
    check_matmul_invariance::<BlockQ8_0>(11, 40, 5);
    check_matmul_invariance::<BlockQ5_0>(12, 48, 3);
    check_matmul_invariance::<BlockQ4_1>(13, 56, 5);
    check_matmul_invariance::<BlockQ4_0>(14, 40, 1);
    check_matmul_invariance::<BlockQ4K>(15, 40, 2);
    check_matmul_invariance::<BlockQ6K>(16, 48, 2);
    check_matmul_invariance::<BlockQ5_1>(5, 37, 5);
    check_matmul_invariance::<BlockQ4K>(6, 37, 2);
    check_matmul_invariance::<BlockQ6K>(7, 37, 3);
    check_matmul_invariance::<BlockQ5K>(8, 21, 2);
}

// ---------------------------------------------------------------------------
// The 8-row interleaved layouts (`formats::interleaved`): the repacking is
// lossless, the reference agrees with the row-major reference, and the SIMD
// kernel for N = 1..4 tokens gives the reference's bits for every token.

/// `P::dot_at::<N>` at `level` on every window of N of `acts`, bit for bit
/// against `want`.
fn check_interleaved_n<P: Interleaved, const N: usize>(
    level: SimdLevel,
    packed: &[P],
    acts: &[Vec<<P::Row as BlockFormat>::Dot>],
    metas: &[Vec<ActMeta>],
    want: &[[f32; 8]],
) {
    for start in 0..=acts.len() - N {
        let mut got = [[f32::NAN; 8]; N];
        P::dot_at(
            level,
            packed,
            std::array::from_fn(|t| acts[start + t].as_slice()),
            std::array::from_fn(|t| metas[start + t].as_slice()),
            &mut got,
        );
        for t in 0..N {
            let bits = |v: &[f32; 8]| v.map(f32::to_bits);
            assert_eq!(
                bits(&got[t]),
                bits(&want[start + t]),
                "{}: {level:?}, N = {N}, token {}",
                P::Row::TYPE,
                start + t
            );
        }
    }
}

fn check_interleaved<P: Interleaved>(seed: u64, blocks_per_row: usize)
where
    P::Row: Weights,
{
    let mut rng = Rng(seed);
    let w: Vec<P::Row> = random_weights(&mut rng, 8 * blocks_per_row);
    let mut packed = vec![bytemuck::Zeroable::zeroed(); blocks_per_row];
    pack_matrix::<P>(&w, blocks_per_row, &mut packed);
    let mut row = vec![bytemuck::Zeroable::zeroed(); blocks_per_row];
    for r in 0..8 {
        unpack_row::<P>(&packed, blocks_per_row, r, &mut row);
        let want: &[u8] = bytemuck::cast_slice(&w[r * blocks_per_row..(r + 1) * blocks_per_row]);
        assert_eq!(bytemuck::cast_slice::<_, u8>(&row), want, "{}: row {r} round trip", P::Row::TYPE);
    }

    let cols = blocks_per_row * P::Row::BLOCK;
    let acts: Vec<Vec<_>> = (0..6).map(|_| random_acts(&mut rng, cols)).collect();
    let metas: Vec<Vec<ActMeta>> = acts.iter().map(|a| a.iter().map(P::meta).collect()).collect();
    let want: Vec<[f32; 8]> = acts.iter().zip(&metas).map(|(a, m)| P::dot_ref(&packed, a, m)).collect();
    for (a, got) in acts.iter().zip(&want) {
        for (s, &got) in got.iter().enumerate() {
            let wr = &w[s * blocks_per_row..(s + 1) * blocks_per_row];
            let plain = P::Row::vec_dot_ref(wr, a);
            // Same exact integer sums, different float rounding: within a
            // few ulps of the sum of the blocks' magnitudes.
            let mag: f32 = (0..blocks_per_row).map(|j| P::Row::vec_dot_ref(&wr[j..j + 1], &a[j..j + 1]).abs()).sum();
            assert!(
                (got - plain).abs() <= 1e-5 * mag,
                "{}: row {s}: interleaved {got} vs row-major {plain} (magnitude {mag})",
                P::Row::TYPE
            );
            #[cfg(target_arch = "x86_64")]
            if matches!(P::Row::TYPE, minnow_kernels::GgmlType::Q4_K | minnow_kernels::GgmlType::Q6_K)
                && std::arch::is_x86_feature_detected!("avx2")
            {
                // The K-quants' interleaved arithmetic is the row-major SIMD
                // kernel's, to the bit.
                let simd = P::Row::vec_dot(wr, a);
                assert_eq!(got.to_bits(), simd.to_bits(), "{} row {s}: {got} vs row-major {simd}", P::Row::TYPE);
            }
        }
    }
    // Every level this CPU has (each kernel variant), not only the one
    // `dot` would pick.
    for level in SimdLevel::available() {
        check_interleaved_n::<P, 1>(level, &packed, &acts, &metas, &want);
        check_interleaved_n::<P, 2>(level, &packed, &acts, &metas, &want);
        check_interleaved_n::<P, 3>(level, &packed, &acts, &metas, &want);
        check_interleaved_n::<P, 4>(level, &packed, &acts, &metas, &want);
    }
}

#[test]
fn interleaved_layouts_round_trip_and_match_their_reference() {
    for (i, blocks) in [1usize, 2, 7].into_iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        check_interleaved::<BlockQ8_0x8>(seed, blocks);
        check_interleaved::<BlockQ4_0x8>(seed + 1, blocks);
        check_interleaved::<BlockQ4_1x8>(seed + 2, blocks);
        check_interleaved::<BlockQ5_0x8>(seed + 3, blocks);
        check_interleaved::<BlockQ4Kx8>(seed + 4, blocks);
        check_interleaved::<BlockQ6Kx8>(seed + 5, blocks);
    }
}

/// The interleaved matmul against the dequantize-and-f32 reference, and the
/// row-major matmul, on a matrix whose rows are whole groups.
#[test]
fn interleaved_matmul_matches_reference() {
    let mut rng = Rng(77);
    let (rows, blocks) = (24, 4);
    let w: Vec<BlockQ5_0> = random_weights(&mut rng, rows * blocks);
    let cols = blocks * 32;
    let m = QMatrix { ty: BlockQ5_0::TYPE, rows, cols, data: bytemuck::cast_slice(&w), layout: Layout::RowMajor };
    let owned = m.interleave().unwrap().expect("Q5_0 with 24 rows interleaves");
    let p = owned.q();
    let n = 5;
    let x: Vec<f32> = (0..n * cols).map(|_| rng.f32(1.0)).collect();
    let pool = ThreadPool::new(2);
    let mut scratch = ActBuffer::default();
    let (mut a, mut b) = (vec![0.0; n * rows], vec![0.0; n * rows]);
    matmul(&pool, &m, &x, n, &mut a, &mut scratch).unwrap();
    matmul(&pool, &p, &x, n, &mut b, &mut scratch).unwrap();
    let reference = minnow_kernels::matmul::matmul_reference(&p, &x, n).unwrap();
    let reference_rm = minnow_kernels::matmul::matmul_reference(&m, &x, n).unwrap();
    assert_eq!(reference, reference_rm, "row_f32 of the interleaved matrix is the row-major row");
    for i in 0..n * rows {
        let tol = 1e-3 * reference[i].abs().max(1.0);
        assert!((b[i] - a[i]).abs() <= tol, "element {i}: interleaved {} vs row-major {}", b[i], a[i]);
        // Activations are quantized to 8 bits: a few percent of the scale.
        let tol = 0.02 * reference.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!((b[i] - reference[i]).abs() <= tol, "element {i}: {} vs reference {}", b[i], reference[i]);
    }
    let mut row = Vec::new();
    p.copy_row(13, &mut row).unwrap();
    assert_eq!(row, &m.data[13 * m.row_bytes()..14 * m.row_bytes()]);
}

/// `matmul_many` gives each matrix exactly `matmul`'s bits, whatever mix of
/// formats, layouts and row counts shares the call (rows not a multiple of
/// the 16-row tile included), for several batch sizes and thread counts —
/// matrices of one format and layout share one quantization of the
/// activations, here adjacent and not — and refuses mismatched arguments
/// with an error; and `matmul_each` likewise with an input per product.
#[test]
fn matmul_many_matches_separate_matmuls() {
    let mut rng = Rng(4242);
    let cols = 2 * 256;
    let q4k: Vec<BlockQ4K> = random_weights(&mut rng, 40 * 2);
    let q6k: Vec<BlockQ6K> = random_weights(&mut rng, 24 * 2);
    let q8: Vec<BlockQ8_0> = random_weights(&mut rng, 8 * 16);
    let q4k_m =
        QMatrix { ty: BlockQ4K::TYPE, rows: 40, cols, data: bytemuck::cast_slice(&q4k), layout: Layout::RowMajor };
    let q6k_m =
        QMatrix { ty: BlockQ6K::TYPE, rows: 24, cols, data: bytemuck::cast_slice(&q6k), layout: Layout::RowMajor };
    let q8_m =
        QMatrix { ty: BlockQ8_0::TYPE, rows: 8, cols, data: bytemuck::cast_slice(&q8), layout: Layout::RowMajor };
    let q4k_x8 = q4k_m.interleave().unwrap().expect("40 rows interleave");
    let q6k_x8 = q6k_m.interleave().unwrap().expect("24 rows interleave");
    // Second matrices of two (format, layout) pairs already present.
    let q4k_b: Vec<BlockQ4K> = random_weights(&mut rng, 16 * 2);
    let q4k_b_m =
        QMatrix { ty: BlockQ4K::TYPE, rows: 16, cols, data: bytemuck::cast_slice(&q4k_b), layout: Layout::RowMajor };
    let q4k_b_x8 = q4k_b_m.interleave().unwrap().expect("16 rows interleave");
    let q8_b: Vec<BlockQ8_0> = random_weights(&mut rng, 24 * 16);
    let q8_b_m =
        QMatrix { ty: BlockQ8_0::TYPE, rows: 24, cols, data: bytemuck::cast_slice(&q8_b), layout: Layout::RowMajor };
    let ws = [q4k_x8.q(), q4k_m, q6k_x8.q(), q8_m, q8_b_m, q6k_m, q4k_b_x8.q()];
    let ws: Vec<&QMatrix> = ws.iter().collect();
    let x: Vec<f32> = (0..6 * cols).map(|_| rng.f32(2.0)).collect();
    for threads in [1, 2, 3] {
        let pool = ThreadPool::new(threads);
        for n in [1, 2, 5, 6] {
            let x = &x[..n * cols];
            let mut want: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; n * w.rows]).collect();
            let mut scratch = ActBuffer::default();
            for (w, out) in ws.iter().zip(&mut want) {
                matmul(&pool, w, x, n, out, &mut scratch).unwrap();
            }
            let mut got: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; n * w.rows]).collect();
            let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|o| o.as_mut_slice()).collect();
            let mut scratch: Vec<ActBuffer> = (0..ws.len()).map(|_| ActBuffer::default()).collect();
            matmul_many(&pool, x, n, &ws, &mut outs, &mut scratch).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let g: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
                let w: Vec<u32> = w.iter().map(|v| v.to_bits()).collect();
                assert_eq!(g, w, "matrix {i} ({} {:?}), n {n}, {threads} threads", ws[i].ty, ws[i].layout);
            }
        }
    }
    let pool = ThreadPool::new(2);
    let mut one = [0.0; 40];
    let mut scratch = vec![ActBuffer::default()];
    let err = matmul_many(&pool, &x[..cols], 1, &ws[..2], &mut [&mut one[..]], &mut scratch).unwrap_err();
    assert!(err.to_string().contains("2 matrices, 1 outputs"), "{err}");
    let mut short = [0.0; 39];
    let err = matmul_many(&pool, &x[..cols], 1, &ws[..1], &mut [&mut short[..]], &mut scratch).unwrap_err();
    assert!(err.to_string().contains("out has 39"), "{err}");

    // matmul_each: every matrix on its own input (its own row count too),
    // and two pairs on one shared input (one quantization between them),
    // each product exactly matmul's bits.
    for threads in [1, 2, 3] {
        let pool = ThreadPool::new(threads);
        let ns = [1, 3, 2, 5, 5, 1, 6];
        let inputs: Vec<Vec<f32>> = ns.iter().map(|&n| (0..n * cols).map(|_| rng.f32(2.0)).collect()).collect();
        let shared = &x[..5 * cols];
        // Products 3 and 4 (Q8_0, row-major both) share `shared`.
        let input = |i: usize| if i == 3 || i == 4 { shared } else { &inputs[i][..] };
        let mut want: Vec<Vec<f32>> = ws.iter().zip(ns).map(|(w, n)| vec![0.0; n * w.rows]).collect();
        let mut one = ActBuffer::default();
        for (i, (w, out)) in ws.iter().zip(&mut want).enumerate() {
            matmul(&pool, w, input(i), ns[i], out, &mut one).unwrap();
        }
        let mut got: Vec<Vec<f32>> = ws.iter().zip(ns).map(|(w, n)| vec![f32::NAN; n * w.rows]).collect();
        let mut products: Vec<Product> =
            got.iter_mut().enumerate().map(|(i, out)| Product { w: ws[i], x: input(i), n: ns[i], out }).collect();
        let mut scratch: Vec<ActBuffer> = (0..ws.len()).map(|_| ActBuffer::default()).collect();
        matmul_each(&pool, &mut products, &mut scratch).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let g: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
            let w: Vec<u32> = w.iter().map(|v| v.to_bits()).collect();
            assert_eq!(g, w, "product {i} ({} {:?}), n {}, {threads} threads", ws[i].ty, ws[i].layout, ns[i]);
        }
    }
    let mut out = vec![0.0; 40];
    let mut products = [Product { w: ws[0], x: &x[..cols], n: 1, out: &mut out }];
    let err = matmul_each(&pool, &mut products, &mut []).unwrap_err();
    assert!(err.to_string().contains("1 products, 0 scratch buffers"), "{err}");
}

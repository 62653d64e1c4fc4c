//! Microbenchmarks of the hot kernels, so a kernel change shows its effect in
//! isolation: `cargo bench -p minnow-kernels` (a filter narrows it, e.g.
//! `cargo bench -p minnow-kernels -- vec_dot/Q4_K`).
//!
//! - `vec_dot`: one row of 4096 weights · activations, scalar reference and the
//!   fast (SIMD) path, per weight format; throughput in elements.
//! - `matvec`: `matmul` with one activation row on a 896×4864 matrix (Qwen2.5
//!   0.5B's FFN down projection) with a 2-thread pool; throughput in bytes of
//!   weights, comparable with the machine's read bandwidth (though the matrix
//!   may fit in the last-level cache here).
//! - `matmul32`: the same with 32 activation rows (prompt processing);
//!   throughput in multiply-adds.
//! - `matvec_small`: SmolLM2's decode-step products (576 and 1536 wide,
//!   Q4_1), where the fixed cost of each product shows.
//! - `ops`: RMSNorm, RoPE over a layer's query heads, softmax.
//! - `attention`: one decode step's attention in one layer of Qwen2.5 1.5B
//!   (12 query heads of 128 sharing 2 KV heads, f16 cache) at 160 and 1024
//!   cached positions, one thread; throughput in cached positions per head.
//!
//! Weights are random bytes with sane scales; only the speed is measured. Kept
//! short (20 samples, about a second each) so the whole run takes a couple of
//! minutes on two cores.

use bytemuck::Zeroable;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use minnow_kernels::attention::{attend, attend_group, extend_q8_0, AttnScratch, KvLayout, KvRows, MAX_GROUP};
use minnow_kernels::formats::float::BlockF16;
use minnow_kernels::formats::kquants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use minnow_kernels::formats::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ8_0};
use minnow_kernels::formats::{ActBlock, BlockFormat};
use minnow_kernels::matmul::{matmul, ActBuffer, Layout, QMatrix};
use minnow_kernels::ops::{argmax, argmax_ref, rms_norm, softmax_inplace, Rope};
use minnow_kernels::pool::ThreadPool;
use std::hint::black_box;
use std::time::Duration;

/// xorshift64*: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn fill(&mut self, bytes: &mut [u8]) {
        for b in bytes {
            *b = self.next_u64() as u8;
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// A weight format with its name, and how to make random bytes of it a
/// plausible block (finite, small scales, so no NaN or subnormal slow paths).
trait Format: BlockFormat {
    const NAME: &'static str;
    fn sane(&mut self, rng: &mut Rng);
}

macro_rules! weight_format {
    ($ty:ty, $name:literal, |$b:ident, $r:ident| $fix:expr) => {
        impl Format for $ty {
            const NAME: &'static str = $name;
            fn sane(&mut self, $r: &mut Rng) {
                let $b = self;
                $fix;
            }
        }
    };
}

weight_format!(BlockF16, "F16", |b, r| b.0 = f16(r.f32()));
weight_format!(BlockQ4_0, "Q4_0", |b, r| b.d = f16(0.01 + 0.01 * r.f32()));
weight_format!(BlockQ4_1, "Q4_1", |b, r| {
    b.d = f16(0.01 + 0.01 * r.f32());
    b.m = f16(0.05 * r.f32());
});
weight_format!(BlockQ5_0, "Q5_0", |b, r| b.d = f16(0.01 + 0.01 * r.f32()));
weight_format!(BlockQ8_0, "Q8_0", |b, r| b.d = f16(0.001 + 0.001 * r.f32()));
weight_format!(BlockQ2K, "Q2_K", |b, r| {
    b.d = f16(0.01 + 0.01 * r.f32());
    b.dmin = f16(0.01 + 0.01 * r.f32());
});
weight_format!(BlockQ3K, "Q3_K", |b, r| b.d = f16(0.01 + 0.01 * r.f32()));
weight_format!(BlockQ4K, "Q4_K", |b, r| {
    b.d = f16(0.01 + 0.01 * r.f32());
    b.dmin = f16(0.01 + 0.01 * r.f32());
});
weight_format!(BlockQ5K, "Q5_K", |b, r| {
    b.d = f16(0.01 + 0.01 * r.f32());
    b.dmin = f16(0.01 + 0.01 * r.f32());
});
weight_format!(BlockQ6K, "Q6_K", |b, r| b.d = f16(0.01 + 0.01 * r.f32()));

/// `n_elems` weights of format `B` (a whole number of blocks).
fn weights<B: Format>(rng: &mut Rng, n_elems: usize) -> Vec<B> {
    let mut w = vec![B::zeroed(); n_elems / B::BLOCK];
    rng.fill(bytemuck::cast_slice_mut(&mut w));
    for b in &mut w {
        b.sane(rng);
    }
    w
}

/// `x` quantized to the activation blocks `B` is multiplied with.
fn activations<B: Format>(x: &[f32]) -> Vec<B::Dot> {
    let mut a = vec![B::Dot::zeroed(); x.len() / <B::Dot as ActBlock>::BLOCK];
    <B::Dot as ActBlock>::quantize(x, &mut a);
    a
}

const ROW: usize = 4096;

fn vec_dot_one<B: Format>(c: &mut Criterion) {
    let mut rng = Rng(0x5EED_0001);
    let w = weights::<B>(&mut rng, ROW);
    let a = activations::<B>(&rng.vec(ROW));
    let mut g = c.benchmark_group("vec_dot");
    g.throughput(Throughput::Elements(ROW as u64));
    g.bench_function(BenchmarkId::new(B::NAME, "ref"), |b| b.iter(|| B::vec_dot_ref(black_box(&w), black_box(&a))));
    g.bench_function(BenchmarkId::new(B::NAME, "simd"), |b| b.iter(|| B::vec_dot(black_box(&w), black_box(&a))));
    g.finish();
}

/// Qwen2.5 0.5B's FFN down projection: 896 rows of 4864 (a multiple of 256,
/// so every format fits).
const ROWS: usize = 896;
const COLS: usize = 4864;

fn matmul_one<B: Format>(c: &mut Criterion, pool: &ThreadPool) {
    let mut rng = Rng(0x5EED_0002);
    let w = weights::<B>(&mut rng, ROWS * COLS);
    let m = QMatrix { ty: B::TYPE, rows: ROWS, cols: COLS, data: bytemuck::cast_slice(&w), layout: Layout::RowMajor };
    // The 8-row interleaved layout too, where the format has one.
    let owned = m.interleave().expect("whole blocks");
    let interleaved = owned.as_ref().map(|o| o.q());
    let mut scratch = ActBuffer::default();
    for (group, n) in [("matvec", 1usize), ("matmul32", 32)] {
        let x = rng.vec(n * COLS);
        let mut out = vec![0f32; n * ROWS];
        let mut g = c.benchmark_group(group);
        g.sampling_mode(SamplingMode::Flat).measurement_time(Duration::from_millis(1500));
        g.throughput(if n == 1 {
            Throughput::Bytes(m.data.len() as u64)
        } else {
            Throughput::Elements((ROWS * COLS * n) as u64)
        });
        for (name, m) in [(B::NAME.to_string(), Some(&m)), (format!("{}/x8", B::NAME), interleaved.as_ref())] {
            let Some(m) = m else { continue };
            g.bench_function(name, |b| {
                b.iter(|| matmul(pool, m, black_box(&x), n, &mut out, &mut scratch).expect("matmul shapes"))
            });
        }
        g.finish();
    }
}

/// SmolLM2's decode-step products (Q4_1, interleaved, one token, 2 threads):
/// a few microseconds each, so the fixed cost of a product (quantizing the
/// activations, handing the job to the pool) is a visible share of them.
fn small_matvecs(c: &mut Criterion, pool: &ThreadPool) {
    let mut rng = Rng(0x5EED_0003);
    let mut g = c.benchmark_group("matvec_small");
    g.sampling_mode(SamplingMode::Flat).measurement_time(Duration::from_millis(1500));
    for (rows, cols) in [(576, 576), (1536, 576), (576, 1536)] {
        let w = weights::<BlockQ4_1>(&mut rng, rows * cols);
        let m = QMatrix { ty: BlockQ4_1::TYPE, rows, cols, data: bytemuck::cast_slice(&w), layout: Layout::RowMajor };
        let owned = m.interleave().expect("whole blocks").expect("Q4_1 has an interleaved layout");
        let m = owned.q();
        let x = rng.vec(cols);
        let mut out = vec![0f32; rows];
        let mut scratch = ActBuffer::default();
        g.throughput(Throughput::Bytes(m.data.len() as u64));
        g.bench_function(format!("Q4_1/x8/{rows}x{cols}"), |b| {
            b.iter(|| matmul(pool, &m, black_box(&x), 1, &mut out, &mut scratch).expect("matmul shapes"))
        });
    }
    g.finish();
}

fn vec_dot(c: &mut Criterion) {
    vec_dot_one::<BlockF16>(c);
    vec_dot_one::<BlockQ4_0>(c);
    vec_dot_one::<BlockQ4_1>(c);
    vec_dot_one::<BlockQ5_0>(c);
    vec_dot_one::<BlockQ8_0>(c);
    vec_dot_one::<BlockQ4K>(c);
    vec_dot_one::<BlockQ5K>(c);
    vec_dot_one::<BlockQ6K>(c);
    vec_dot_one::<BlockQ2K>(c);
    vec_dot_one::<BlockQ3K>(c);
}

fn matmuls(c: &mut Criterion) {
    let pool = ThreadPool::new(2);
    matmul_one::<BlockF16>(c, &pool);
    matmul_one::<BlockQ4_0>(c, &pool);
    matmul_one::<BlockQ4_1>(c, &pool);
    matmul_one::<BlockQ5_0>(c, &pool);
    matmul_one::<BlockQ8_0>(c, &pool);
    matmul_one::<BlockQ4K>(c, &pool);
    matmul_one::<BlockQ5K>(c, &pool);
    matmul_one::<BlockQ6K>(c, &pool);
    matmul_one::<BlockQ2K>(c, &pool);
    matmul_one::<BlockQ3K>(c, &pool);
    small_matvecs(c, &pool);
}

fn ops(c: &mut Criterion) {
    let mut rng = Rng(0x5EED_0003);
    let mut g = c.benchmark_group("ops");
    g.measurement_time(Duration::from_millis(1500));

    // One token's hidden state of Qwen2.5 1.5B.
    let x = rng.vec(1536);
    let w = rng.vec(1536);
    let mut out = vec![0f32; 1536];
    g.throughput(Throughput::Elements(1536));
    g.bench_function("rms_norm/1536", |b| b.iter(|| rms_norm(black_box(&x), black_box(&w), 1e-6, &mut out)));

    // One token's queries of Qwen2.5 0.5B: 14 heads of 64, NEOX style.
    let rope = Rope::new(64, 1_000_000.0, true);
    let mut q = rng.vec(14 * 64);
    g.throughput(Throughput::Elements(14 * 64));
    g.bench_function("rope/14x64", |b| b.iter(|| rope.apply(black_box(&mut q), 64, black_box(1000))));
    // The same with the angles computed beforehand, once per forward pass:
    // what each layer pays.
    let angles = rope.angles(&[1000]);
    g.bench_function("rope/14x64/rotate", |b| b.iter(|| angles.apply(0, black_box(&mut q), 64)));

    // An attention row at 4096 positions, and the Qwen vocabulary's logits.
    for n in [4096usize, 151_936] {
        let logits: Vec<f32> = rng.vec(n).iter().map(|v| 8.0 * v).collect();
        let mut buf = logits.clone();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("softmax/{n}"), |b| {
            b.iter(|| {
                buf.copy_from_slice(&logits);
                softmax_inplace(black_box(&mut buf));
            })
        });
    }
    // Greedy decoding's pick over the Qwen vocabulary.
    let logits: Vec<f32> = rng.vec(151_936).iter().map(|v| 8.0 * v).collect();
    g.throughput(Throughput::Elements(151_936));
    g.bench_function("argmax/151936/ref", |b| b.iter(|| argmax_ref(black_box(&logits))));
    g.bench_function("argmax/151936", |b| b.iter(|| argmax(black_box(&logits))));
    g.finish();
}

/// One layer's cache in one of the attention kernel's formats.
enum BenchRows {
    F16(Vec<half::f16>),
    Q8 { quants: Vec<i8>, scales: Vec<f32> },
}

impl BenchRows {
    fn new(x: &[f32], q8: bool) -> BenchRows {
        if q8 {
            let (mut quants, mut scales) = (Vec::new(), Vec::new());
            extend_q8_0(x, &mut quants, &mut scales);
            BenchRows::Q8 { quants, scales }
        } else {
            BenchRows::F16(x.iter().map(|&v| half::f16::from_f32(v)).collect())
        }
    }

    /// The elements `range` (whole q8_0 blocks).
    fn head(&self, range: std::ops::Range<usize>) -> KvRows<'_> {
        match self {
            BenchRows::F16(x) => KvRows::F16(&x[range]),
            BenchRows::Q8 { quants, scales } => {
                KvRows::Q8_0 { quants: &quants[range.clone()], scales: &scales[range.start / 32..range.end / 32] }
            }
        }
    }
}

fn attention(c: &mut Criterion) {
    let mut rng = Rng(0x5EED_0004);
    let mut g = c.benchmark_group("attention");
    g.measurement_time(Duration::from_millis(1500));
    // One layer's decode step, one thread, the cache laid out as the engine's
    // (each KV head's rows contiguous): Qwen2.5 1.5B (12 heads of 128, 2 KV
    // heads) and SmolLM2 (9 of 64, 3 KV heads). `cold` cycles through enough
    // layers' caches (48 MiB) that each step reads its keys and values from
    // memory, as a real decode does; the others stay in L2.
    for (n_head, n_kv, hd, ctxs) in [(12, 2, 128, &[160usize, 1024][..]), (9, 3, 64, &[1024][..])] {
        let group = n_head / n_kv;
        for &ctx in ctxs {
            for q8 in [false, true] {
                let per_head = ctx * hd;
                let bytes_per_element = if q8 { 1.125 } else { 2.0 };
                let layers = if hd == 64 {
                    ((48 << 20) as f64 / (2.0 * bytes_per_element * (n_kv * per_head) as f64)) as usize
                } else {
                    1
                };
                let caches: Vec<(BenchRows, BenchRows)> = (0..layers)
                    .map(|_| {
                        (BenchRows::new(&rng.vec(n_kv * per_head), q8), BenchRows::new(&rng.vec(n_kv * per_head), q8))
                    })
                    .collect();
                let q = rng.vec(n_head * hd);
                let mut out = vec![0f32; n_head * hd];
                let mut scratch = AttnScratch::default();
                let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
                let scale = 1.0 / (hd as f32).sqrt();
                g.throughput(Throughput::Elements((ctx * n_head) as u64));
                // The heads of a KV head in parts of at most MAX_GROUP (as the
                // engine runs them), or `per_head` one call each.
                let parts = group.div_ceil(MAX_GROUP);
                let mut step = |b: &mut criterion::Bencher, cold: bool, per_head_calls: bool| {
                    let mut layer = 0;
                    b.iter(|| {
                        let (keys, values) = &caches[layer];
                        if cold {
                            layer = (layer + 1) % caches.len();
                        }
                        for kv in 0..n_kv {
                            let cache = kv * per_head..(kv + 1) * per_head;
                            let (k, v) = (keys.head(cache.clone()), values.head(cache));
                            for part in 0..parts {
                                let (h0, h1) =
                                    (kv * group + part * group / parts, kv * group + (part + 1) * group / parts);
                                let heads = h0 * hd..h1 * hd;
                                let (qs, os) = (&q[heads.clone()], &mut out[heads]);
                                if per_head_calls {
                                    for (qh, oh) in qs.chunks_exact(hd).zip(os.chunks_exact_mut(hd)) {
                                        attend(black_box(qh), k, v, layout, 0..=ctx - 1, scale, &mut scratch, oh);
                                    }
                                } else {
                                    attend_group(black_box(qs), k, v, layout, 0..=ctx - 1, scale, &mut scratch, os);
                                }
                            }
                        }
                    })
                };
                let name = format!("{n_head}x{hd}/ctx{ctx}{}", if q8 { "/q8_0" } else { "" });
                g.bench_function(&name, |b| step(b, false, false));
                if !q8 {
                    g.bench_function(format!("{name}/per-head"), |b| step(b, false, true));
                }
                if layers > 1 {
                    g.bench_function(format!("{name}/cold"), |b| step(b, true, false));
                    if !q8 {
                        g.bench_function(format!("{name}/cold/per-head"), |b| step(b, true, true));
                    }
                }
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = vec_dot, matmuls, ops, attention
}
criterion_main!(benches);

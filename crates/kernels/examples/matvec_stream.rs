//! How close each weight format's decode kernel comes to the memory.
//!
//! Decoding one token is a matrix-vector product per weight matrix, and the
//! matrices are far larger than the caches: the kernel streams its weights
//! from memory while it computes. This times `matmul` with one activation
//! row on matrices of `--size-mib` (256 MiB by default, out of every cache)
//! for each format in the layout the engine uses (interleaved where there is
//! one), and in the same run a plain read of as many bytes (the `membw`
//! loop), on the same threads, alternating, best of `--runs`. The last
//! column cuts the same bytes into matrices of `--rows` rows (1536 by
//! default: Qwen2.5-1.5B's q and o projections) and runs them one `matmul`
//! each, as a decode step does: what each call's start and end cost. The
//! column after it runs the same pieces laid out so that each thread's part of
//! one is followed in memory by its part of the next (piece k is T matrices
//! of R/T rows, the k-th of each of T regions, run as one `matmul_many` job:
//! thread t streams region t from call to call), which tells whether a
//! layout keeping each thread's stream going across matrices would win. Weight
//! bytes are pseudo-random (so no page is the shared zero page); their values
//! do not change the integer kernels' speed. Rows have 1536 columns.
//!
//!     cargo run --release -p minnow-kernels --example matvec_stream -- [--threads N]
//!         [--size-mib M] [--runs R] [--rows R]
//!
//! One thread is the steadier measure on a shared machine: a core's own
//! memory parallelism limits it, not what the neighbours leave of the bus.

use minnow_kernels::matmul::{matmul, matmul_many, ActBuffer, Layout, QMatrix};
use minnow_kernels::pool::ThreadPool;
use minnow_kernels::GgmlType;
use std::hint::black_box;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("matvec_stream: {name} needs a positive integer");
            std::process::exit(2)
        }),
        None => default,
    }
}

/// Pseudo-random bytes (xorshift).
fn fill(bytes: &mut [u8], mut state: u64) {
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Sum of a slice split over the pool's threads, eight accumulators each.
fn read_all(pool: &ThreadPool, words: &[u64]) -> u64 {
    let total = std::sync::atomic::AtomicU64::new(0);
    let chunk = words.len().div_ceil(pool.n_threads());
    pool.parallel_for(words.len().div_ceil(chunk), 1, &|r| {
        for c in r {
            let part = &words[c * chunk..((c + 1) * chunk).min(words.len())];
            let mut acc = [0u64; 8];
            for w in part.chunks_exact(8) {
                for i in 0..8 {
                    acc[i] = acc[i].wrapping_add(w[i]);
                }
            }
            let s = acc.iter().fold(0u64, |s, &a| s.wrapping_add(a));
            total.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        }
    });
    total.into_inner()
}

fn main() {
    let threads = arg("--threads", 1);
    let size = arg("--size-mib", 256) << 20;
    let runs = arg("--runs", 5);
    let pool = ThreadPool::new(threads);
    let cols = 1536;
    // Also as many separate matrices of `--rows` rows, one `matmul` each, as
    // a decode step runs them (1536 rows: Qwen2.5-1.5B's q and o projections).
    let piece_rows = arg("--rows", 1536);
    if !piece_rows.is_multiple_of(8 * threads) {
        eprintln!("matvec_stream: --rows must be a multiple of 8 × --threads (each thread's part whole row groups)");
        std::process::exit(2);
    }
    println!("{threads} thread(s), {} MiB per matrix, best of {runs}, GB/s (10^9 bytes/s)", size >> 20);
    println!(
        "{:<8} {:>8} {:>8} {:>6} {:>10} {:>12}",
        "format",
        "kernel",
        "read",
        "ratio",
        format!("{piece_rows}-row"),
        "per-thread"
    );
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
        let row_bytes = cols / ty.block_size() * ty.type_size();
        let rows = size / row_bytes / 8 * 8;
        let mut data = vec![0u8; rows * row_bytes];
        fill(&mut data, 0x9E37_79B9_7F4A_7C15);
        let m = QMatrix { ty, rows, cols, data: &data, layout: Layout::RowMajor };
        let owned = m.interleave().expect("whole blocks");
        let m = owned.as_ref().map(|o| o.q()).unwrap_or(m);
        let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0).collect();
        let mut out = vec![0f32; rows];
        let mut scratch = ActBuffer::default();
        let mut words = vec![0u64; m.data.len() / 8];
        fill(bytemuck::cast_slice_mut(&mut words), 7);
        let piece_bytes = piece_rows * row_bytes;
        let pieces: Vec<QMatrix> =
            m.data.chunks_exact(piece_bytes).map(|data| QMatrix { rows: piece_rows, data, ..m }).collect();
        // The same pieces, each thread's parts one after another: region t
        // holds part t of every piece.
        let part_bytes = piece_bytes / threads;
        let region = pieces.len() * part_bytes;
        let per_thread: Vec<Vec<QMatrix>> = (0..pieces.len())
            .map(|k| {
                (0..threads)
                    .map(|t| {
                        let at = t * region + k * part_bytes;
                        QMatrix { rows: piece_rows / threads, data: &m.data[at..at + part_bytes], ..m }
                    })
                    .collect()
            })
            .collect();
        let mut scratch_many: Vec<ActBuffer> = (0..threads).map(|_| ActBuffer::default()).collect();
        let (mut best_k, mut best_r, mut best_p, mut best_t) = (0f64, 0f64, 0f64, 0f64);
        for _ in 0..runs + 1 {
            let t = Instant::now();
            matmul(&pool, &m, black_box(&x), 1, &mut out, &mut scratch).expect("matvec");
            best_k = best_k.max(m.data.len() as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            for p in &pieces {
                matmul(&pool, p, black_box(&x), 1, &mut out[..piece_rows], &mut scratch).expect("matvec");
            }
            best_p = best_p.max((pieces.len() * piece_bytes) as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            for parts in &per_thread {
                let refs: Vec<&QMatrix> = parts.iter().collect();
                let mut outs: Vec<&mut [f32]> = out[..piece_rows].chunks_mut(piece_rows / threads).collect();
                matmul_many(&pool, black_box(&x), 1, &refs, &mut outs, &mut scratch_many).expect("matvec");
            }
            best_t = best_t.max((pieces.len() * piece_bytes) as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            black_box(read_all(&pool, black_box(&words)));
            best_r = best_r.max((words.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        let layout = if m.layout == Layout::Interleaved8 { "/x8" } else { "" };
        println!(
            "{:<8} {best_k:>8.1} {best_r:>8.1} {:>5.0}% {best_p:>10.1} {best_t:>12.1}",
            format!("{ty}{layout}"),
            100.0 * best_k / best_r
        );
    }
}

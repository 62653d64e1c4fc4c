//! Memory read bandwidth of this machine, with N threads.
//!
//! Decoding one token reads every weight of the model once, so read bandwidth
//! divided by the bytes of weights read per token is the fastest any engine can
//! decode (`bench/compare-llamacpp.sh` prints that ceiling per model).
//!
//! Each thread sums its own contiguous slice of a buffer far larger than the
//! caches (1 GiB by default) as u64s, with several independent accumulators so
//! the adds never limit the loads. The threads start together on a barrier and
//! the run is timed from the first thread's start to the last one's end. Every page is
//! written first by the thread that later reads it. The buffer is allocated as the
//! engine's repacked weights are (`weight_memory`: on transparent huge pages where
//! the OS has them), so the ceiling is the one the weights see. The best of
//! several runs is reported, in GB/s (10^9 bytes per second).
//!
//!     cargo run --release -p minnow-kernels --example membw -- [--threads N]
//!         [--size-mib M] [--runs R] [--json]

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

struct Options {
    threads: usize,
    size_mib: usize,
    runs: usize,
    json: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        size_mib: 1024,
        runs: 10,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{name}: expected a positive integer, got {v:?}")),
            }
        };
        match a.as_str() {
            "--threads" | "-t" => o.threads = num("--threads")?,
            "--size-mib" => o.size_mib = num("--size-mib")?,
            "--runs" | "-r" => o.runs = num("--runs")?,
            "--json" => o.json = true,
            "--help" | "-h" => {
                println!("usage: membw [--threads N] [--size-mib M] [--runs R] [--json]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?} (try --help)")),
        }
    }
    Ok(o)
}

/// Sum of a slice, with eight independent accumulators.
#[inline(never)]
fn sum(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let tail: u64 = chunks.remainder().iter().fold(0, |s, &w| s.wrapping_add(w));
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().fold(tail, |s, &a| s.wrapping_add(a))
}

/// One timed pass: every thread sums its slice once. Timed from the first
/// thread's start to the last one's end, each taken by the thread itself, so
/// a caller scheduled late cannot shorten the run.
fn timed_pass(slices: &[&[u64]]) -> Duration {
    let barrier = Barrier::new(slices.len());
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = slices
            .iter()
            .map(|&slice| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    black_box(sum(black_box(slice)));
                    (start, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a reader thread panicked")).collect()
    });
    let start = spans.iter().map(|s| s.0).min().expect("at least one thread");
    let end = spans.iter().map(|s| s.1).max().expect("at least one thread");
    end - start
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("membw: {e}");
            std::process::exit(2);
        }
    };
    let words = o.size_mib << 17; // MiB / 8 bytes
    let per_thread = words.div_ceil(o.threads);
    let mut buf = minnow_kernels::weight_memory::WeightWords::zeroed(words);
    // First touch by the reading thread (NUMA placement), with non-zero data.
    std::thread::scope(|s| {
        for (t, chunk) in buf.as_mut_slice().chunks_mut(per_thread).enumerate() {
            s.spawn(move || {
                for (i, w) in chunk.iter_mut().enumerate() {
                    *w = (t * per_thread + i) as u64;
                }
            });
        }
    });
    let slices: Vec<&[u64]> = buf.as_slice().chunks(per_thread).collect();
    let bytes = (words * 8) as f64;

    timed_pass(&slices); // warm-up
    let mut rates: Vec<f64> = (0..o.runs).map(|_| bytes / timed_pass(&slices).as_secs_f64() / 1e9).collect();
    rates.sort_by(f64::total_cmp);
    let best = rates[rates.len() - 1];
    let median = rates[rates.len() / 2];
    if o.json {
        println!(
            "{{\"threads\":{},\"bytes\":{},\"runs\":{},\"best_gbps\":{best:.2},\"median_gbps\":{median:.2}}}",
            slices.len(),
            words * 8,
            o.runs
        );
    } else {
        println!(
            "read bandwidth, {} threads, {} MiB, {} runs: best {best:.2} GB/s, median {median:.2} GB/s",
            slices.len(),
            o.size_mib,
            o.runs
        );
    }
}

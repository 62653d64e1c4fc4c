//! Peak multiply-add rates of this machine, with N threads: the int8 one the
//! quantized kernels use, and the f32 FMA one (training's products).
//!
//! Prefill is compute-bound: its honest figure is the share of this peak a
//! model's prompt processing reaches (`bench/compare_report.py` prints it
//! next to the llama.cpp ratio), as decode's is the share of the memory
//! bandwidth `membw` measures.
//!
//! Each thread runs chains of the very instruction sequence the integer dot
//! kernels use at the level `formats::simd_level()` picks (the CPU's best,
//! capped by `MINNOW_SIMD` as the kernels are; see
//! `formats::SimdLevel`): AVX-512 VNNI's `vpdpbusd` on 256-bit vectors (32
//! u8×i8 multiply-adds into i32 lanes), or AVX2's `vpmaddubsw`, `vpmaddwd`
//! and `vpaddd` (the same 32). The f32 rate is `vfmadd231ps` on 256-bit vectors
//! (8 multiply-adds each). Twelve independent accumulators per thread cover
//! the instructions' latency, all operands stay in registers, so nothing but
//! the execution units limits the rate. Threads start on a barrier; a run is
//! timed from the first thread's start to the last one's end; the best and
//! median of several runs are reported in 10^9 multiply-adds per second
//! (GMAC/s; one multiply-add is two operations).
//!
//!     cargo run --release -p minnow-kernels --example int8peak -- [--threads N]
//!         [--runs R] [--json]

use minnow_kernels::formats::{simd_level, SimdLevel};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

struct Options {
    threads: usize,
    runs: usize,
    json: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut o =
        Options { threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), runs: 7, json: false };
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
            "--runs" | "-r" => o.runs = num("--runs")?,
            "--json" => o.json = true,
            "--help" | "-h" => {
                println!("usage: int8peak [--threads N] [--runs R] [--json]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?} (try --help)")),
        }
    }
    Ok(o)
}

/// Independent accumulator chains per thread.
const CHAINS: usize = 12;

/// Which chain to time: the int8 one of a SIMD level, or f32 FMA.
#[derive(Clone, Copy)]
enum Kind {
    Int8(SimdLevel),
    F32,
}

impl Kind {
    /// Multiply-adds one iteration of [`chains`] performs per thread.
    fn macs_per_iter(self) -> u64 {
        match self {
            Kind::Int8(_) => (CHAINS * 32) as u64,
            Kind::F32 => (CHAINS * 8) as u64,
        }
    }
}

/// `iters` iterations of the chosen chain; returns a value that depends on
/// every result so nothing is optimised away.
fn chains(kind: Kind, iters: u64, seed: i32) -> i64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each level is only run where `SimdLevel::detected()` found it
        // (`simd_level` is capped by what the CPU has; checked in `main`), and f32 FMA where AVX2 + FMA are.
        unsafe {
            match kind {
                Kind::Int8(SimdLevel::Avx512Vnni) => x86::vnni(iters, seed),
                Kind::Int8(SimdLevel::Avx2) => x86::avx2(iters, seed),
                Kind::F32 => x86::fma(iters, seed),
                Kind::Int8(SimdLevel::Scalar) => unreachable!("no SIMD int8 path to time"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, iters, seed);
        unreachable!("no SIMD path on this architecture")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// Sum of the i32 lanes of every accumulator.
    #[target_feature(enable = "avx2")]
    unsafe fn fold(acc: &[__m256i; CHAINS]) -> i64 {
        let mut lanes = [0i32; 8];
        let mut s = 0i64;
        for a in acc {
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, *a);
            s += lanes.iter().map(|&v| v as i64).sum::<i64>();
        }
        s
    }

    /// # Safety
    /// AVX2, AVX-512 F/VL and VNNI.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn vnni(iters: u64, seed: i32) -> i64 {
        let a = black_box(_mm256_set1_epi32(seed | 0x0101_0101));
        let b = black_box(_mm256_set1_epi32(0x01ff_01ff));
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm256_dpbusd_epi32(*c, a, b);
            }
        }
        fold(&acc)
    }

    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(iters: u64, seed: i32) -> i64 {
        let a = black_box(_mm256_set1_epi32(seed | 0x0101_0101));
        let b = black_box(_mm256_set1_epi32(0x01ff_01ff));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        let mut a = a;
        for _ in 0..iters {
            for c in acc.iter_mut() {
                // An empty asm block that "changes" `a`: the products do not
                // depend on the accumulators, so without it the compiler
                // would compute them once for every chain and iteration.
                std::arch::asm!("/* {0} */", inout(ymm_reg) a, options(nomem, nostack, preserves_flags));
                let p16 = _mm256_maddubs_epi16(a, b);
                *c = _mm256_add_epi32(*c, _mm256_madd_epi16(p16, ones));
            }
        }
        fold(&acc)
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma(iters: u64, seed: i32) -> i64 {
        let a = black_box(_mm256_set1_ps(1.0 + seed as f32 * 1e-9));
        let b = black_box(_mm256_set1_ps(0.999_999));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm256_fmadd_ps(*c, b, a);
            }
        }
        let mut lanes = [0f32; 8];
        let mut s = 0f32;
        for c in &acc {
            _mm256_storeu_ps(lanes.as_mut_ptr(), *c);
            s += lanes.iter().sum::<f32>();
        }
        s as i64
    }
}

/// One timed run: every thread does `iters` iterations, from one barrier.
fn timed_run(kind: Kind, threads: usize, iters: u64) -> Duration {
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    black_box(chains(kind, black_box(iters), t as i32));
                    (start, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a worker thread panicked")).collect()
    });
    let start = spans.iter().map(|s| s.0).min().expect("at least one thread");
    let end = spans.iter().map(|s| s.1).max().expect("at least one thread");
    end - start
}

/// (best, median) GMAC/s over `runs` runs of about a quarter second each.
fn measure(kind: Kind, threads: usize, runs: usize) -> (f64, f64) {
    // Calibrate the iteration count on one short run.
    let probe = 1u64 << 16;
    let t = timed_run(kind, threads, probe).as_secs_f64().max(1e-6);
    let iters = ((probe as f64) * 0.25 / t).max(probe as f64) as u64;
    let macs = (iters * kind.macs_per_iter() * threads as u64) as f64;
    let mut rates: Vec<f64> = (0..runs).map(|_| macs / timed_run(kind, threads, iters).as_secs_f64() / 1e9).collect();
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() - 1], rates[rates.len() / 2])
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("int8peak: {e}");
            std::process::exit(2);
        }
    };
    let level = simd_level();
    if level == SimdLevel::Scalar {
        eprintln!("int8peak: this CPU has no AVX2 + FMA, so minnow's kernels run their scalar code; there is no SIMD peak to measure");
        std::process::exit(1);
    }
    let name = match level {
        SimdLevel::Avx512Vnni => "avx512vnni (vpdpbusd, 256-bit)",
        _ => "avx2 (vpmaddubsw + vpmaddwd + vpaddd)",
    };
    let (i8_best, i8_median) = measure(Kind::Int8(level), o.threads, o.runs);
    let (f32_best, f32_median) = measure(Kind::F32, o.threads, o.runs);
    if o.json {
        println!(
            "{{\"threads\":{},\"runs\":{},\"int8_path\":\"{name}\",\"int8_best_gmacs\":{i8_best:.1},\"int8_median_gmacs\":{i8_median:.1},\"f32_best_gmacs\":{f32_best:.1},\"f32_median_gmacs\":{f32_median:.1}}}",
            o.threads, o.runs
        );
    } else {
        println!(
            "{} threads, {} runs: int8 {name}: best {i8_best:.1} GMAC/s, median {i8_median:.1}; f32 FMA (256-bit): best {f32_best:.1} GMAC/s, median {f32_median:.1}",
            o.threads, o.runs
        );
    }
}

//! `minnow`: small, fast, cheap language models. Thin commands over the
//! crates below it: run, chat, info, tokenize, logits, perplexity, bench,
//! pull, upcycle (`cli`), serve (`minnow_serve`), distill (`distill_cmd`,
//! `distill_train`); speculative flags in `spec`; MODEL arguments resolve
//! through `minnow_models`.

mod cli;
mod distill_cmd;
mod distill_train;
mod spec;

fn main() {
    // SIGPIPE's disposition is chosen per command in `cli::main`.
    // A kernel-level cap for A/B benchmarks (see bench/README.md); a typo
    // must not silently run the default kernels.
    if let Some(v) = std::env::var_os("MINNOW_SIMD") {
        let v = v.to_string_lossy();
        if minnow_kernels::formats::SimdLevel::from_name(&v).is_none() {
            eprintln!(
                "minnow: error: MINNOW_SIMD={v:?} names no kernel level: use scalar, avx2 or avx512 (or unset it)"
            );
            std::process::exit(2);
        }
    }
    if let Err(e) = cli::main() {
        // One clear line, no backtrace: user mistakes are not crashes.
        eprintln!("minnow: error: {e:#}");
        std::process::exit(1);
    }
}

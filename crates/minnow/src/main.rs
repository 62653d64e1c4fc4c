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
    // The forward pass allocates its per-layer activations (megabytes each
    // in prompt processing) and frees them a moment later. By default glibc
    // serves such blocks with fresh mmaps, or trims the heap after them, so
    // every layer page-faults its buffers in again: 6% of Qwen2.5-1.5B's
    // prompt processing was in the kernel's fault and page-clearing paths.
    // Keeping blocks below 64 MiB on a heap that is not trimmed under 256
    // MiB made pp128 9% faster with the same peak RSS. (Reusing the buffers
    // in the forward pass would do the same without the allocator's help.)
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
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

//! `minnow`: small, fast, cheap language models. Thin commands over the
//! engine crates: run, chat, info, tokenize, logits, perplexity, bench, pull.

mod cli;
mod distill_cmd;
mod distill_train;
mod models;
mod spec;

fn main() {
    // Die quietly on a closed pipe (`minnow tokenize < f | head`), as Unix
    // tools do, instead of panicking in println!: Rust ignores SIGPIPE.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of a signal before any
    // thread is started has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = cli::main() {
        // One clear line, no backtrace: user mistakes are not crashes.
        eprintln!("minnow: error: {e:#}");
        std::process::exit(1);
    }
}

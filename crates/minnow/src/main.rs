//! `minnow`: small, fast, cheap language models. Thin commands over the
//! engine crates: run, chat, info, tokenize, logits, perplexity, bench, pull.

mod cli;
mod distill_cmd;
mod distill_train;
mod models;
mod spec;

fn main() {
    if let Err(e) = cli::main() {
        // One clear line, no backtrace: user mistakes are not crashes.
        eprintln!("minnow: error: {e:#}");
        std::process::exit(1);
    }
}

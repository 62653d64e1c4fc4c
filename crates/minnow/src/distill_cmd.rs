//! `minnow distill`: label, synth, train, eval, run — thin commands over
//! `minnow_distill`.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct DistillArgs {
    #[command(subcommand)]
    command: DistillCommand,
}

#[derive(Subcommand)]
enum DistillCommand {
    /// Fine-tune a student GGUF on a dataset (full or LoRA) and write a GGUF.
    Train(crate::distill_train::TrainArgs),
}

pub fn main(a: DistillArgs) -> Result<()> {
    match a.command {
        DistillCommand::Train(t) => crate::distill_train::main(t),
    }
}

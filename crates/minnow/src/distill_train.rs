//! `minnow distill train`.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct TrainArgs {
    /// The student GGUF.
    student: String,
}

pub fn main(_a: TrainArgs) -> Result<()> {
    bail!("minnow distill train: in progress")
}

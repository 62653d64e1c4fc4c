//! Training checkpoints: everything needed to continue a run exactly.
//!
//! One file, `DIR/checkpoint.bin`: the magic `MNWCKPT1`, a little-endian u64
//! header length, a JSON header ([`CheckpointHeader`]: step, optimizer step
//! count, the run's fingerprint, variable names and shapes, validation
//! history), then for each variable its values, AdamW first and second
//! moments as raw little-endian f32. The data order needs no state of its
//! own: it is a pure function of the seed and the step (see `batch.rs`).
//!
//! Written atomically: a temporary file in the same directory, fsynced,
//! renamed over the old checkpoint, then the directory fsynced — a kill at
//! any moment leaves the previous checkpoint or the new one, never a torn one.

use super::optim::AdamW;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MNWCKPT1";
pub const FILE_NAME: &str = "checkpoint.bin";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointHeader {
    /// Optimizer steps completed.
    pub step: usize,
    /// AdamW's update count.
    pub adam_t: u64,
    /// Identifies the run (student, data, settings that change the result);
    /// a checkpoint of another run is refused.
    pub fingerprint: String,
    /// (name, shape) of each variable, in the optimizer's order.
    pub vars: Vec<(String, Vec<usize>)>,
    /// (step, validation loss) so far.
    pub val_history: Vec<(usize, f64)>,
    /// Mean training loss of the last completed step.
    pub last_train_loss: Option<f64>,
}

pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

fn write_f32(w: &mut impl Write, v: &[f32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    w.write_all(&bytes)?;
    Ok(())
}

/// Saves the optimizer's variables and moments with `header` (whose `vars`
/// is filled in here).
pub fn save(dir: &Path, mut header: CheckpointHeader, opt: &AdamW) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    header.adam_t = opt.t;
    header.vars = opt.slots.iter().map(|s| (s.name.clone(), s.var.as_tensor().dims().to_vec())).collect();
    let path = path_in(dir);
    remove_stale_temp_files(dir);
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let f = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let json = serde_json::to_vec(&header)?;
        w.write_all(MAGIC)?;
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        for s in &opt.slots {
            write_f32(&mut w, &s.var.as_tensor().flatten_all()?.to_vec1::<f32>()?)?;
            write_f32(&mut w, &s.m)?;
            write_f32(&mut w, &s.v)?;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        // The rename itself must reach the disk too.
        File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write checkpoint {}", path.display()))
}

/// Deletes temporary checkpoint files a killed run left behind (each can be
/// as large as the model and its optimizer state). One run writes to a
/// directory at a time, so any such file is stale.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let prefix = format!(".{FILE_NAME}.");
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Reads the header of the checkpoint in `dir`, if there is one.
pub fn read_header(dir: &Path) -> Result<Option<(CheckpointHeader, BufReader<File>)>> {
    let path = path_in(dir);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open checkpoint {}", path.display())),
    };
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).with_context(|| format!("{}: truncated checkpoint", path.display()))?;
    if &magic != MAGIC {
        bail!("{} is not a minnow training checkpoint (bad magic)", path.display());
    }
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 30 {
        bail!("{}: checkpoint header of {len} bytes is implausible", path.display());
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json).with_context(|| format!("{}: truncated checkpoint", path.display()))?;
    let header: CheckpointHeader =
        serde_json::from_slice(&json).with_context(|| format!("{}: bad checkpoint header", path.display()))?;
    Ok(Some((header, r)))
}

fn read_f32(r: &mut impl Read, n: usize) -> Result<Vec<f32>> {
    let mut bytes = vec![0u8; n * 4];
    r.read_exact(&mut bytes).context("truncated checkpoint data")?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Restores variables and moments into `opt` from the checkpoint whose
/// header was read by [`read_header`]; the variable list must match.
pub fn restore(header: &CheckpointHeader, mut r: impl Read, opt: &mut AdamW) -> Result<()> {
    let want: Vec<(String, Vec<usize>)> =
        opt.slots.iter().map(|s| (s.name.clone(), s.var.as_tensor().dims().to_vec())).collect();
    if header.vars != want {
        bail!("the checkpoint's variables do not match this run's model (different student or LoRA settings)");
    }
    for s in opt.slots.iter_mut() {
        let t = s.var.as_tensor();
        let w = read_f32(&mut r, t.elem_count())?;
        s.var.set(&Tensor::from_vec(w, t.dims(), t.device())?)?;
        s.m = read_f32(&mut r, s.m.len())?;
        s.v = read_f32(&mut r, s.v.len())?;
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra)? != 0 {
        bail!("the checkpoint has trailing data: it is not the file this version wrote");
    }
    opt.t = header.adam_t;
    Ok(())
}

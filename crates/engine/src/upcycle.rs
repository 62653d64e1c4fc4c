//! Sparse upcycling: turn a dense model into a mixture-of-experts model that
//! computes the same function, as the starting point of an MoE student.
//!
//! Every layer's dense FFN becomes `E` experts, each a copy of it (or of a
//! slice of it: see "Cost"; optionally perturbed, see "Noise"), behind a
//! router initialised to zeros:
//! the softmax over `E` equal logits is uniform, so every token gets the same
//! `k` experts (the tie rule picks ids `0..k`) with probability `1/E` each,
//! `1/k` after renormalisation where the architecture renormalises.
//!
//! # Output architecture
//!
//! - **llama sources → `llama` with `expert_count`** (Mixtral style). Its
//!   top-k weights are renormalised, so they sum to 1 and
//!   `Σ w·FFN(x) = FFN(x)` for *any* router while the experts are copies.
//!   It has the tensors llama.cpp's llama loader reads for Mixtral
//!   (`ffn_gate_inp`, `ffn_{gate,up,down}_exps` of width `feed_forward_length`).
//! - **qwen2 sources → `qwen2moe`**. Qwen2's q/k/v biases rule out
//!   `qwen3moe`, which has no attention biases and always RMS-normalises
//!   each query and key head (not an identity at any weight), so it cannot
//!   express the dense attention. `qwen2moe` keeps the biases but does not
//!   renormalise: with the zero router the `k` weights sum to `k/E`, so the
//!   copied down projections are multiplied by `E/k` — by rescaling each
//!   block's f16 scale, exact when `E/k` is a power of two (2⁻¹¹ relative per
//!   block otherwise). A qwen2moe layer also needs a shared expert (llama.cpp
//!   requires its tensors): a narrow one ([`SHARED_EXPERT_WIDTH`]) whose down
//!   projection is zero, so it adds exactly nothing. Its gate and up
//!   projections are the dense FFN's first rows rather than zeros so that a
//!   trainer gets non-zero gradients for it (an all-zero FFN is a saddle
//!   point). Its sigmoid gate vector is `1/n_embd` everywhere, not zero,
//!   because llama.cpp computes `sigmoid(z)` as `silu(z)/z`, which is NaN at
//!   `z = 0` and would poison the output even though the expert adds zero.
//!   llama.cpp's qwen2moe also requires `output.weight`, so a source with
//!   tied embeddings gets the embedding table written again under that name.
//!   Its qwen2moe also assumes `n_head·head_dim = n_embd`, as every Qwen2
//!   has (a note says so otherwise).
//!
//! Both layouts follow the tensor names, shapes and keys of llama.cpp's
//! loaders and graphs as read from its source; llama.cpp was not available
//! to run them here.
//!
//! # Cost
//!
//! Full copies are not free: each token runs `k` copies of the dense FFN,
//! so top-2 does twice the dense model's FFN work (Qwen2.5-Coder-0.5B: 1.5×
//! its weights per token).
//!
//! **Fine-grained upcycling** (`fine_grained`, `--fine-grained`) keeps the
//! active parameters equal to the dense model's instead: the dense FFN's
//! `n_ff` hidden units are cut into `k` slices of `n_ff/k` (an FFN is a sum
//! over its hidden units, so the slices' outputs add up to the dense
//! output), and expert `e` is a copy of slice `e mod k`. The zero router
//! sends every token to experts `0..k` — one of each slice — so the MoE is
//! exactly the dense function at no extra cost per token; the other
//! experts are spare copies for training to specialise (the recipe of
//! fine-grained expert segmentation, as in DeepSeekMoE and Qwen1.5-MoE's
//! upcycling). The price: once the router is not uniform (noise, or
//! training) a token may pick two copies of one slice, so the function is
//! the dense one only at initialisation — unlike full copies, which stay
//! the dense function under any renormalised routing.
//!
//! Down projections are scaled so the chosen experts' weights add back to
//! one: each chosen expert gets weight `ω = 1/k` (llama renormalises) or
//! `1/E` (qwen2moe does not), so copies are scaled by `1/(k·ω)` and slices
//! by `1/ω`.
//!
//! # Noise
//!
//! `noise = S > 0` multiplies every expert weight `w` by `1 + S·z`,
//! `z ~ N(0, 1)` drawn independently per expert and weight (relative noise:
//! a weight moves in proportion to its size), so the experts can diverge in
//! training; and it gives the router Gaussian weights of standard deviation
//! `S · rms(W_gate)` so that ties, and which experts each token uses, are
//! decided by the router rather than by expert id. The draws are a pure
//! function of `(seed, layer, tensor, expert, index)`: the same seed gives
//! the same file whatever the thread count. With renormalised weights
//! (llama) the MoE then still equals the dense model up to the expert
//! noise; for qwen2moe the weights sum to `k/E` only approximately.
//!
//! # Types
//!
//! Expert tensors keep the dense tensors' types by default: the quantized
//! bytes are copied as they are (no second quantization). With noise, or a
//! requested type, they are dequantized and quantized again (see
//! `minnow_kernels::quantize`); a type minnow cannot produce (e.g. Q3_K)
//! becomes Q8_0, and rows that are not whole blocks of the requested type
//! fall back as llama.cpp's quantizer does (Q4_K → Q5_0), each noted in the
//! summary. Everything else is copied byte for byte.
//!
//! # Writing
//!
//! The file is assembled by a [`GgufWriter`] whose expert tensors are
//! streamed: each stack of `E` copies is produced while the file is written,
//! so memory holds one dense matrix at a time however large `E` is, and
//! `write_file` makes the result appear atomically (complete or not at all).

use crate::model::{Arch, Model, ModelConfig};
use minnow_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use minnow_kernels::formats::dequantize;
use minnow_kernels::quantize::{can_quantize, quantize, scale_in_place};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

/// Most experts per layer: llama.cpp's `LLAMA_MAX_EXPERTS` (minnow itself
/// reads files with up to 4096).
pub const MAX_EXPERTS: usize = 256;

/// Hidden width of the (zero-output) shared expert of a qwen2moe upcycle:
/// small, since it only satisfies the architecture, and a multiple of 32 so
/// quantization tools can still handle its rows.
pub const SHARED_EXPERT_WIDTH: usize = 32;

/// An upcycling request that cannot be carried out, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UpcycleError(pub String);

fn err(msg: impl Into<String>) -> UpcycleError {
    UpcycleError(msg.into())
}

/// The type of the expert tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertType {
    /// The dense FFN tensors' own types (bytes copied when there is no noise).
    Keep,
    /// Requantize every expert tensor to this type.
    To(GgmlType),
}

impl ExpertType {
    /// Parses `keep` or a type name (`q8_0`, `q4_0`, `q4_k`, `q4_1`, `q5_0`,
    /// `q5_1`, `f16`, `bf16`, `f32`; any case).
    pub fn parse(s: &str) -> Result<ExpertType, UpcycleError> {
        if s.eq_ignore_ascii_case("keep") {
            return Ok(ExpertType::Keep);
        }
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s) && can_quantize(*t))
            .map(ExpertType::To)
            .ok_or_else(|| {
                err(format!(
                    "expert type '{s}' is not one of: keep, q8_0, q4_0, q4_k, q4_1, q5_0, q5_1, f16, bf16, f32"
                ))
            })
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct UpcycleOptions {
    /// Experts per layer (`E`).
    pub experts: usize,
    /// Experts each token is routed to (`k`).
    pub top_k: usize,
    /// Relative Gaussian noise on the experts (and scale of the router's
    /// random init); 0 for exact copies and a zero router.
    pub noise: f32,
    pub seed: u64,
    pub expert_type: ExpertType,
    /// Experts are `n_ff/k`-wide slices of the dense FFN rather than copies
    /// of all of it (see "Cost" in the module doc).
    pub fine_grained: bool,
    /// Threads for requantizing.
    pub threads: usize,
}

impl Default for UpcycleOptions {
    fn default() -> UpcycleOptions {
        UpcycleOptions {
            experts: 8,
            top_k: 2,
            noise: 0.0,
            seed: 0,
            expert_type: ExpertType::Keep,
            fine_grained: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What was built.
#[derive(Debug, Clone)]
pub struct UpcycleSummary {
    pub source_arch: &'static str,
    pub arch: &'static str,
    pub n_layer: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Hidden width of each expert (the dense FFN's, or `n_ff/k` when
    /// fine-grained).
    pub n_ff: usize,
    /// Whether experts are slices of the dense FFN rather than copies.
    pub fine_grained: bool,
    /// What the down projections were multiplied by (see "Cost" in the
    /// module doc: copies `E/k` for qwen2moe, 1 for llama; slices `E` for
    /// qwen2moe, `k` for llama).
    pub down_scale: f32,
    /// Expert stacks per tensor type.
    pub expert_types: BTreeMap<String, usize>,
    /// Parameters of the dense model, as stored.
    pub dense_params: u64,
    /// Parameters of the MoE model, as stored.
    pub total_params: u64,
    /// Parameters a token is multiplied with: everything but the unchosen
    /// experts (and a duplicated output table, which replaces a tied one).
    pub active_params: u64,
    /// Choices and fallbacks worth telling the user.
    pub notes: Vec<String>,
    /// Size of the written file (0 before it is written).
    pub file_bytes: u64,
}

/// Checks `opts`, then builds the MoE model's writer from the dense `src`.
/// Expert tensors are produced when the writer writes; nothing large is
/// computed here.
pub fn plan<'a>(src: &'a GgufFile, opts: &UpcycleOptions) -> Result<(GgufWriter<'a>, UpcycleSummary), UpcycleError> {
    check_options(opts)?;
    let cfg = ModelConfig::from_gguf(src).map_err(|e| err(format!("the source model: {e}")))?;
    if cfg.moe.is_some() {
        return Err(err(format!(
            "the source is already a mixture-of-experts model ('{}' with experts): upcycling starts from a dense model",
            cfg.arch.name()
        )));
    }
    let (arch, qwen) = match cfg.arch {
        Arch::Llama => (Arch::Llama, false),
        Arch::Qwen2 => (Arch::Qwen2Moe, true),
        other => {
            return Err(err(format!(
            "upcycling '{}' is not supported: minnow upcycles llama (to Mixtral-style llama) and qwen2 (to qwen2moe)",
            other.name()
        )))
        }
    };
    let (e, k, n_embd, n_ff, n_layer) = (opts.experts, opts.top_k, cfg.n_embd, cfg.n_ff, cfg.n_layer);
    // Fine-grained: `n_parts` slices of the dense FFN's hidden units.
    let n_parts = if opts.fine_grained { k } else { 1 };
    if !n_ff.is_multiple_of(n_parts) {
        return Err(err(format!(
            "--fine-grained cuts the FFN's {n_ff} hidden units into --top-k {k} equal slices: {n_ff} is not a multiple of {k}"
        )));
    }
    let n_ff_exp = n_ff / n_parts;
    // Weight of each chosen expert under the zero router, and what makes the
    // chosen experts add back to the dense FFN.
    let weight = if qwen { 1.0 / e as f32 } else { 1.0 / k as f32 };
    let down_scale = if opts.fine_grained { 1.0 / weight } else { 1.0 / (k as f32 * weight) };
    let sw = SHARED_EXPERT_WIDTH.min(n_ff);

    // The dense FFN of every layer, shape-checked.
    let mut ffn = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let get = |name: &str, dims: [u64; 2]| {
            let name = format!("blk.{l}.{name}.weight");
            let t = src.tensor(&name).ok_or_else(|| err(format!("the source model has no tensor '{name}'")))?;
            if t.dims != dims {
                return Err(err(format!("tensor '{name}' has shape {:?}, expected {dims:?}", t.dims)));
            }
            Ok(t)
        };
        let (a, b) = (n_embd as u64, n_ff as u64);
        ffn.push([get("ffn_gate", [a, b])?, get("ffn_up", [a, b])?, get("ffn_down", [b, a])?]);
    }

    let mut w = GgufWriter::new();
    let mut notes = Vec::new();
    if qwen && cfg.q_dim() != n_embd {
        notes.push(format!(
            "llama.cpp's qwen2moe assumes n_head × head_dim = n_embd, this model has {} ≠ {n_embd}: minnow runs it, llama.cpp will refuse it",
            cfg.q_dim()
        ));
    }
    let src_arch = cfg.arch.name();
    let (src_prefix, prefix) = (format!("{src_arch}."), format!("{}.", arch.name()));
    for (key, value) in src.metadata() {
        let key = match key.strip_prefix(&src_prefix) {
            Some(rest) => format!("{prefix}{rest}"),
            None => key.clone(),
        };
        w.set_metadata(key, value.clone()).map_err(|e| err(e.to_string()))?;
    }
    let mut set = |key: String, value: Value| w.set_metadata(key, value).map_err(|e| err(e.to_string()));
    set("general.architecture".into(), Value::String(arch.name().into()))?;
    set(format!("{prefix}expert_count"), Value::U32(e as u32))?;
    set(format!("{prefix}expert_used_count"), Value::U32(k as u32))?;
    if !qwen && opts.fine_grained {
        // Mixtral-style llama: the experts' width is `feed_forward_length`.
        set(format!("{prefix}feed_forward_length"), Value::U32(n_ff_exp as u32))?;
    }
    if qwen {
        set(format!("{prefix}expert_feed_forward_length"), Value::U32(n_ff_exp as u32))?;
        set(format!("{prefix}expert_shared_feed_forward_length"), Value::U32(sw as u32))?;
    }
    let source_name = src.get("general.name").and_then(|v| v.as_str()).unwrap_or(src_arch).to_string();
    set("minnow.upcycle.source".into(), Value::String(source_name))?;
    set("minnow.upcycle.noise".into(), Value::F32(opts.noise))?;
    set("minnow.upcycle.seed".into(), Value::U64(opts.seed))?;
    set("minnow.upcycle.fine_grained".into(), Value::Bool(opts.fine_grained))?;

    let mut expert_types: BTreeMap<String, usize> = BTreeMap::new();
    let mut fallbacks: BTreeMap<String, usize> = BTreeMap::new();
    let add = |w: &mut GgufWriter<'a>, name: String, dims: &[u64], ty: GgmlType, data: Cow<'a, [u8]>| {
        w.add_tensor(name, dims, ty, data).map_err(|e| err(e.to_string()))
    };
    let mut total_params = 0u64;
    let mut extra_active = 0u64;
    for t in src.tensors() {
        let layer_part = t.name.strip_prefix("blk.").and_then(|r| r.split_once('.'));
        let which = match layer_part {
            Some((l, "ffn_gate.weight")) => l.parse::<usize>().ok().map(|l| (l, 0)),
            Some((l, "ffn_up.weight")) => l.parse::<usize>().ok().map(|l| (l, 1)),
            Some((l, "ffn_down.weight")) => l.parse::<usize>().ok().map(|l| (l, 2)),
            _ => None,
        };
        let Some((l, which)) = which.filter(|&(l, _)| l < n_layer) else {
            add(&mut w, t.name.clone(), &t.dims, t.ty, Cow::Borrowed(src.tensor_data(t)))?;
            total_params += t.n_elements();
            if t.name == "token_embd.weight" && qwen && src.tensor("output.weight").is_none() {
                // llama.cpp's qwen2moe requires an output head of its own.
                add(&mut w, "output.weight".into(), &t.dims, t.ty, Cow::Borrowed(src.tensor_data(t)))?;
                total_params += t.n_elements();
                notes.push(
                    "the embedding table is also written as output.weight (llama.cpp's qwen2moe requires one)".into(),
                );
            }
            continue;
        };
        let p = |name: &str| format!("blk.{l}.{name}");
        let dense = ffn[l][which];
        let (src_rows, src_cols) = (dense.dims[1] as usize, dense.dims[0] as usize);
        // gate/up are [n_ff rows × n_embd], sliced by rows; down is
        // [n_embd rows × n_ff], sliced by columns.
        let (rows, cols, part) = match (which, n_parts) {
            (_, 1) => (src_rows, src_cols, Part::Whole),
            (2, _) => (src_rows, n_ff_exp, Part::Cols(n_parts)),
            _ => (n_ff_exp, src_cols, Part::Rows(n_parts)),
        };
        if which == 0 {
            // The router goes first, where the dense gate was.
            let gate = src.tensor_data(dense);
            let (gate_ty, noise, stream) = (dense.ty, opts.noise, noise_stream(opts.seed, &[l as u64, 100]));
            w.add_tensor_streamed(
                p("ffn_gate_inp.weight"),
                &[n_embd as u64, e as u64],
                GgmlType::F32,
                move |out: &mut dyn Write| {
                    write_router(out, gate, gate_ty, src_rows * src_cols, n_embd * e, noise, stream)
                },
            )
            .map_err(|e| err(e.to_string()))?;
            total_params += (n_embd * e) as u64;
            extra_active += (n_embd * e) as u64;
        }
        let requant = opts.noise > 0.0;
        let (out_ty, fallback) = expert_type(dense.ty, cols, opts.expert_type, requant);
        if let Some(f) = fallback {
            *fallbacks.entry(f).or_default() += 1;
        }
        *expert_types.entry(out_ty.name().to_string()).or_default() += 1;
        let stack = ExpertStack {
            src: src.tensor_data(dense),
            src_ty: dense.ty,
            src_cols,
            part,
            rows,
            cols,
            out_ty,
            scale: if which == 2 { down_scale } else { 1.0 },
            noise: opts.noise,
            stream: noise_stream(opts.seed, &[l as u64, which as u64]),
            n_expert: e,
            threads: opts.threads,
        };
        let name = p(["ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"][which]);
        w.add_tensor_streamed(name, &[cols as u64, rows as u64, e as u64], out_ty, move |out: &mut dyn Write| {
            stack.produce(out)
        })
        .map_err(|e| err(e.to_string()))?;
        total_params += (rows * cols * e) as u64;
        extra_active += (rows * cols * k) as u64;
        extra_active -= (src_rows * src_cols) as u64;

        if qwen && which == 2 {
            // The shared expert: gate/up are the first `sw` rows of the dense
            // gate/up (rows are contiguous, so a prefix of the bytes); down is
            // zero, so it contributes exactly nothing (see the module doc).
            let gate_vec: Vec<u8> = (0..n_embd).flat_map(|_| (1.0 / n_embd as f32).to_le_bytes()).collect();
            add(&mut w, p("ffn_gate_inp_shexp.weight"), &[n_embd as u64], GgmlType::F32, Cow::Owned(gate_vec))?;
            for (name, t) in [("ffn_gate_shexp.weight", ffn[l][0]), ("ffn_up_shexp.weight", ffn[l][1])] {
                let row_bytes = t.ty.bytes_for(n_embd as u64).expect("validated row") as usize;
                let head = &src.tensor_data(t)[..sw * row_bytes];
                add(&mut w, p(name), &[n_embd as u64, sw as u64], t.ty, Cow::Borrowed(head))?;
            }
            let zeros = vec![0u8; sw * n_embd * 4];
            add(&mut w, p("ffn_down_shexp.weight"), &[sw as u64, n_embd as u64], GgmlType::F32, Cow::Owned(zeros))?;
            let shexp = (n_embd + 3 * sw * n_embd) as u64;
            total_params += shexp;
            extra_active += shexp;
        }
    }
    for (what, n) in fallbacks {
        notes.push(format!("{n} expert stacks: {what}"));
    }
    if opts.noise == 0.0 {
        notes.push(format!(
            "the router is all zeros: until trained, every token goes to experts 0..{} with equal weight",
            k - 1
        ));
    }
    let dense_params: u64 = src.tensors().iter().map(|t| t.n_elements()).sum();
    let summary = UpcycleSummary {
        source_arch: src_arch,
        arch: arch.name(),
        n_layer,
        experts: e,
        top_k: k,
        n_ff: n_ff_exp,
        fine_grained: opts.fine_grained,
        down_scale,
        expert_types,
        dense_params,
        total_params,
        active_params: dense_params + extra_active,
        notes,
        file_bytes: 0,
    };
    Ok((w, summary))
}

/// Upcycles the dense model at `input` into `output` (written atomically).
/// The source is fully loaded (every tensor checked) first, and `output` may
/// not be `input`.
pub fn upcycle_file(input: &Path, output: &Path, opts: &UpcycleOptions) -> Result<UpcycleSummary, UpcycleError> {
    check_options(opts)?;
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            return Err(err(format!(
                "the output {} is the input: write the MoE model to a new file",
                output.display()
            )));
        }
    }
    let file = Arc::new(GgufFile::open(input).map_err(|e| err(e.to_string()))?);
    Model::from_gguf(file.clone()).map_err(|e| err(format!("{}: {e}", input.display())))?;
    let (writer, mut summary) = plan(&file, opts)?;
    writer.write_file(output).map_err(|e| err(e.to_string()))?;
    summary.file_bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(summary)
}

fn check_options(opts: &UpcycleOptions) -> Result<(), UpcycleError> {
    if opts.experts == 0 {
        return Err(err("--experts must be at least 1"));
    }
    if opts.experts > MAX_EXPERTS {
        return Err(err(format!(
            "--experts {} is more than {MAX_EXPERTS} (llama.cpp's limit; minnow keeps to it)",
            opts.experts
        )));
    }
    if opts.top_k == 0 {
        return Err(err("--top-k must be at least 1: every token needs an expert"));
    }
    if opts.top_k > opts.experts {
        return Err(err(format!(
            "--top-k {} exceeds --experts {}: a token cannot use more experts than there are",
            opts.top_k, opts.experts
        )));
    }
    if !opts.noise.is_finite() || opts.noise < 0.0 {
        return Err(err(format!("--noise {} must be a finite number ≥ 0", opts.noise)));
    }
    if opts.threads == 0 {
        return Err(err("threads must be at least 1"));
    }
    Ok(())
}

/// The type of one expert stack, and a note when it is not what was asked.
fn expert_type(src: GgmlType, cols: usize, want: ExpertType, requantize: bool) -> (GgmlType, Option<String>) {
    let fits = |t: GgmlType| cols.is_multiple_of(t.block_size());
    // Higher precision than what was asked, never lower.
    let fallback = |t: GgmlType| match t {
        GgmlType::Q4_K if fits(GgmlType::Q5_0) => GgmlType::Q5_0,
        _ if fits(GgmlType::Q8_0) => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    match want {
        ExpertType::Keep if fits(src) && (!requantize || can_quantize(src)) => (src, None),
        ExpertType::Keep if fits(src) => {
            let to = fallback(src);
            (to, Some(format!("{src} (no quantizer in minnow) written as {to}")))
        }
        ExpertType::Keep => {
            let to = fallback(src);
            (to, Some(format!("slices of {cols} are not whole {src} blocks of {}: written as {to}", src.block_size())))
        }
        ExpertType::To(t) if fits(t) => (t, None),
        ExpertType::To(t) => {
            let to = fallback(t);
            (to, Some(format!("rows of {cols} are not whole {t} blocks of {}: written as {to}", t.block_size())))
        }
    }
}

/// Which part of the dense matrix an expert is.
#[derive(Clone, Copy)]
enum Part {
    /// All of it (full copies).
    Whole,
    /// Expert `e` is the `(e mod n)`-th of `n` equal row bands (gate, up).
    Rows(usize),
    /// Expert `e` is the `(e mod n)`-th of `n` equal column bands (down).
    Cols(usize),
}

impl Part {
    fn count(self) -> usize {
        match self {
            Part::Whole => 1,
            Part::Rows(n) | Part::Cols(n) => n,
        }
    }
}

/// One `ffn_*_exps` tensor: `n_expert` experts, each a copy of the dense
/// matrix or of one of its slices, produced while the file is written.
struct ExpertStack<'a> {
    /// The dense matrix: `src_cols` columns, stored as `src_ty`.
    src: &'a [u8],
    src_ty: GgmlType,
    src_cols: usize,
    part: Part,
    /// One expert's shape.
    rows: usize,
    cols: usize,
    out_ty: GgmlType,
    /// Multiplies every weight (qwen2moe's down projections: E/k).
    scale: f32,
    noise: f32,
    stream: u64,
    n_expert: usize,
    threads: usize,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl ExpertStack<'_> {
    fn produce(&self, out: &mut dyn Write) -> io::Result<()> {
        let n_parts = self.part.count();
        if self.noise == 0.0 {
            // Each distinct part encoded once, written for every expert that
            // is a copy of it.
            let parts: Vec<Cow<[u8]>> = (0..n_parts)
                .map(|s| {
                    if self.out_ty == self.src_ty {
                        let mut bytes = self.part_bytes(s);
                        if self.scale != 1.0 {
                            scale_in_place(self.out_ty, bytes.to_mut(), self.scale).map_err(io_err)?;
                        }
                        Ok(bytes)
                    } else {
                        Ok(Cow::Owned(self.encode(&self.part_f32(s)?, None)?))
                    }
                })
                .collect::<io::Result<_>>()?;
            for ex in 0..self.n_expert {
                out.write_all(&parts[ex % n_parts])?;
            }
        } else {
            let parts: Vec<Vec<f32>> = (0..n_parts).map(|s| self.part_f32(s)).collect::<io::Result<_>>()?;
            for ex in 0..self.n_expert {
                let stream = noise_stream(self.stream, &[ex as u64]);
                out.write_all(&self.encode(&parts[ex % n_parts], Some(stream))?)?;
            }
        }
        Ok(())
    }

    /// The bytes of part `s` in the source type: a row band is a contiguous
    /// range; a column band is a range of every row (whole blocks, as
    /// `out_ty == src_ty` is only chosen when the width fits the blocks).
    fn part_bytes(&self, s: usize) -> Cow<'_, [u8]> {
        let bytes = |cols: usize| self.src_ty.bytes_for(cols as u64).expect("validated row") as usize;
        match self.part {
            Part::Whole => Cow::Borrowed(self.src),
            Part::Rows(_) => {
                let row = bytes(self.src_cols);
                Cow::Borrowed(&self.src[s * self.rows * row..(s + 1) * self.rows * row])
            }
            Part::Cols(_) => {
                let (row, start, len) = (bytes(self.src_cols), bytes(s * self.cols), bytes(self.cols));
                Cow::Owned(self.src.chunks_exact(row).flat_map(|r| &r[start..start + len]).copied().collect())
            }
        }
    }

    /// Part `s` as f32 (`rows × cols`), times `scale`.
    fn part_f32(&self, s: usize) -> io::Result<Vec<f32>> {
        let src_rows = match self.part {
            Part::Rows(n) => self.rows * n,
            _ => self.rows,
        };
        let mut dense = vec![0f32; src_rows * self.src_cols];
        dequantize(self.src_ty, self.src, &mut dense).map_err(io_err)?;
        let mut x: Vec<f32> = match self.part {
            Part::Whole => dense,
            Part::Rows(_) => dense[s * self.rows * self.src_cols..(s + 1) * self.rows * self.src_cols].to_vec(),
            Part::Cols(_) => dense
                .chunks_exact(self.src_cols)
                .flat_map(|r| &r[s * self.cols..(s + 1) * self.cols])
                .copied()
                .collect(),
        };
        if self.scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= self.scale);
        }
        Ok(x)
    }

    /// `x` (with noise from `stream`, if any) encoded as `out_ty`, rows
    /// split over threads. The noise of an element depends only on its
    /// index, so the result does not depend on the split.
    fn encode(&self, x: &[f32], stream: Option<u64>) -> io::Result<Vec<u8>> {
        let (rows, cols) = (self.rows, self.cols);
        let row_bytes = self.out_ty.bytes_for(cols as u64).expect("type chosen to fit the rows") as usize;
        let mut out = vec![0u8; rows * row_bytes];
        let per_thread = rows.div_ceil(self.threads.max(1)).max(1);
        let results: Vec<io::Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = out
                .chunks_mut(per_thread * row_bytes)
                .enumerate()
                .map(|(c, chunk)| {
                    s.spawn(move || {
                        let mut row = vec![0f32; cols];
                        for (i, dst) in chunk.chunks_exact_mut(row_bytes).enumerate() {
                            let r = c * per_thread + i;
                            row.copy_from_slice(&x[r * cols..(r + 1) * cols]);
                            if let Some(stream) = stream {
                                perturb(&mut row, r * cols, stream, self.noise);
                            }
                            quantize(self.out_ty, &row, dst).map_err(io_err)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(io_err("a quantizing thread panicked"))))
                .collect()
        });
        results.into_iter().collect::<io::Result<()>>()?;
        Ok(out)
    }
}

/// The router: zeros without noise; else Gaussian with standard deviation
/// `noise · rms(dense gate)`, so its logits are small next to the FFN's
/// pre-activations but break ties.
fn write_router(
    out: &mut dyn Write,
    gate: &[u8],
    gate_ty: GgmlType,
    gate_len: usize,
    len: usize,
    noise: f32,
    stream: u64,
) -> io::Result<()> {
    let mut w = vec![0f32; len];
    if noise > 0.0 {
        let mut g = vec![0f32; gate_len];
        dequantize(gate_ty, gate, &mut g).map_err(io_err)?;
        let rms = (g.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / g.len() as f64).sqrt() as f32;
        for (i, v) in w.iter_mut().enumerate() {
            *v = noise * rms * gaussian(stream, i);
        }
    }
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.write_all(&bytes)
}

/// Multiplies `row` (elements `start..` of a matrix) by `1 + s·z`.
fn perturb(row: &mut [f32], start: usize, stream: u64, s: f32) {
    let mut j = 0;
    while j < row.len() {
        let i = start + j;
        let (z0, z1) = normal_pair(stream, (i / 2) as u64);
        if i.is_multiple_of(2) {
            row[j] *= 1.0 + s * z0;
            if j + 1 < row.len() {
                row[j + 1] *= 1.0 + s * z1;
            }
            j += 2;
        } else {
            row[j] *= 1.0 + s * z1;
            j += 1;
        }
    }
}

/// splitmix64's output function: a bijective 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stream id for the draws of one tensor (or expert): the seed mixed
/// with the path to it.
fn noise_stream(seed: u64, path: &[u64]) -> u64 {
    path.iter()
        .fold(mix64(seed ^ 0x6a09_e667_f3bc_c908), |h, &p| mix64(h ^ mix64(p.wrapping_add(0x9e37_79b9_7f4a_7c15))))
}

/// The `pair`-th pair of independent N(0, 1) draws of `stream`:
/// Marsaglia's polar method on uniforms hashed from `(pair, attempt)`, so
/// any element can be drawn on its own (threads may take any share of a
/// tensor). The polar method rather than Box–Muller because sin and cos
/// were most of the time of a noisy upcycle; its rejections (21% of
/// attempts) cost less.
fn normal_pair(stream: u64, pair: u64) -> (f32, f32) {
    const SCALE: f32 = 1.0 / (1u32 << 23) as f32;
    let base = mix64(stream ^ mix64(pair));
    let mut attempt = 0u64;
    loop {
        let h = mix64(base ^ attempt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Two 24-bit uniforms in (-1, 1), never 0 exactly.
        let u = ((h >> 40) as f32 + 0.5) * SCALE - 1.0;
        let v = (((h >> 16) & 0xff_ffff) as f32 + 0.5) * SCALE - 1.0;
        let s = u * u + v * v;
        if s < 1.0 {
            let f = (-2.0 * s.ln() / s).sqrt();
            return (u * f, v * f);
        }
        attempt += 1;
    }
}

fn gaussian(stream: u64, i: usize) -> f32 {
    let (z0, z1) = normal_pair(stream, (i / 2) as u64);
    if i.is_multiple_of(2) {
        z0
    } else {
        z1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_draws_look_normal_and_are_reproducible() {
        let s = noise_stream(7, &[1, 2]);
        let z: Vec<f64> = (0..200_000).map(|i| gaussian(s, i) as f64).collect();
        let mean = z.iter().sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean}, variance {var}");
        let within1 = z.iter().filter(|v| v.abs() <= 1.0).count() as f64 / z.len() as f64;
        assert!((within1 - 0.6827).abs() < 0.01, "{within1}");
        assert_eq!(gaussian(s, 12345), gaussian(noise_stream(7, &[1, 2]), 12345));
        assert_ne!(gaussian(s, 12345), gaussian(noise_stream(8, &[1, 2]), 12345));
        assert_ne!(gaussian(s, 12345), gaussian(noise_stream(7, &[1, 3]), 12345));
    }

    #[test]
    fn perturbing_in_pieces_equals_perturbing_whole() {
        let s = noise_stream(1, &[]);
        let mut whole = vec![1.0f32; 101];
        perturb(&mut whole, 3, s, 0.1);
        let mut pieces = vec![1.0f32; 101];
        let (a, b) = pieces.split_at_mut(50);
        perturb(a, 3, s, 0.1);
        perturb(b, 53, s, 0.1);
        assert_eq!(whole, pieces);
        assert!(whole.iter().all(|&v| v != 1.0));
    }

    #[test]
    fn expert_types_fall_back_upwards() {
        assert_eq!(expert_type(GgmlType::Q6_K, 4864, ExpertType::Keep, false), (GgmlType::Q6_K, None));
        // Every k-quant can be re-encoded now (Q2_K and Q3_K too).
        assert_eq!(expert_type(GgmlType::Q6_K, 4864, ExpertType::Keep, true), (GgmlType::Q6_K, None));
        assert_eq!(expert_type(GgmlType::Q3_K, 4864, ExpertType::Keep, true), (GgmlType::Q3_K, None));
        // A row that is not whole blocks of the source's type falls back upwards.
        assert_eq!(expert_type(GgmlType::Q3_K, 896, ExpertType::Keep, true).0, GgmlType::Q8_0);
        assert_eq!(expert_type(GgmlType::Q5_0, 896, ExpertType::Keep, true), (GgmlType::Q5_0, None));
        assert_eq!(expert_type(GgmlType::Q5_0, 896, ExpertType::To(GgmlType::Q4_K), false).0, GgmlType::Q5_0);
        assert_eq!(expert_type(GgmlType::Q5_0, 4864, ExpertType::To(GgmlType::Q4_K), false), (GgmlType::Q4_K, None));
        assert_eq!(expert_type(GgmlType::F32, 48, ExpertType::To(GgmlType::Q8_0), false).0, GgmlType::F16);
        assert_eq!(ExpertType::parse("Q4_K").unwrap(), ExpertType::To(GgmlType::Q4_K));
        assert_eq!(ExpertType::parse("keep").unwrap(), ExpertType::Keep);
        assert_eq!(ExpertType::parse("q6_k").unwrap(), ExpertType::To(GgmlType::Q6_K));
        assert!(ExpertType::parse("q8_k").unwrap_err().to_string().contains("q4_k"));
    }
}

//! The student's training forward pass, in candle so autograd gives the
//! gradients: llama (SmolLM2, tied embeddings), qwen2 (q/k/v biases, NEOX
//! RoPE) and Mixtral-style llama with experts (as `minnow upcycle` writes).
//!
//! Every tensor of the GGUF is dequantized to f32 once with minnow's own
//! kernels and kept under its GGUF name (`blk.3.attn_q.weight`), shape as
//! candle sees it: a ggml `[cols, rows]` matrix is `[rows, cols]`. The order
//! of operations is the engine's (crates/engine/src/model/llama.rs):
//! pre-norm blocks, RMSNorm, RoPE on q and k, grouped-query attention, a
//! SiLU-gated FFN (or a routed mixture of them), final norm, output head.
//!
//! A batch is `B` packed rows of `T` positions: several examples share a row,
//! each with its own positions (restarting at 0), and a block-diagonal causal
//! mask keeps them from seeing one another (see `batch.rs`). The output head
//! runs only on the rows whose logits a loss needs (`pick`), since the head
//! (vocab × n_embd) is the largest single matmul and prompts are masked.

use super::lora::LoraSet;
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, IndexOp, Layout, Shape, Tensor, Var, D};
use minnow_engine::model::{Arch, ModelConfig};
use minnow_gguf::GgufFile;
use minnow_kernels::formats::dequantize;
use std::collections::{BTreeMap, BTreeSet};

/// The student's hyperparameters, from the GGUF metadata (checked by the
/// engine's own config reader so both code paths agree on them).
#[derive(Debug, Clone)]
pub struct StudentShape {
    pub cfg: ModelConfig,
    /// Q/K use NEOX rotation (pairs i, i + n_rot/2) rather than adjacent pairs.
    pub neox: bool,
    /// Attention projections have biases (qwen2).
    pub qkv_bias: bool,
    /// The output head is the embedding table (no `output.weight`).
    pub tied: bool,
}

/// One model input: `B` rows of `T` token ids each, flattened.
pub struct ForwardInput {
    pub b: usize,
    pub t: usize,
    /// Token ids, shape `[B*T]`, u32.
    pub tokens: Tensor,
    /// RoPE cos and sin at each token's own position, shape [B, 1, T, n_rot/2].
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive attention mask (0 or -inf), shape [B, 1, T, T].
    pub mask: Tensor,
    /// Flattened row indices whose logits are wanted, shape `[M]`, u32.
    pub pick: Tensor,
}

/// The student network's weights and which of them train.
pub struct Student {
    pub shape: StudentShape,
    /// Every tensor by GGUF name (f32). Trainable ones are views of a `Var`.
    tensors: BTreeMap<String, Tensor>,
    /// The trainable full-weight tensors (full fine-tuning), by name.
    vars: BTreeMap<String, Var>,
    /// Low-rank adapters, when training with LoRA.
    pub lora: Option<LoraSet>,
    device: Device,
}

/// Tensors that never train in full fine-tuning: the MoE router (frozen,
/// see `mod.rs`), and nothing else.
fn frozen_in_full_ft(name: &str) -> bool {
    name.ends_with(".ffn_gate_inp.weight")
}

impl Student {
    /// Reads the architecture and every tensor of `file` (dequantized to f32
    /// on `device`). `trainable`: whether the base weights train (full
    /// fine-tuning); with LoRA they stay frozen and adapters are added later.
    pub fn load(file: &GgufFile, device: &Device, trainable: bool) -> Result<Student> {
        let cfg = ModelConfig::from_gguf(file).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (neox, qkv_bias) = match cfg.arch {
            Arch::Llama => (false, false),
            Arch::Qwen2 => (true, true),
            other => bail!(
                "training '{}' students is not supported: minnow trains llama (incl. upcycled MoE) and qwen2",
                other.name()
            ),
        };
        let tied = file.tensor("output.weight").is_none();
        let shape = StudentShape { cfg, neox, qkv_bias, tied };
        let mut tensors = BTreeMap::new();
        let mut vars = BTreeMap::new();
        for info in file.tensors() {
            let n = info.n_elements() as usize;
            let mut data = vec![0f32; n];
            dequantize(info.ty, file.tensor_data(info), &mut data)
                .map_err(|e| anyhow::anyhow!("tensor '{}': {e}", info.name))?;
            // ggml dims are innermost first; candle's are outermost first.
            let dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
            let t = Tensor::from_vec(data, dims, device)?;
            if trainable && !frozen_in_full_ft(&info.name) {
                let v = Var::from_tensor(&t)?;
                tensors.insert(info.name.clone(), v.as_tensor().clone());
                vars.insert(info.name.clone(), v);
            } else {
                tensors.insert(info.name.clone(), t);
            }
        }
        Ok(Student { shape, tensors, vars, lora: None, device: device.clone() })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A tensor by GGUF name.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).with_context(|| format!("the model has no tensor '{name}'"))
    }

    /// Names of all tensors, in name order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The trainable variables (full weights and LoRA adapters) by name, in
    /// a fixed order (name order) so optimizer state lines up across runs.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self.vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(l) = &self.lora {
            out.extend(l.vars());
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Names of the tensors that differ from the base file after training
    /// (the ones export must write anew).
    pub fn changed_tensors(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self.vars.keys().cloned().collect();
        if let Some(l) = &self.lora {
            s.extend(l.targets().map(|t| t.to_string()));
        }
        s
    }

    /// The current value of a tensor with any LoRA adapter merged in:
    /// `W + (alpha/r)·B·A`. Shape as stored.
    pub fn merged(&self, name: &str) -> Result<Tensor> {
        let w = self.get(name)?;
        if let Some(delta) = self.lora.as_ref().map(|l| l.delta(name)).transpose()?.flatten() {
            return Ok((w + delta)?);
        }
        Ok(w.clone())
    }

    /// `x · Wᵀ` for x [N, in], w [out, in] → [N, out]. A weight that does
    /// not train goes through [`FrozenMatmul`] on the CPU, so backward
    /// computes only the input's gradient: candle's matmul backward also
    /// computes (and keeps until the step ends) a gradient for the weight
    /// whether or not it trains — for LoRA on a 0.5B model that is 2 GB of
    /// dead gradients and a third of the backward's arithmetic.
    fn matmul_t(&self, x: &Tensor, w: &Tensor, name: &str) -> Result<Tensor> {
        if self.vars.contains_key(name) {
            return Ok(x.matmul(&w.t()?)?);
        }
        frozen_matmul(x, w)
    }

    /// `x · Wᵀ` (+ the LoRA path `scale · (x·Aᵀ)·Bᵀ` when `name` has an adapter):
    /// x [N, in] → [N, out].
    /// Adapted projections are one fused op ([`super::fused::lora_linear`]).
    fn linear(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.get(name)?;
        match self.lora.as_ref().and_then(|l| l.adapter(name)) {
            Some((a, b, scale)) => super::fused::lora_linear(x, w, a, b, scale),
            None => self.matmul_t(x, w, name),
        }
    }

    /// Logits at the picked rows of the batch, shape [M, vocab].
    pub fn forward(&self, inp: &ForwardInput) -> Result<Tensor> {
        let cfg = &self.shape.cfg;
        let (b, t) = (inp.b, inp.t);
        let (nh, nkv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let eps = cfg.norm_eps as f64;
        // x: the residual stream, [N, n_embd]
        let mut x = self.get("token_embd.weight")?.index_select(&inp.tokens, 0)?;
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{l}.{s}");
            let h = rms_norm(&x, self.get(&p("attn_norm.weight"))?, eps)?;
            let mut q = self.linear(&h, &p("attn_q.weight"))?;
            let mut k = self.linear(&h, &p("attn_k.weight"))?;
            let mut v = self.linear(&h, &p("attn_v.weight"))?;
            if self.shape.qkv_bias {
                q = q.broadcast_add(self.get(&p("attn_q.bias"))?)?;
                k = k.broadcast_add(self.get(&p("attn_k.bias"))?)?;
                v = v.broadcast_add(self.get(&p("attn_v.bias"))?)?;
            }
            // [N, heads*hd] → [B, heads, T, hd]
            let heads = |x: Tensor, n: usize| -> Result<Tensor> {
                Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = self.rope(&heads(q, nh)?, &inp.cos, &inp.sin)?;
            let k = self.rope(&heads(k, nkv)?, &inp.cos, &inp.sin)?;
            let v = heads(v, nkv)?;
            // The 1/sqrt(hd) scale on q ([N, q_dim]) rather than on the
            // scores ([B, H, T, T], larger).
            let q = (q * (1.0 / (hd as f64).sqrt()))?;
            // Grouped-query attention without copying k and v per query
            // head: query head h reads kv head h / n (the engine's
            // grouping), so the n query heads of a kv head are one
            // [n·T, hd] block against that head's [T, hd] keys and values.
            let n = nh / nkv;
            let q = q.reshape((b, nkv, n * t, hd))?;
            // scores [B, H, T, T] (a view of [B, Hkv, n·T, T])
            let scores = q.matmul(&k.t()?)?.reshape((b, nh, t, t))?;
            let probs = masked_softmax(&scores, &inp.mask)?.reshape((b, nkv, n * t, t))?;
            // [B, Hkv, n·T, hd] = [B, H, T, hd] → [N, H*hd]
            let a = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            x = (x + self.linear(&a, &p("attn_output.weight"))?)?;
            let h = rms_norm(&x, self.get(&p("ffn_norm.weight"))?, eps)?;
            let f = match &cfg.moe {
                None => {
                    let g = self.linear(&h, &p("ffn_gate.weight"))?;
                    let u = self.linear(&h, &p("ffn_up.weight"))?;
                    self.linear(&super::fused::silu_mul(&g, &u)?, &p("ffn_down.weight"))?
                }
                Some(moe) => self.moe_ffn(l, &h, moe.n_expert_used, moe.norm_topk)?,
            };
            x = (x + f)?;
        }
        let hx = x.index_select(&inp.pick, 0)?;
        let hx = rms_norm(&hx, self.get("output_norm.weight")?, eps)?;
        let head = if self.shape.tied { "token_embd.weight" } else { "output.weight" };
        self.matmul_t(&hx, self.get(head)?, head)
    }

    /// RoPE on x [B, heads, T, hd] with cos/sin [B, 1, T, n_rot/2]; the
    /// first n_rot dims of each head rotate, the rest pass through.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if let Some(y) = super::fused::rope(x, cos, sin, self.shape.cfg.n_rot, self.shape.neox)? {
            return Ok(y);
        }
        rope_composite(x, cos, sin, self.shape.cfg.head_dim, self.shape.cfg.n_rot, self.shape.neox)
    }
}

/// [`super::fused::rope`] from candle's differentiable primitives: RoPE on
/// x [B, heads, T, hd] with cos/sin [B, 1, T, n_rot/2]; the first n_rot dims
/// of each head rotate, the rest pass through.
pub fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor, hd: usize, n_rot: usize, neox: bool) -> Result<Tensor> {
    {
        let half = n_rot / 2;
        let (xr, rest) = if n_rot < hd {
            (x.narrow(3, 0, n_rot)?, Some(x.narrow(3, n_rot, hd - n_rot)?))
        } else {
            (x.clone(), None)
        };
        let rotated = if neox {
            let (x0, x1) = (xr.narrow(3, 0, half)?, xr.narrow(3, half, half)?);
            let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
            let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
            Tensor::cat(&[r0, r1], 3)?
        } else {
            // Adjacent pairs: view [.., half, 2].
            let dims = xr.dims().to_vec();
            let pairs = xr.reshape((dims[0], dims[1], dims[2], half, 2))?;
            let (x0, x1) = (pairs.i((.., .., .., .., 0))?, pairs.i((.., .., .., .., 1))?);
            let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
            let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
            Tensor::stack(&[r0, r1], 4)?.reshape(dims)?
        };
        match rest {
            Some(r) => Ok(Tensor::cat(&[rotated, r], 3)?),
            None => Ok(rotated),
        }
    }
}

impl Student {
    /// Mixtral-style routed FFN of layer `l` on h [N, n_embd]: softmax over
    /// the router logits, top-k experts per row (ties to the lower id, as
    /// the engine), weights renormalised when `norm_topk`, and the weighted
    /// sum of the chosen experts' SiLU-gated FFNs. The router weights are
    /// constants (frozen); gradients flow through the routing probabilities
    /// into `h` and into the chosen experts.
    fn moe_ffn(&self, l: usize, h: &Tensor, k: usize, norm_topk: bool) -> Result<Tensor> {
        let p = |s: &str| format!("blk.{l}.{s}");
        let n = h.dim(0)?;
        let router = self.get(&p("ffn_gate_inp.weight"))?;
        let probs = softmax_last(&self.matmul_t(h, router, &p("ffn_gate_inp.weight"))?)?; // [N, E]
        let host: Vec<Vec<f32>> = probs.to_vec2()?;
        let n_expert = router.dim(0)?;
        // choice [N, k] as flat u32, row-major.
        let mut choice = Vec::with_capacity(n * k);
        for row in &host {
            let mut idx: Vec<usize> = (0..n_expert).collect();
            // Stable sort by descending probability keeps lower ids first on ties.
            idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
            choice.extend(idx[..k].iter().map(|&e| e as u32));
        }
        let choice_t = Tensor::from_vec(choice.clone(), (n, k), &self.device)?;
        let mut w = probs.gather(&choice_t, 1)?; // [N, k]
        if norm_topk {
            w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        }
        let w_flat = w.flatten_all()?; // [N*k]
        let (gate, up, down) = (
            self.get(&p("ffn_gate_exps.weight"))?,
            self.get(&p("ffn_up_exps.weight"))?,
            self.get(&p("ffn_down_exps.weight"))?,
        );
        let mut out = h.zeros_like()?;
        for e in 0..n_expert {
            let slots: Vec<u32> = (0..n * k).filter(|&s| choice[s] == e as u32).map(|s| s as u32).collect();
            if slots.is_empty() {
                continue;
            }
            let rows: Vec<u32> = slots.iter().map(|&s| s / k as u32).collect();
            let m = rows.len();
            let rows_t = Tensor::from_vec(rows, m, &self.device)?;
            let slots_t = Tensor::from_vec(slots, m, &self.device)?;
            let xe = h.index_select(&rows_t, 0)?; // [m, n_embd]
            let g = self.matmul_t(&xe, &gate.get(e)?, &p("ffn_gate_exps.weight"))?.silu()?;
            let u = self.matmul_t(&xe, &up.get(e)?, &p("ffn_up_exps.weight"))?;
            let d = self.matmul_t(&(g * u)?, &down.get(e)?, &p("ffn_down_exps.weight"))?; // [m, n_embd]
            let we = w_flat.index_select(&slots_t, 0)?.unsqueeze(1)?;
            out = out.index_add(&rows_t, &d.broadcast_mul(&we)?, 0)?;
        }
        Ok(out)
    }
}

pub use super::fused::{frozen_matmul, log_softmax_last, rms_norm};

/// Softmax over the last dimension. On the CPU one fused pass per row
/// (`FusedSoftmax`: the attention scores are the largest activations, and
/// five separate elementwise passes over them cost more than the matmuls
/// around them); elsewhere built from differentiable primitives (candle's
/// fused softmax has no backward). The max is a constant shift, detached so
/// autograd does not trace it.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(FusedSoftmax { mask: None })?);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `softmax(scores + mask)` over the last dimension for attention scores
/// [B, H, T, T] and an additive mask [B, 1, T, T]. On the CPU the mask is
/// added inside the fused pass: as a separate broadcast add, autograd would
/// also keep a [B, H, T, T] gradient for the (constant) mask in every layer
/// until the step ends.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        let (b, _, t, t2) = scores.dims4()?;
        if mask.dims() != [b, 1, t, t2] {
            bail!("attention mask {:?} does not fit scores {:?}", mask.dims(), scores.dims());
        }
        let mask = to_f32_vec(mask)?;
        return Ok(scores.contiguous()?.apply_op1(FusedSoftmax { mask: Some(mask) })?);
    }
    softmax_last(&scores.broadcast_add(mask)?)
}

/// Row softmax with its gradient: forward fused on the CPU; backward
/// `dx = p ⊙ (g − Σ g⊙p)` per row. With a mask ([B, 1, T, T] flattened, the
/// input being [B, H, T, T]) row `r` of the input adds mask row
/// `(r / (H·T))·T + r % T` first; the mask is a constant (no gradient).
struct FusedSoftmax {
    mask: Option<Vec<f32>>,
}

impl CustomOp1 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "minnow-softmax-last"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let dims = layout.dims();
        let dim = *dims.last().unwrap_or(&1);
        // Mask row of input row r: (r / (H·T))·T + r % T, with T = dims[2].
        let (h, t) = if dims.len() == 4 { (dims[1], dims[2]) } else { (1, 1) };
        let mask = self.mask.as_deref();
        let mut out = vec![0f32; x.len()];
        let threads = candle_core::utils::get_num_threads().max(1);
        let rows = x.len() / dim.max(1);
        let per_rows = rows.div_ceil(threads).max(1);
        rayon::scope(|sc| {
            for (c, (o, xs)) in out.chunks_mut(per_rows * dim).zip(x.chunks(per_rows * dim)).enumerate() {
                sc.spawn(move |_| {
                    for (i, (orow, xrow)) in o.chunks_exact_mut(dim).zip(xs.chunks_exact(dim)).enumerate() {
                        let r = c * per_rows + i;
                        let m = mask.map(|m| {
                            let mr = (r / (h * t)) * t + r % t;
                            &m[mr * dim..(mr + 1) * dim]
                        });
                        match m {
                            Some(m) => orow.iter_mut().zip(xrow).zip(m).for_each(|((o, &x), &m)| *o = x + m),
                            None => orow.copy_from_slice(xrow),
                        }
                        let max = orow.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0f32;
                        for v in orow.iter_mut() {
                            *v = (*v - max).exp();
                            sum += *v;
                        }
                        let inv = 1.0 / sum;
                        orow.iter_mut().for_each(|v| *v *= inv);
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(super::fused::softmax_backward(res, grad)?))
    }
}

/// A custom op's input as a contiguous f32 slice (callers make it so).
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only");
    };
    Ok(&data[a..b])
}

/// RoPE tables for token positions `pos` (one per token of a [B, T] batch):
/// cos and sin, each [B, 1, T, n_rot/2]. Angles in f64 as the engine computes
/// them, `pos · base^(-2i/n_rot)`.
pub fn rope_tables(
    pos: &[u32],
    b: usize,
    t: usize,
    n_rot: usize,
    base: f32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = n_rot / 2;
    let inv: Vec<f64> = (0..half).map(|i| (base as f64).powf(-2.0 * i as f64 / n_rot as f64)).collect();
    let mut cos = Vec::with_capacity(pos.len() * half);
    let mut sin = Vec::with_capacity(pos.len() * half);
    for &p in pos {
        for &f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(cos, (b, 1, t, half), device)?, Tensor::from_vec(sin, (b, 1, t, half), device)?))
}

/// The additive mask of a packed batch: position i of a row sees position j
/// when both belong to the same example (`segment`) and j ≤ i. Shape
/// `[B, 1, T, T]`; `segment` is `[B*T]` (padding is its own segment per position
/// run, so every row sees at least itself and the softmax never divides by 0).
pub fn packed_mask(segment: &[u32], b: usize, t: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; b * t * t];
    for r in 0..b {
        let seg = &segment[r * t..(r + 1) * t];
        for i in 0..t {
            for j in 0..t {
                if j > i || seg[i] != seg[j] {
                    m[(r * t + i) * t + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, t), device)?)
}

/// A single unpacked sequence as a batch of one row, logits at every position.
pub fn single_sequence_input(tokens: &[u32], shape: &StudentShape, device: &Device) -> Result<ForwardInput> {
    let t = tokens.len();
    let pos: Vec<u32> = (0..t as u32).collect();
    let (cos, sin) = rope_tables(&pos, 1, t, shape.cfg.n_rot, shape.cfg.rope_base, device)?;
    Ok(ForwardInput {
        b: 1,
        t,
        tokens: Tensor::from_vec(tokens.to_vec(), t, device)?,
        cos,
        sin,
        mask: packed_mask(&vec![0; t], 1, t, device)?,
        pick: Tensor::from_vec(pos, t, device)?,
    })
}

/// f32 values of a tensor, flattened.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

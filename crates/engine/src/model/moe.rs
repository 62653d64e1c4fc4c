//! The mixture-of-experts feed-forward layer, shared by every MoE family
//! (Mixtral-style `llama`, `qwen2moe`, `qwen3moe`), and its router statistics.
//!
//! Per token: router logits `W_r · x`, softmax over all experts, the k most
//! probable experts (ties go to the lower expert id), their probabilities
//! renormalised to sum to 1 or not (per family); the output is the
//! probability-weighted sum of the chosen experts' SiLU-gated FFNs, plus for
//! qwen2moe an always-on shared expert scaled by `sigmoid(w_s · x)`.
//!
//! Only chosen experts are computed. For a batch of rows (a prompt, or one
//! token of each of several sequences) the rows are grouped by expert: each
//! expert that any row chose gathers those rows and runs its three matmuls on
//! just them, so its weights are read once per forward call whatever the
//! batch size, and an expert nobody chose costs nothing. Every chosen
//! expert's gate and up products run as one job of the thread pool, and
//! every one's down product as another (`matmul_each`), the shared expert's
//! products riding the same two, so a layer hands work to the threads three
//! times (router, gate/up, down) whatever `k`.
//!
//! Batch invariance: the matmul gives a row the same result whatever other
//! rows are in the batch, and each row's expert outputs are added in
//! ascending expert order, so a token gets bit-identical output alone or in a
//! batch (the fixture tests check this).

use super::config::MoeConfig;
use super::transformer::{mm, mm_each, Ffn};
use super::weights::{ExpertMatrices, Matrix, TensorLoader};
use super::ModelError;
use minnow_kernels::matmul::{Product, QMatrix};
use minnow_kernels::ops;
use minnow_kernels::pool::ThreadPool;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Qwen2-MoE's shared expert: a dense FFN every token goes through, scaled
/// per token by `sigmoid(gate · x)`.
pub(crate) struct SharedExpert {
    pub ffn: Ffn,
    /// Shape [n_embd].
    pub gate: Vec<f32>,
}

/// The weights of one MoE layer and its routing counters.
pub(crate) struct MoeFfn {
    /// [n_expert, n_embd].
    router: Matrix,
    /// Per expert [n_ff_exp, n_embd], [n_ff_exp, n_embd], [n_embd, n_ff_exp].
    gate: ExpertMatrices,
    up: ExpertMatrices,
    down: ExpertMatrices,
    shared: Option<SharedExpert>,
    n_used: usize,
    norm_topk: bool,
    /// Rows routed to each expert since load or the last reset. Atomics
    /// because the forward pass takes `&self` and may run on several threads.
    counts: Vec<AtomicU64>,
}

impl MoeFfn {
    /// Loads layer `l`'s router, experts and shared expert, checking every
    /// shape against the config.
    pub fn load(t: &TensorLoader, l: usize, n_embd: usize, moe: &MoeConfig) -> Result<MoeFfn, ModelError> {
        let p = |name: &str| format!("blk.{l}.{name}");
        let (e, ne, ff) = (n_embd, moe.n_expert, moe.n_ff_exp);
        let shared = match moe.n_ff_shared {
            Some(sf) => Some(SharedExpert {
                ffn: Ffn {
                    gate: t.matrix(&p("ffn_gate_shexp.weight"), sf, e)?,
                    up: t.matrix(&p("ffn_up_shexp.weight"), sf, e)?,
                    down: t.matrix(&p("ffn_down_shexp.weight"), e, sf)?,
                },
                gate: t.vector(&p("ffn_gate_inp_shexp.weight"), e)?,
            }),
            None => None,
        };
        Ok(MoeFfn {
            router: t.matrix(&p("ffn_gate_inp.weight"), ne, e)?,
            gate: t.experts(&p("ffn_gate_exps.weight"), ne, ff, e)?,
            up: t.experts(&p("ffn_up_exps.weight"), ne, ff, e)?,
            down: t.experts(&p("ffn_down_exps.weight"), ne, e, ff)?,
            shared,
            n_used: moe.n_expert_used,
            norm_topk: moe.norm_topk,
            counts: (0..ne).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// x [n, n_embd] (already normed) → [n, n_embd].
    pub fn forward(&self, pool: &ThreadPool, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        let e = self.router.cols;
        let (n_expert, k) = (self.router.rows, self.n_used);

        // Route every row: `choice[r*k + j]` is row r's j-th expert.
        let logits = mm(pool, &self.router, x, n)?;
        let mut choice = vec![0u32; n * k];
        let mut weight = vec![0f32; n * k];
        let mut scratch = Vec::with_capacity(n_expert);
        for r in 0..n {
            route(
                &logits[r * n_expert..(r + 1) * n_expert],
                self.norm_topk,
                &mut choice[r * k..(r + 1) * k],
                &mut weight[r * k..(r + 1) * k],
                &mut scratch,
            );
        }

        // Group by expert: the (row, slot) indices routed to each, in row order.
        let mut slots_of: Vec<Vec<usize>> = vec![Vec::new(); n_expert];
        for (s, &c) in choice.iter().enumerate() {
            slots_of[c as usize].push(s);
        }

        // The chosen experts, ascending, with the rows routed to each
        // gathered (a single row, or every row in order, is `x` itself:
        // one quantization serves every expert then).
        let chosen: Vec<(usize, &[usize])> =
            slots_of.iter().enumerate().filter(|(_, s)| !s.is_empty()).map(|(ex, s)| (ex, s.as_slice())).collect();
        let inputs: Vec<Cow<[f32]>> = chosen
            .iter()
            .map(|&(ex, slots)| {
                self.counts[ex].fetch_add(slots.len() as u64, Ordering::Relaxed);
                if slots.len() == n && slots.iter().enumerate().all(|(i, &s)| s / k == i) {
                    Cow::Borrowed(x)
                } else {
                    Cow::Owned(slots.iter().flat_map(|&s| &x[(s / k) * e..(s / k + 1) * e]).copied().collect())
                }
            })
            .collect();
        // Every chosen expert's gate and up in one job of the pool, then
        // every one's down in another: two hand-offs a layer, not two per
        // expert.
        let gates: Vec<QMatrix> = chosen.iter().map(|&(ex, _)| self.gate.expert(ex)).collect();
        let ups: Vec<QMatrix> = chosen.iter().map(|&(ex, _)| self.up.expert(ex)).collect();
        let downs: Vec<QMatrix> = chosen.iter().map(|&(ex, _)| self.down.expert(ex)).collect();
        let ff = gates.first().map_or(0, |g| g.rows);
        let mut g: Vec<Vec<f32>> = chosen.iter().map(|&(_, s)| vec![0f32; s.len() * ff]).collect();
        let mut u: Vec<Vec<f32>> = chosen.iter().map(|&(_, s)| vec![0f32; s.len() * ff]).collect();
        // The shared expert (qwen2moe) rides the same two jobs, on every row.
        let shared: Option<[QMatrix; 3]> = self.shared.as_ref().map(|s| [s.ffn.gate.q(), s.ffn.up.q(), s.ffn.down.q()]);
        let sf = shared.as_ref().map_or(0, |q| q[0].rows);
        let (mut sg, mut su, mut sy) = (vec![0f32; n * sf], vec![0f32; n * sf], vec![0f32; n * e]);
        {
            let mut products: Vec<Product> = Vec::with_capacity(2 * chosen.len() + 2);
            for (i, (gi, ui)) in g.iter_mut().zip(u.iter_mut()).enumerate() {
                let m = chosen[i].1.len();
                products.push(Product { w: &gates[i], x: &inputs[i], n: m, out: gi });
                products.push(Product { w: &ups[i], x: &inputs[i], n: m, out: ui });
            }
            if let Some([sgw, suw, _]) = &shared {
                products.push(Product { w: sgw, x, n, out: &mut sg });
                products.push(Product { w: suw, x, n, out: &mut su });
            }
            mm_each(pool, &mut products)?;
        }
        for (gi, ui) in g.iter_mut().zip(&u) {
            ops::gated_silu(gi, ui);
        }
        ops::gated_silu(&mut sg, &su);
        let mut d: Vec<Vec<f32>> = chosen.iter().map(|&(_, s)| vec![0f32; s.len() * e]).collect();
        {
            let mut products: Vec<Product> = d
                .iter_mut()
                .enumerate()
                .map(|(i, di)| Product { w: &downs[i], x: &g[i], n: chosen[i].1.len(), out: di })
                .collect();
            if let Some([_, _, sdw]) = &shared {
                products.push(Product { w: sdw, x: &sg, n, out: &mut sy });
            }
            mm_each(pool, &mut products)?;
        }
        // Ascending expert order fixes each row's summation order (see the
        // module doc on batch invariance).
        let mut out = vec![0f32; n * e];
        for (&(_, slots), di) in chosen.iter().zip(&d) {
            for (i, &s) in slots.iter().enumerate() {
                let (r, w) = (s / k, weight[s]);
                for (o, &v) in out[r * e..(r + 1) * e].iter_mut().zip(&di[i * e..(i + 1) * e]) {
                    *o += w * v;
                }
            }
        }

        if let Some(sh) = &self.shared {
            let y = &sy;
            for r in 0..n {
                let xr = &x[r * e..(r + 1) * e];
                let z: f32 = xr.iter().zip(&sh.gate).map(|(a, b)| a * b).sum();
                let g = 1.0 / (1.0 + (-z).exp());
                for (o, &v) in out[r * e..(r + 1) * e].iter_mut().zip(&y[r * e..(r + 1) * e]) {
                    *o += g * v;
                }
            }
        }
        Ok(out)
    }

    /// Rows routed to each expert since load or the last reset.
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn reset_counts(&self) {
        self.counts.iter().for_each(|c| c.store(0, Ordering::Relaxed));
    }
}

/// Routes one row: softmax of the router `logits`, then the `experts.len()`
/// most probable experts in descending probability (ties to the lower id)
/// into `experts`, and their probabilities, renormalised to sum to 1 if
/// `renormalise`, into `weights`. `probs` is scratch.
pub(crate) fn route(logits: &[f32], renormalise: bool, experts: &mut [u32], weights: &mut [f32], probs: &mut Vec<f32>) {
    probs.clear();
    probs.extend_from_slice(logits);
    ops::softmax_inplace(probs);
    // k is small (2..8): k passes of argmax beat sorting all experts.
    for j in 0..experts.len() {
        let mut best: Option<usize> = None;
        for (i, &p) in probs.iter().enumerate() {
            if experts[..j].contains(&(i as u32)) {
                continue;
            }
            // Strict `>`: an equal probability further on does not displace
            // the lower id. (NaN logits make everything NaN; any distinct
            // experts will do then.)
            if best.is_none_or(|b| p > probs[b]) {
                best = Some(i);
            }
        }
        let b = best.expect("k <= n_expert is checked at load");
        experts[j] = b as u32;
        weights[j] = probs[b];
    }
    if renormalise {
        let sum: f32 = weights.iter().sum();
        if sum > 0.0 {
            weights.iter_mut().for_each(|w| *w /= sum);
        }
    }
}

/// How a MoE model's routers spread tokens over experts: a snapshot of the
/// counters, taken by [`super::Model::router_stats`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouterStats {
    /// Experts each token is routed to (the k of top-k).
    pub experts_per_token: usize,
    /// `counts[layer][expert]`: tokens that layer routed to that expert
    /// since load or the last reset. Each token counts once in each of the
    /// k experts it was routed to, so a layer's counts sum to
    /// tokens × `experts_per_token`.
    pub counts: Vec<Vec<u64>>,
}

/// Summary of one layer's routing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerRouting {
    pub layer: usize,
    pub tokens: u64,
    /// Experts that received no token.
    pub unused: usize,
    /// Busiest expert's count over the mean count: 1 is perfectly balanced.
    pub max_over_mean: f64,
    /// Entropy of the distribution over experts divided by its maximum
    /// (ln n_expert): 1 is uniform, 0 is a single expert.
    pub entropy: f64,
    /// Each expert's share of the layer's routing decisions (sums to 1).
    pub shares: Vec<f64>,
}

/// Above this many experts the table lists the busiest experts instead of
/// one column per expert.
const TABLE_MAX_COLUMNS: usize = 16;

impl RouterStats {
    pub fn n_layer(&self) -> usize {
        self.counts.len()
    }

    pub fn n_expert(&self) -> usize {
        self.counts.first().map_or(0, |c| c.len())
    }

    /// Tokens routed since the last reset (the same in every layer).
    pub fn tokens(&self) -> u64 {
        self.counts.first().map_or(0, |c| c.iter().sum::<u64>() / self.experts_per_token.max(1) as u64)
    }

    /// The summary of layer `l`.
    pub fn layer(&self, l: usize) -> LayerRouting {
        let c = &self.counts[l];
        let total: u64 = c.iter().sum();
        let shares: Vec<f64> = c.iter().map(|&x| if total == 0 { 0.0 } else { x as f64 / total as f64 }).collect();
        let mean = total as f64 / c.len().max(1) as f64;
        let max = c.iter().copied().max().unwrap_or(0) as f64;
        let h: f64 = shares.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
        LayerRouting {
            layer: l,
            tokens: total / self.experts_per_token.max(1) as u64,
            unused: c.iter().filter(|&&x| x == 0).count(),
            max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
            entropy: if c.len() > 1 && total > 0 { h / (c.len() as f64).ln() } else { 0.0 },
            shares,
        }
    }

    /// Every layer's summary, e.g. for JSON output.
    pub fn layers(&self) -> Vec<LayerRouting> {
        (0..self.n_layer()).map(|l| self.layer(l)).collect()
    }

    /// A plain-text table, one line per layer: unused experts, load
    /// imbalance (max/mean), normalised entropy, then each expert's share in
    /// percent (or, with many experts, the busiest four).
    pub fn format_table(&self) -> String {
        let ne = self.n_expert();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "router statistics: {} tokens, {} layers, {ne} experts per layer, {} per token",
            self.tokens(),
            self.n_layer(),
            self.experts_per_token
        );
        let wide = ne <= TABLE_MAX_COLUMNS;
        let _ = write!(s, "layer  unused  max/mean  entropy ");
        if wide {
            let _ = write!(s, " share per expert (%)");
            let _ = writeln!(s);
            let _ = write!(s, "{:33}", "");
            for e in 0..ne {
                let _ = write!(s, " {:>5}", format!("e{e}"));
            }
        } else {
            let _ = write!(s, " busiest experts (share %)");
        }
        let _ = writeln!(s);
        for l in 0..self.n_layer() {
            let r = self.layer(l);
            let _ = write!(s, "{l:>5}  {:>6}  {:>8.2}  {:>7.3} ", r.unused, r.max_over_mean, r.entropy);
            if wide {
                for p in &r.shares {
                    let _ = write!(s, " {:>5.1}", p * 100.0);
                }
            } else {
                let mut order: Vec<usize> = (0..ne).collect();
                order.sort_by(|&a, &b| r.shares[b].total_cmp(&r.shares[a]).then(a.cmp(&b)));
                for &e in order.iter().take(4) {
                    let _ = write!(s, " e{e} {:.1}", r.shares[e] * 100.0);
                }
            }
            let _ = writeln!(s);
        }
        s
    }
}

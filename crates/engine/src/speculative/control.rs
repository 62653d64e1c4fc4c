//! The controller: per draft source, measured acceptance and cost, the
//! draft length each round gets, and when speculation switches itself off
//! (and back on to re-measure); and the speculator's own random stream.

use super::*;

/// The speculator's own uniform draws (acceptance tests, draft and residual
/// draws), separate from the target sampler's stream.
#[derive(Clone, Debug)]
pub(super) struct SplitMix(pub(super) SplitMix64);

impl SplitMix {
    pub(super) fn new(seed: u64) -> SplitMix {
        SplitMix(SplitMix64::new(seed ^ 0x5bd1_e995_9e37_79b9))
    }
    pub(super) fn next_f64(&mut self) -> f64 {
        self.0.next_f64()
    }
}

/// Exponential moving average, empty until the first sample.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Ema(pub(super) Option<f64>);

impl Ema {
    pub(super) fn add(&mut self, x: f64, w: f64) {
        self.0 = Some(match self.0 {
            None => x,
            Some(m) => m + w * (x - m),
        });
    }
}

/// A ratio of exponentially decayed sums, `Σ num / Σ den`: an average that
/// weighs each sample by its size and keeps noisy samples unclamped (a
/// per-sample `max(0, x)` would bias it upwards).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Ratio {
    pub(super) num: f64,
    pub(super) den: f64,
}

impl Ratio {
    const DECAY: f64 = 0.85;

    pub(super) fn add(&mut self, num: f64, den: f64) {
        self.num = Self::DECAY * self.num + num;
        self.den = Self::DECAY * self.den + den;
    }

    pub(super) fn get(&self) -> Option<f64> {
        (self.den > 0.0).then(|| self.num / self.den)
    }
}

/// Where a round's drafts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Src {
    Model,
    /// Prompt lookup: the prompt and the output so far.
    NGram,
    /// What earlier answers agree on ([`crate::speculative::memory`]): skeleton
    /// text, accepted far more often than prompt copies (a copied value runs
    /// on past its end), so it gets its own acceptance rate and length.
    Memory,
}

/// Acceptance, measured speed and on/off state of one draft source.
#[derive(Clone, Debug)]
pub(super) struct SourceState {
    /// Whether the speculator has this source at all.
    pub(super) present: bool,
    /// Accepted drafts per draft examined (up to and including the first
    /// rejection): `α`.
    pub(super) alpha: Ratio,
    /// Tokens committed per second of this source's rounds (drafting and
    /// verifying), measured.
    pub(super) speed: Ratio,
    /// Rounds since the source was (re)enabled.
    pub(super) rounds: usize,
    /// Off until this many tokens are generated.
    pub(super) off_until: usize,
    /// Tokens to stay off the next time the source loses.
    pub(super) backoff: usize,
}

/// Rounds a source runs before it may be judged.
pub(super) const PROBE_ROUNDS: usize = 4;

impl SourceState {
    pub(super) fn new(present: bool) -> SourceState {
        SourceState { present, alpha: Ratio::default(), speed: Ratio::default(), rounds: 0, off_until: 0, backoff: 16 }
    }

    pub(super) fn alpha(&self) -> f64 {
        // A prior of 0.6 worth 2 trials.
        ((self.alpha.num + 1.2) / (self.alpha.den + 2.0)).clamp(0.02, 0.98)
    }
}

/// Draft lengths for the next step; 0 means "do not use this source".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) model: usize,
    pub(super) ngram: usize,
    pub(super) memory: usize,
}

/// Picks draft lengths and decides whether speculation pays (see the
/// module doc).
#[derive(Clone, Debug)]
pub(super) struct Controller {
    pub(super) adaptive: bool,
    pub(super) auto_off: bool,
    pub(super) k_start: usize,
    pub(super) k_max: usize,
    /// Seconds of a plain one-token step.
    pub(super) t_plain: Ema,
    /// Extra seconds per drafted token in a verifying pass (over `t_plain`).
    pub(super) t_extra: Ratio,
    /// Seconds per draft model forward pass.
    pub(super) t_draft: Ratio,
    pub(super) model: SourceState,
    pub(super) ngram: SourceState,
    pub(super) memory: SourceState,
    pub(super) rounds_since_plain: usize,
}

/// Rounds between plain steps that refresh the plain step time.
pub(super) const REMEASURE_EVERY: usize = 32;

impl Controller {
    pub(super) fn new(cfg: &SpecConfig, model: bool, ngram: bool) -> Controller {
        Controller {
            adaptive: cfg.adaptive,
            auto_off: cfg.auto_off && cfg.adaptive,
            k_start: cfg.k_start.max(1),
            k_max: cfg.k_max.max(cfg.k_start).max(1),
            t_plain: Ema::default(),
            t_extra: Ratio::default(),
            t_draft: Ratio::default(),
            model: SourceState::new(model),
            ngram: SourceState::new(ngram),
            // Present with text lookup; silent unless references are set.
            memory: SourceState::new(ngram && cfg.lookup == Lookup::Text),
            rounds_since_plain: 0,
        }
    }

    pub(super) fn source(&mut self, src: Src) -> &mut SourceState {
        match src {
            Src::Model => &mut self.model,
            Src::NGram => &mut self.ngram,
            Src::Memory => &mut self.memory,
        }
    }

    /// Expected tokens per second of a round of `k` drafts from `src`: `(1 −
    /// α^(k+1)) / (1 − α)` tokens for `t_plain + k (t_extra + t_draft)`.
    pub(super) fn rate(&self, src: Src, k: usize, t_plain: f64) -> f64 {
        let (a, draft) = match src {
            Src::Model => (self.model.alpha(), self.t_draft.get().unwrap_or(0.3 * t_plain)),
            Src::NGram => (self.ngram.alpha(), 0.0),
            Src::Memory => (self.memory.alpha(), 0.0),
        };
        let tokens = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
        let extra = self.t_extra.get().unwrap_or(0.1 * t_plain).max(0.0);
        tokens / (t_plain + k as f64 * (extra + draft))
    }

    /// The best draft length of `src` and its predicted rate.
    pub(super) fn best(&self, src: Src, t_plain: f64) -> (usize, f64) {
        let (mut best_k, mut best) = (1, 0.0);
        for k in 1..=self.k_max {
            let r = self.rate(src, k, t_plain);
            if r > best {
                (best_k, best) = (k, r);
            }
        }
        (best_k, best)
    }

    /// Decides one source: its draft length, or 0 while it is off. A source
    /// that has run its probe rounds is switched off when both its predicted
    /// and its measured speed fall below `beat` (tokens per second): one
    /// noisy estimate alone does not turn it off.
    pub(super) fn decide(
        &mut self,
        src: Src,
        generated: usize,
        t_plain: f64,
        beat: f64,
        stats: &mut SpecStats,
    ) -> usize {
        let (k, predicted) = self.best(src, t_plain);
        let (auto_off, k_start) = (self.auto_off, self.k_start);
        let st = self.source(src);
        if !st.present || generated < st.off_until {
            return 0;
        }
        if st.rounds < PROBE_ROUNDS {
            // Try the starting length: estimates are still mostly prior.
            return k.max(k_start);
        }
        let measured = st.speed.get().unwrap_or(f64::INFINITY);
        if auto_off && predicted < 0.95 * beat && measured < 0.95 * beat {
            st.off_until = generated + st.backoff;
            st.backoff = (st.backoff * 2).min(512);
            st.rounds = 0;
            st.speed = Ratio::default();
            stats.switched_off += 1;
            return 0;
        }
        k
    }

    /// Draft lengths for the next step. All zero: a plain step.
    pub(super) fn plan(&mut self, generated: usize, stats: &mut SpecStats) -> Plan {
        if !self.adaptive {
            let k = self.k_start;
            let on = |s: &SourceState| if s.present { k } else { 0 };
            return Plan { model: on(&self.model), ngram: on(&self.ngram), memory: on(&self.memory) };
        }
        let Some(t_plain) = self.t_plain.0 else { return Plan::default() };
        if self.rounds_since_plain >= REMEASURE_EVERY {
            return Plan::default();
        }
        let model = self.decide(Src::Model, generated, t_plain, 1.0 / t_plain, stats);
        // Prompt lookup must beat the draft model where that runs.
        let beat = if model > 0 { self.best(Src::Model, t_plain).1.max(1.0 / t_plain) } else { 1.0 / t_plain };
        let ngram = self.decide(Src::NGram, generated, t_plain, beat, stats);
        let memory = self.decide(Src::Memory, generated, t_plain, beat, stats);
        Plan { model, ngram, memory }
    }

    /// Whether every present source is switched off.
    pub(super) fn all_off(&self, generated: usize) -> bool {
        let off = |s: &SourceState| !s.present || generated < s.off_until;
        self.adaptive && off(&self.model) && off(&self.ngram) && off(&self.memory)
    }

    pub(super) fn record_plain(&mut self, secs: f64) {
        // A slow average: one step on a loaded machine can take twice as long as the next.
        self.t_plain.add(secs, 0.2);
        self.rounds_since_plain = 0;
    }

    /// Records a round: `committed` tokens, verified in `verify_secs`, after
    /// `draft_passes` draft passes taking `draft_secs` (single-token passes
    /// only) out of `draft_total` seconds of drafting.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_round(
        &mut self,
        src: Src,
        drafted: usize,
        accepted: usize,
        committed: usize,
        verify_secs: f64,
        (draft_secs, draft_passes): (f64, usize),
        draft_total: f64,
    ) {
        self.rounds_since_plain += 1;
        let t_plain = self.t_plain.0;
        let st = self.source(src);
        st.rounds += 1;
        let examined = if accepted < drafted { accepted + 1 } else { accepted };
        st.alpha.add(accepted as f64, examined as f64);
        st.speed.add(committed as f64, verify_secs + draft_total);
        if let Some(tp) = t_plain {
            self.t_extra.add(verify_secs - tp, drafted as f64);
        }
        if draft_passes > 0 {
            self.t_draft.add(draft_secs, draft_passes as f64);
        }
    }
}

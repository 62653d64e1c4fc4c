//! One round: draft (or not), verify the drafts against the target in one
//! forward pass by rejection sampling through the sequence's own
//! distribution, commit what is accepted plus one target token.

use super::*;

/// One round's view of a sequence: the models, the sequence's target cache
/// and [`Sequence`], its speculation state. Built by [`SpecSeq::step`].
pub(super) struct Round<'r> {
    pub(super) target: &'r Model,
    pub(super) tokenizer: &'r Tokenizer,
    pub(super) draft: Option<&'r Model>,
    /// Holds every committed token but the last between rounds.
    pub(super) cache: &'r mut KvCache,
    pub(super) sequence: &'r mut Sequence,
    pub(super) seq: &'r mut SpecSeq,
}

/// Receives each committed token and what [`Sequence::push`] said of it.
pub(super) type OnToken<'a> = dyn FnMut(u32, Pushed) + 'a;

impl Round<'_> {
    /// Drafts (or not), verifies and commits: one target pass. True when
    /// the sequence ends.
    pub(super) fn run(&mut self, pool: &ThreadPool, on_token: &mut OnToken) -> Result<bool, ModelError> {
        let max_len = self.cache.max_len();
        let remaining = self.sequence.tokens_left();
        let room = max_len - self.cache.len() - 1;
        // Drafting the last allowed token gains nothing over a plain
        // step (one target pass either way); fixed-length runs do it anyway
        // so that every token goes through verification.
        let cap = if self.seq.ctl.adaptive { remaining - 1 } else { remaining };
        let generated = self.seq.generated();
        let plan = self.seq.ctl.plan(generated, &mut self.seq.stats);
        let (kn, km) = (plan.ngram.min(cap).min(room), plan.model.min(cap).min(room));
        let k_mem = plan.memory.min(cap).min(room);
        let mut src = Src::NGram;
        let mut drafts = Vec::new();
        let draft_secs0 = self.seq.stats.draft_secs;
        if kn > 0 || k_mem > 0 {
            let ids = match self.seq.lookup {
                Lookup::Text => {
                    let (ids, from) = text_lookup_propose(self.tokenizer, self.seq, kn, k_mem);
                    src = from;
                    ids
                }
                Lookup::Tokens => ngram_propose(&self.seq.hist, kn, self.seq.ngram.0, self.seq.ngram.1),
            };
            drafts = ids.into_iter().map(|id| Drafted { id, q: None }).collect();
        }
        if drafts.is_empty() && km > 0 {
            src = Src::Model;
            let s = &mut *self.seq;
            if let (Drafter::Model(d), Some(model)) = (&mut s.drafter, self.draft) {
                drafts = d.propose(model, pool, &s.hist, km, &mut s.rng, &mut s.stats)?;
            }
        }
        // A draft the sequence's constraint rejects is cut before it costs
        // a verification row (verification would reject it anyway: its
        // probability under the masked distribution is 0).
        let allowed = self.sequence.allowed_prefix(&drafts.iter().map(|d| d.id).collect::<Vec<_>>());
        drafts.truncate(allowed);
        if drafts.is_empty() {
            let off = self.seq.ctl.all_off(generated);
            return self.plain_step(pool, off, on_token);
        }
        let timing = match (&self.seq.drafter, src) {
            (Drafter::Model(d), Src::Model) => d.timing,
            _ => (0.0, 0),
        };
        let cost = (timing, self.seq.stats.draft_secs - draft_secs0);
        self.verify(pool, src, &drafts, cost, on_token)
    }

    /// Commits a token to the speculation history and the sequence (whose
    /// sampler has seen it already if it drew it); true when it ends there.
    pub(super) fn commit(&mut self, id: u32, sampled: bool, on_token: &mut OnToken) -> bool {
        self.seq.push(self.tokenizer, id);
        let p = self.sequence.push(self.tokenizer, id, sampled, None);
        let done = p.finish.is_some();
        on_token(id, p);
        done
    }

    /// One token without drafts; true when generation ends.
    pub(super) fn plain_step(
        &mut self,
        pool: &ThreadPool,
        while_off: bool,
        on_token: &mut OnToken,
    ) -> Result<bool, ModelError> {
        let last = *self.seq.hist.last().expect("prefilled");
        let t = Instant::now();
        let logits = self.target.forward_one(pool, self.cache, &[last], Logits::Last)?;
        let secs = t.elapsed().as_secs_f64();
        self.seq.ctl.record_plain(secs);
        self.seq.stats.target_forwards += 1;
        self.seq.stats.plain_steps += 1;
        self.seq.stats.target_secs += secs;
        if while_off {
            self.seq.stats.tokens_while_off += 1;
        }
        if self.seq.debug {
            eprintln!("[spec] plain step {:.1} ms{}", secs * 1e3, if while_off { " (speculation off)" } else { "" });
        }
        let next = self.sequence.sample(&logits);
        Ok(self.commit(next, true, on_token))
    }

    /// Verifies `drafts` in one target pass and commits what is accepted plus
    /// one target token; true when generation ends.
    pub(super) fn verify(
        &mut self,
        pool: &ThreadPool,
        src: Src,
        drafts: &[Drafted],
        ((draft_secs, draft_passes), draft_total): ((f64, usize), f64),
        on_token: &mut OnToken,
    ) -> Result<bool, ModelError> {
        let base = self.cache.len();
        let committed0 = self.sequence.ids().len();
        let mut toks = Vec::with_capacity(drafts.len() + 1);
        toks.push(*self.seq.hist.last().expect("prefilled"));
        toks.extend(drafts.iter().map(|d| d.id));
        let t = Instant::now();
        let rows = self.target.forward_one(pool, self.cache, &toks, Logits::All)?;
        let verify_secs = t.elapsed().as_secs_f64();
        self.seq.stats.target_forwards += 1;
        self.seq.stats.target_secs += verify_secs;
        self.seq.stats.rounds += 1;
        self.seq.stats.drafted += drafts.len();
        let vocab = rows.len() / toks.len();
        let mut accepted = 0;
        let mut done = false;
        let mut rejected = false;
        for (j, d) in drafts.iter().enumerate() {
            let row = &rows[j * vocab..(j + 1) * vocab];
            let p = self.sequence.distribution(row);
            let (px, qx) = (lookup(&p, d.id), d.q_of(d.id));
            let accept = px > 0.0 && (px >= qx || self.seq.rng.next_f64() * (qx as f64) < px as f64);
            if accept {
                accepted += 1;
                if self.commit(d.id, false, on_token) {
                    done = true;
                    break;
                }
            } else {
                let y = self.residual(&p, d);
                rejected = true;
                done = self.commit(y, false, on_token);
                break;
            }
        }
        self.seq.stats.accepted += accepted;
        if src != Src::Model {
            self.seq.stats.ngram_drafted += drafts.len();
            self.seq.stats.ngram_accepted += accepted;
        }
        if src == Src::Memory {
            self.seq.stats.memory_drafted += drafts.len();
            self.seq.stats.memory_accepted += accepted;
        }
        if !done && !rejected {
            let row = &rows[drafts.len() * vocab..];
            let y = self.sequence.sample(row);
            done = self.commit(y, true, on_token);
        }
        // Keep `last` and the accepted drafts; drop the rest.
        self.cache.truncate(base + 1 + accepted);
        let committed = self.sequence.ids().len() - committed0;
        self.seq.ctl.record_round(
            src,
            drafts.len(),
            accepted,
            committed,
            verify_secs,
            (draft_secs, draft_passes),
            draft_total,
        );
        if self.seq.debug {
            let c = &self.seq.ctl;
            eprintln!(
                "[spec] {src:?} {accepted}/{} accepted {:?} | verify {:.1} ms, draft {:.1} ms in {draft_passes} passes | \
                 α model {:.2} ngram {:.2} | t_plain {:.1} t_extra {:.1} t_draft {:.1} ms | \
                 measured tok/s model {:.2} ngram {:.2}",
                drafts.len(),
                drafts.iter().map(|d| self.tokenizer.token_text(d.id)).collect::<Vec<_>>(),
                verify_secs * 1e3,
                draft_secs * 1e3,
                c.model.alpha(),
                c.ngram.alpha(),
                c.t_plain.0.unwrap_or(0.0) * 1e3,
                c.t_extra.get().unwrap_or(0.0) * 1e3,
                c.t_draft.get().unwrap_or(0.0) * 1e3,
                c.model.speed.get().unwrap_or(0.0),
                c.ngram.speed.get().unwrap_or(0.0),
            );
        }
        Ok(done)
    }

    /// A draw from `normalize(max(0, p − q))` after draft `d` was rejected.
    pub(super) fn residual(&mut self, p: &[(u32, f32)], d: &Drafted) -> u32 {
        let u = self.seq.rng.next_f64();
        let r = residual_dist(p, d, &mut self.seq.scratch);
        if r.is_empty() {
            // p == q up to rounding: the rejection had probability ~0.
            return draw(p, u);
        }
        draw(&r, u)
    }
}

/// `max(0, p − q)` over `p`'s support (unnormalised; [`draw`] normalises),
/// in `p`'s order. `scratch` is vocabulary-sized and all zero; it is left so.
pub(super) fn residual_dist(p: &[(u32, f32)], d: &Drafted, scratch: &mut [f32]) -> Vec<(u32, f32)> {
    let set = |s: &mut [f32], on: bool| match &d.q {
        None => {
            if let Some(x) = s.get_mut(d.id as usize) {
                *x = on as u32 as f32;
            }
        }
        Some(q) => {
            for &(t, w) in q {
                if let Some(x) = s.get_mut(t as usize) {
                    *x = if on { w } else { 0.0 };
                }
            }
        }
    };
    set(scratch, true);
    let r = p
        .iter()
        .map(|&(t, w)| (t, (w - scratch.get(t as usize).copied().unwrap_or(0.0)).max(0.0)))
        .filter(|&(_, w)| w > 0.0)
        .collect();
    set(scratch, false);
    r
}

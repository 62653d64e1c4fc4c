//! Every way minnow decodes stops at the same token for the same reason:
//! `generate` (`minnow run`), `generate_n` with n = 1 (`run --n 1`), the
//! speculator with a draft model (`run --draft`) and with prompt lookup
//! (`run --lookup`), and the scheduler (`serve`, the local teacher), plain
//! and speculating — greedy, on SmolLM2, for the golden prompts and for each
//! way a sequence ends: `max_tokens`, an end-of-generation token, a stop
//! string that spans two tokens, and a prompt that fills the context.
//! They share one [`minnow_engine::sequence::Sequence`]; this test is what
//! keeps a fifth path from drifting.

mod common;

use minnow_engine::generate::{generate, FinishReason, GenerateParams};
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::SamplingParams;
use minnow_engine::scheduler::{EventSink, GenEvent, GenRequest, Scheduler, SchedulerConfig, Speculation};
use minnow_engine::speculative::{generate_speculative, Draft, SpecConfig};
use minnow_engine::vote::generate_n;
use minnow_kernels::pool::ThreadPool;
use std::sync::mpsc::channel;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn smollm2() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| {
        let path = common::model_path("smollm2-135m-instruct-q4_1.gguf");
        Arc::new(LoadedModel::load(&path).unwrap_or_else(|e| panic!("{e}")))
    })
    .clone()
}

/// What a path produced: generated ids without a final end-of-generation
/// token (the scheduler sends none for it), the text, why it ended, and
/// whether it ended on an end-of-generation token.
#[derive(Debug, Clone, PartialEq)]
struct Out {
    ids: Vec<u32>,
    text: String,
    finish: FinishReason,
    eog: bool,
}

fn out(m: &LoadedModel, mut ids: Vec<u32>, text: String, finish: FinishReason) -> Out {
    let eog = ids.last().is_some_and(|&t| m.tokenizer.is_end_of_generation(t)) && finish == FinishReason::Stop;
    if eog {
        ids.pop();
    }
    Out { ids, text, finish, eog }
}

fn via_scheduler(m: &Arc<LoadedModel>, prompt: &[u32], params: &GenerateParams, ctx: usize, spec: bool) -> Out {
    let speculation = spec.then(|| Speculation { draft: None, config: SpecConfig::default() });
    let s = Scheduler::start(
        m.clone(),
        ThreadPool::new(2),
        SchedulerConfig { max_parallel: 2, ctx, speculation, ..SchedulerConfig::default() },
    );
    // The server's admission rule: prompt + max_tokens within the context.
    let max_tokens = params.max_tokens.min(ctx - prompt.len());
    let req = GenRequest::new(prompt.to_vec(), GenerateParams { max_tokens, ..params.clone() });
    let (tx, rx) = channel();
    let sink: EventSink = Box::new(move |ev| tx.send(ev).is_ok());
    s.submit(req, sink).unwrap();
    let (mut ids, mut text, mut finish) = (Vec::new(), String::new(), None);
    let completion_tokens = loop {
        match rx.recv_timeout(Duration::from_secs(120)).expect("no event") {
            GenEvent::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            GenEvent::Done { finish: f, text_tail, .. } => {
                text.push_str(&text_tail);
                finish = Some(f);
            }
            GenEvent::Finished { usage, .. } => break usage.completion_tokens,
            GenEvent::Error(e) | GenEvent::Cancelled(e) => panic!("scheduler: {e}"),
        }
    };
    s.shutdown(false);
    let finish = finish.expect("no Done event");
    let mut o = out(m, ids, text, finish);
    // An end-of-generation token has no Token event but is counted.
    o.eog = completion_tokens == o.ids.len() + 1 && finish == FinishReason::Stop;
    o
}

/// Every path on one prompt; all must equal the first (`generate`).
fn all_paths(prompt: &[u32], params: &GenerateParams, ctx: usize) -> Out {
    let m = smollm2();
    let pool = common::pool();
    let mut cache = m.model.new_cache(ctx);
    let g = generate(&m.model, &m.tokenizer, pool, &mut cache, prompt, params, |_| {}).unwrap();
    let reference = out(&m, g.ids, g.text, g.finish);

    let mut results = Vec::new();
    let n = generate_n(&m.model, &m.tokenizer, pool, ctx, prompt, params, 1, |_, _| {}).unwrap();
    let s = &n.samples[0];
    results.push(("generate_n (run --n 1)", out(&m, s.ids.clone(), s.text.clone(), s.finish)));
    for (name, draft) in [
        ("speculative, draft model (run --draft)", Draft::Model(&m.model)),
        ("speculative, lookup (run --lookup)", Draft::NGram),
    ] {
        let (g, _) = generate_speculative(
            &m.model,
            &m.tokenizer,
            pool,
            draft,
            ctx,
            prompt,
            params,
            &SpecConfig::default(),
            Vec::new(),
            |_| {},
        )
        .unwrap();
        results.push((name, out(&m, g.ids, g.text, g.finish)));
    }
    results.push(("scheduler (serve)", via_scheduler(&m, prompt, params, ctx, false)));
    results.push(("scheduler speculating (serve --lookup)", via_scheduler(&m, prompt, params, ctx, true)));
    for (name, o) in results {
        assert_eq!(o, reference, "{name} differs from generate (run) on prompt {prompt:?} with {params:?}");
    }
    reference
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams { max_tokens, sampling: SamplingParams::greedy(), ..GenerateParams::default() }
}

fn golden_prompts() -> Vec<Vec<u32>> {
    common::golden_prompts("smollm2-135m-instruct-q4_1")
}

#[test]
fn max_tokens_on_the_golden_prompts() {
    let _g = common::serial();
    for prompt in golden_prompts() {
        let o = all_paths(&prompt, &greedy(24), 1024);
        assert!(o.finish == FinishReason::Length && o.ids.len() == 24 || o.finish == FinishReason::Stop, "{o:?}");
    }
}

#[test]
fn an_end_of_generation_token() {
    let _g = common::serial();
    let m = smollm2();
    let text = "<|im_start|>user\nReply with one word: what colour is the sky?<|im_end|>\n<|im_start|>assistant\n";
    let prompt = m.tokenizer.encode(text, true, true).unwrap();
    let o = all_paths(&prompt, &greedy(64), 1024);
    assert!(o.eog && o.finish == FinishReason::Stop, "the case must end on an end-of-generation token: {o:?}");
}

#[test]
fn a_stop_string_across_two_tokens() {
    let _g = common::serial();
    let m = smollm2();
    let prompt = golden_prompts().remove(0);
    let free = all_paths(&prompt, &greedy(40), 1024);
    // A stop string straddling the boundary after token k: the last two
    // bytes of the text up to k and the first two after it.
    let mut chosen = None;
    for k in 6..free.ids.len() - 4 {
        let before = m.tokenizer.decode(&free.ids[..k]);
        let after = m.tokenizer.decode(&free.ids[..k + 1]);
        let (b, a) = (before.len(), after.len());
        if a < b + 2 || !before.is_char_boundary(b - 2) || !after.is_char_boundary(b + 2) {
            continue;
        }
        let stop = after[b - 2..b + 2].to_string();
        if free.text.find(&stop) == Some(b - 2) {
            chosen = Some((stop, b - 2));
            break;
        }
    }
    let (stop, at) = chosen.expect("no token boundary to put a stop string across");
    let params = GenerateParams { stop: vec![stop.clone()], ..greedy(40) };
    let o = all_paths(&prompt, &params, 1024);
    assert_eq!(o.finish, FinishReason::Stop, "{o:?}");
    assert_eq!(o.text, free.text[..at], "the text must end right before the stop string {stop:?}");
}

#[test]
fn a_prompt_that_fills_the_context() {
    let _g = common::serial();
    let prompt = golden_prompts().remove(0);
    let ctx = prompt.len() + 6;
    // End-of-generation tokens ignored so nothing but the context ends it.
    let params = GenerateParams { stop_at_eog: false, ..greedy(1000) };
    let o = all_paths(&prompt, &params, ctx);
    assert_eq!(o.finish, FinishReason::Length);
    assert_eq!(o.ids.len(), 6, "prompt + completion must fill the context exactly: {o:?}");
}

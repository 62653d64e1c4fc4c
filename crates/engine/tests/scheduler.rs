//! The continuous-batching scheduler on the real SmolLM2-135M: batch
//! invariance against single-sequence `generate`, shared-prefill samples,
//! the prefix cache, chunked prefill interleaved with decoding, cancellation,
//! admission errors, failure containment, shutdown, logprobs, throughput.
//!
//! Every wait has a timeout, so a scheduler bug fails a test instead of
//! hanging it. Tests run one at a time (a global lock): they share two cores,
//! and some check how steps interleave or how fast they go.

mod common;

use minnow_engine::generate::{self, FinishReason, GenerateParams};
use minnow_engine::loader::LoadedModel;
use minnow_engine::model::Logits;
use minnow_engine::sampler::SamplingParams;
use minnow_engine::scheduler::{
    EventSink, Fault, GenEvent, GenRequest, Scheduler, SchedulerConfig, SubmitError, TokenLogprob, Usage,
    SHUTDOWN_CANCEL_MESSAGE,
};
use minnow_kernels::pool::ThreadPool;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(180);

fn model() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| {
        let path = common::model_path("smollm2-135m-instruct-q4_1.gguf");
        Arc::new(LoadedModel::load(&path).unwrap_or_else(|e| panic!("{e}")))
    })
    .clone()
}

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(cfg: SchedulerConfig) -> Scheduler {
    Scheduler::start(model(), ThreadPool::new(2), cfg)
}

fn tokens(text: &str) -> Vec<u32> {
    model().tokenizer.encode(text, true, false).unwrap()
}

fn greedy(max_tokens: usize, stop_at_eog: bool) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stop_at_eog,
        constraint: None,
        logit_bias: Vec::new(),
        adapter: None,
    }
}

/// What one sample produced, as its events describe it.
#[derive(Debug, Clone, Default, PartialEq)]
struct SampleOut {
    ids: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    logprobs: Vec<TokenLogprob>,
}

#[derive(Debug)]
struct Outcome {
    samples: Vec<SampleOut>,
    usage: Usage,
    ttft_secs: f64,
    total_secs: f64,
}

fn channel_sink() -> (EventSink, Receiver<GenEvent>) {
    let (tx, rx) = channel();
    (Box::new(move |ev| tx.send(ev).is_ok()), rx)
}

/// Reads events until `Finished` (Ok) or `Error`/`Cancelled` (Err, the
/// message prefixed with `cancelled: ` for the latter), checking their order.
fn collect(rx: &Receiver<GenEvent>, n: usize) -> Result<Outcome, String> {
    let mut samples = vec![SampleOut::default(); n];
    loop {
        let ev = rx.recv_timeout(TIMEOUT).map_err(|e| format!("no event within {TIMEOUT:?}: {e}"))?;
        match ev {
            GenEvent::Token { index, id, text, logprob } => {
                let s = &mut samples[index];
                assert!(s.finish.is_none(), "token after Done");
                s.ids.push(id);
                s.text.push_str(&text);
                s.logprobs.extend(logprob);
            }
            GenEvent::Done { index, finish, text_tail } => {
                let s = &mut samples[index];
                assert!(s.finish.is_none(), "two Done events for sample {index}");
                s.text.push_str(&text_tail);
                s.finish = Some(finish);
            }
            GenEvent::Finished { usage, ttft_secs, total_secs } => {
                assert!(samples.iter().all(|s| s.finish.is_some()), "Finished before every Done");
                assert!(ttft_secs <= total_secs);
                return Ok(Outcome { samples, usage, ttft_secs, total_secs });
            }
            GenEvent::Error(e) => return Err(e),
            GenEvent::Cancelled(e) => return Err(format!("cancelled: {e}")),
        }
    }
}

fn run(s: &Scheduler, req: GenRequest) -> Outcome {
    let n = req.n;
    let (sink, rx) = channel_sink();
    s.submit(req, sink).unwrap();
    collect(&rx, n).unwrap()
}

/// The same request through single-sequence `generate`, as a SampleOut
/// (an end-of-generation token that stopped it has no Token event).
fn reference(prompt: &[u32], params: &GenerateParams) -> SampleOut {
    reference_counted(prompt, params).0
}

/// `reference`, and the tokens `generate` counts as generated.
fn reference_counted(prompt: &[u32], params: &GenerateParams) -> (SampleOut, usize) {
    let m = model();
    let mut cache = m.model.new_cache(4096);
    let g = generate::generate(&m.model, &m.tokenizer, common::pool(), &mut cache, prompt, params, |_| {}).unwrap();
    let count = g.gen_tokens;
    let mut ids = g.ids;
    if params.stop_at_eog
        && g.finish == FinishReason::Stop
        && ids.last().is_some_and(|&t| m.tokenizer.is_end_of_generation(t))
    {
        ids.pop();
    }
    (SampleOut { ids, text: g.text, finish: Some(g.finish), logprobs: Vec::new() }, count)
}

fn strip_logprobs(mut s: SampleOut) -> SampleOut {
    s.logprobs.clear();
    s
}

/// Polls `cond` until true or the timeout.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < TIMEOUT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at",
    "The quick brown fox",
    "In 1969, the first humans to walk on the Moon were",
    "A list of fruits: apple, banana,",
    "SELECT name FROM users WHERE",
    "The largest planet in our solar system is",
    "Photosynthesis is the process by which plants",
    "My favourite book is",
    "1, 2, 3, 4, 5,",
    "The opposite of hot is",
    "Rust is a programming language that",
];

fn mixed_params(i: usize) -> GenerateParams {
    let mut p = greedy(20, i.is_multiple_of(2));
    if i % 4 == 1 {
        // Stop strings take the same path as in `generate`.
        p.stop = vec![".".into(), "\n\n".into()];
    }
    p
}

#[test]
fn sixteen_concurrent_greedy_requests_equal_each_alone() {
    let _g = serial();
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tokens(p)).collect();
    let (expected, counts): (Vec<SampleOut>, Vec<usize>) =
        prompts.iter().enumerate().map(|(i, p)| reference_counted(p, &mixed_params(i))).unzip();

    // A tiny prefill chunk so prompts are read over several steps, mixed
    // with other sequences' decode rows; no prefix cache, so every prompt is
    // computed in the batch.
    let s = start(SchedulerConfig { prefill_chunk: 4, prefix_cache_bytes: 0, ..SchedulerConfig::default() });

    // Alone through the scheduler.
    let alone = run(&s, GenRequest::new(prompts[0].clone(), mixed_params(0)));
    assert_eq!(strip_logprobs(alone.samples[0].clone()), expected[0]);

    // Sixteen at once: half first, the rest joining while those decode.
    let mut rxs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        if i == 8 {
            wait_until("the first eight are decoding", || s.stats().completion_tokens_total >= 20 + 8);
        }
        let (sink, rx) = channel_sink();
        s.submit(GenRequest::new(p.clone(), mixed_params(i)), sink).unwrap();
        rxs.push(rx);
    }
    for (i, rx) in rxs.iter().enumerate() {
        let out = collect(rx, 1).unwrap();
        assert_eq!(out.usage.prompt_tokens, prompts[i].len());
        assert_eq!(out.usage.cached_prompt_tokens, 0);
        assert_eq!(out.usage.completion_tokens, counts[i]);
        assert_eq!(
            strip_logprobs(out.samples[0].clone()),
            expected[i],
            "request {i} ({:?}) differs in the batch",
            PROMPTS[i]
        );
    }
    let st = s.stats();
    assert!(st.steps_total > 0);
    let mean_batch = st.batch_size_sum as f64 / st.steps_total as f64;
    assert!(mean_batch > 4.0, "sequences were not batched: mean batch {mean_batch:.1}");
    assert_eq!(st.active, 0);
    assert_eq!(st.requests_total, 17);
    s.shutdown(false);
}

#[test]
fn n_samples_share_one_prefill() {
    let _g = serial();
    let prompt = tokens("Write a short poem about the sea. The waves");
    let mut params = GenerateParams {
        max_tokens: 12,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            seed: 7,
            ..SamplingParams::default()
        },
        stop: Vec::new(),
        stop_at_eog: false,
        constraint: None,
        logit_bias: Vec::new(),
        adapter: None,
    };
    let s = start(SchedulerConfig { prefix_cache_bytes: 0, ..SchedulerConfig::default() });
    let out = run(&s, GenRequest { prompt: prompt.clone(), params: params.clone(), n: 3, top_logprobs: None });
    assert_eq!(out.samples.len(), 3);
    assert_eq!(out.usage, Usage { prompt_tokens: prompt.len(), cached_prompt_tokens: 0, completion_tokens: 36 });
    let st = s.stats();
    // The prompt went through the model once, not three times.
    assert_eq!(st.prompt_tokens_total, prompt.len() as u64);
    // One prefill step, then 11 steps decoding 3 sequences.
    assert_eq!(st.steps_total, 12);
    assert_eq!(st.batch_size_sum, 1 + 11 * 3);
    // Sample i is what a single sequence seeded with seed + i produces.
    for i in 0..3 {
        params.sampling.seed = 7 + i as u64;
        assert_eq!(out.samples[i], reference(&prompt, &params), "sample {i}");
    }
    assert!(
        out.samples[0].ids != out.samples[1].ids || out.samples[1].ids != out.samples[2].ids,
        "three identical samples"
    );
    s.shutdown(false);
}

#[test]
fn prefix_cache_hit_reuses_kv_with_identical_output() {
    let _g = serial();
    let system = "You are a helpful assistant who answers questions about geography, history and science \
                  in one short sentence, without any preamble, and never makes things up. \
                  If you do not know the answer, you say so plainly. ";
    let a = tokens(&format!("{system}Question: What is the capital of Italy? Answer:"));
    let b = tokens(&format!("{system}Question: What is the tallest mountain on Earth? Answer:"));
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared > 40, "test prompts share only {shared} tokens");
    let params = greedy(16, false);

    let s = start(SchedulerConfig::default());
    let out_a = run(&s, GenRequest::new(a.clone(), params.clone()));
    assert_eq!(out_a.usage.cached_prompt_tokens, 0);
    let st = s.stats();
    assert!(st.prefix_cache_entries >= 1 && st.prefix_cache_bytes > 0);

    let out_b = run(&s, GenRequest::new(b.clone(), params.clone()));
    assert_eq!(out_b.usage.cached_prompt_tokens, shared, "B resumes from A's cached system prompt");
    assert_eq!(out_b.samples[0], reference(&b, &params));

    // The same prompt again: all but its last token come from the cache.
    let again = run(&s, GenRequest::new(b.clone(), params.clone()));
    assert_eq!(again.usage.cached_prompt_tokens, b.len() - 1);
    assert_eq!(again.samples[0], out_b.samples[0]);

    // A follow-up turn (prompt + answer + more) resumes from the answer too.
    let mut turn2 = b.clone();
    turn2.extend(&out_b.samples[0].ids);
    turn2.extend(tokens(" Question: And the deepest ocean trench? Answer:").into_iter().skip(1));
    let out_t = run(&s, GenRequest::new(turn2.clone(), params.clone()));
    assert!(
        out_t.usage.cached_prompt_tokens >= b.len() + 15,
        "cached {} of {}",
        out_t.usage.cached_prompt_tokens,
        turn2.len()
    );
    assert_eq!(out_t.samples[0], reference(&turn2, &params));

    let st = s.stats();
    assert_eq!(st.cached_prompt_tokens_total as usize, shared + b.len() - 1 + out_t.usage.cached_prompt_tokens);
    s.shutdown(false);
}

#[test]
fn prefix_cache_evicts_least_recently_used_under_its_bound() {
    let _g = serial();
    let m = model();
    let per_token = minnow_engine::kv_cache::KvCache::bytes_per_position(m.model.config(), m.model.cache_types());
    let prompt = |topic: &str| {
        tokens(&format!("Here is a long and detailed essay about {topic}, written for students who want to learn everything about it in one afternoon:"))
    };
    let (p1, p2, p3) = (prompt("volcanoes"), prompt("glaciers"), prompt("deserts"));
    // Room for two of the three (prompt + 4 answer tokens each), not three.
    let bound = (p1.len() + 4) * per_token * 5 / 2;
    let s = start(SchedulerConfig { prefix_cache_bytes: bound, ..SchedulerConfig::default() });
    let params = greedy(4, false);
    for p in [&p1, &p2, &p3] {
        run(&s, GenRequest::new(p.clone(), params.clone()));
        let st = s.stats();
        assert!(st.prefix_cache_bytes <= bound, "{} bytes over the bound {bound}", st.prefix_cache_bytes);
    }
    assert_eq!(s.stats().prefix_cache_entries, 2);
    let common = p1.iter().zip(&p2).take_while(|(x, y)| x == y).count();
    // p1 was evicted: only the shared opening is found (in p2's or p3's entry).
    let r1 = run(&s, GenRequest::new(p1.clone(), params.clone()));
    assert_eq!(r1.usage.cached_prompt_tokens, if common >= minnow_engine::scheduler::MIN_PREFIX { common } else { 0 });
    // p3 is still there.
    let r3 = run(&s, GenRequest::new(p3.clone(), params.clone()));
    assert_eq!(r3.usage.cached_prompt_tokens, p3.len() - 1);
    // A zero bound disables it.
    let off = start(SchedulerConfig { prefix_cache_bytes: 0, ..SchedulerConfig::default() });
    run(&off, GenRequest::new(p1.clone(), params.clone()));
    let again = run(&off, GenRequest::new(p1.clone(), params.clone()));
    assert_eq!(again.usage.cached_prompt_tokens, 0);
    assert_eq!(off.stats().prefix_cache_entries, 0);
    s.shutdown(false);
    off.shutdown(false);
}

#[test]
fn long_prompt_is_chunked_while_another_stream_decodes() {
    let _g = serial();
    let s = start(SchedulerConfig {
        max_parallel: 2,
        prefill_chunk: 16,
        prefix_cache_bytes: 0,
        ..SchedulerConfig::default()
    });
    // Shared log of (request, event kind) in arrival order.
    let log: Arc<Mutex<Vec<(char, &'static str)>>> = Arc::default();
    let sink = |name: char, tx: std::sync::mpsc::Sender<GenEvent>| -> EventSink {
        let log = log.clone();
        Box::new(move |ev: GenEvent| {
            let kind = match &ev {
                GenEvent::Token { .. } => "token",
                GenEvent::Done { .. } => "done",
                GenEvent::Finished { .. } => "finished",
                GenEvent::Error(_) => "error",
                GenEvent::Cancelled(_) => "cancelled",
            };
            log.lock().unwrap().push((name, kind));
            tx.send(ev).is_ok()
        })
    };
    let a_prompt = tokens("The history of the Roman Empire begins");
    let a_params = greedy(60, false);
    let (tx_a, rx_a) = channel();
    s.submit(GenRequest::new(a_prompt.clone(), a_params.clone()), sink('A', tx_a)).unwrap();
    wait_until("A streams", || log.lock().unwrap().len() >= 2);

    let sentence = "The committee met again on Tuesday to discuss the budget, the new library and the roads. ";
    let b_prompt = tokens(&sentence.repeat(16));
    assert!(b_prompt.len() > 250, "B's prompt has {} tokens", b_prompt.len());
    let b_params = greedy(4, false);
    let (tx_b, rx_b) = channel();
    let mark = log.lock().unwrap().len();
    s.submit(GenRequest::new(b_prompt.clone(), b_params.clone()), sink('B', tx_b)).unwrap();
    let out_b = collect(&rx_b, 1).unwrap();
    let out_a = collect(&rx_a, 1).unwrap();

    let log = log.lock().unwrap();
    let b_first = log.iter().position(|&(n, k)| n == 'B' && k == "token").unwrap();
    let a_during = log[mark..b_first].iter().filter(|&&(n, k)| n == 'A' && k == "token").count();
    let chunks = b_prompt.len().div_ceil(16);
    // A decodes in (nearly) every step of B's prefill: its tokens interleave.
    assert!(a_during + 2 >= chunks, "A produced {a_during} tokens during B's {chunks}-chunk prefill");
    assert_eq!(out_a.samples[0], reference(&a_prompt, &a_params));
    assert_eq!(out_b.samples[0], reference(&b_prompt, &b_params));
    assert!(out_a.samples[0].ids.len() == 60);
    s.shutdown(false);
}

#[test]
fn cancellation_frees_the_slot() {
    let _g = serial();
    let s = start(SchedulerConfig { max_parallel: 1, ..SchedulerConfig::default() });
    let prompt = tokens("Count slowly from one to one thousand: one, two,");

    // A client that goes away after three tokens (its sink returns false).
    let seen = Arc::new(Mutex::new(0usize));
    let seen2 = seen.clone();
    let sink: EventSink = Box::new(move |_ev| {
        let mut n = seen2.lock().unwrap();
        *n += 1;
        *n < 3
    });
    s.submit(GenRequest::new(prompt.clone(), greedy(1000, false)), sink).unwrap();
    // Queued behind it in the single slot: runs only once the slot is free.
    let (sink_b, rx_b) = channel_sink();
    s.submit(GenRequest::new(prompt.clone(), greedy(5, false)), sink_b).unwrap();
    let b = collect(&rx_b, 1).unwrap();
    assert_eq!(b.samples[0].ids.len(), 5);
    assert_eq!(*seen.lock().unwrap(), 3, "events after the sink said the client is gone");
    wait_until("the slot is free", || s.stats().active == 0);

    // Scheduler::cancel on a running request, and on a queued one.
    let (sink_c, rx_c) = channel_sink();
    let c = s.submit(GenRequest::new(prompt.clone(), greedy(1000, false)), sink_c).unwrap();
    let (sink_d, rx_d) = channel_sink();
    let d = s.submit(GenRequest::new(prompt.clone(), greedy(1000, false)), sink_d).unwrap();
    assert!(matches!(rx_c.recv_timeout(TIMEOUT).unwrap(), GenEvent::Token { .. }));
    assert_eq!(s.stats().queue_depth, 1);
    s.cancel(d);
    wait_until("the queued request is gone", || s.stats().queue_depth == 0);
    s.cancel(c);
    wait_until("the running request is gone", || s.stats().active == 0);
    // Their sinks were dropped: the channels disconnect without Finished.
    for rx in [&rx_c, &rx_d] {
        loop {
            match rx.recv_timeout(TIMEOUT) {
                Ok(GenEvent::Token { .. }) => {}
                Ok(ev) => panic!("unexpected event after cancel: {ev:?}"),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("sink not dropped"),
            }
        }
    }
    // The scheduler still serves.
    assert_eq!(run(&s, GenRequest::new(prompt.clone(), greedy(3, false))).samples[0].ids.len(), 3);
    s.shutdown(false);
}

#[test]
fn full_queue_is_refused_and_shutdown_cancels_cleanly() {
    let _g = serial();
    let s = start(SchedulerConfig { max_parallel: 1, max_queue: 2, ..SchedulerConfig::default() });
    let prompt = tokens("List every prime number:");
    let (sink_a, rx_a) = channel_sink();
    s.submit(GenRequest::new(prompt.clone(), greedy(2000, false)), sink_a).unwrap();
    wait_until("A runs", || s.stats().active == 1);
    let (sink_b, rx_b) = channel_sink();
    let (sink_c, rx_c) = channel_sink();
    s.submit(GenRequest::new(prompt.clone(), greedy(8, false)), sink_b).unwrap();
    s.submit(GenRequest::new(prompt.clone(), greedy(8, false)), sink_c).unwrap();
    let (sink_d, _rx_d) = channel_sink();
    match s.submit(GenRequest::new(prompt.clone(), greedy(8, false)), sink_d) {
        Err(SubmitError::QueueFull { retry_after_secs }) => assert!(retry_after_secs >= 1),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert_eq!(s.stats().queue_depth, 2);
    assert!(matches!(rx_a.recv_timeout(TIMEOUT).unwrap(), GenEvent::Token { .. }));

    // Cancel everything: shutdown must return promptly, and every request,
    // the running one (already streaming) and the queued ones, ends with
    // `Cancelled`, never with a `Done` that would pass a cut answer off as whole.
    let t = Instant::now();
    s.shutdown(true);
    assert!(t.elapsed() < Duration::from_secs(30));
    let cancelled = format!("cancelled: {SHUTDOWN_CANCEL_MESSAGE}");
    for rx in [&rx_a, &rx_b, &rx_c] {
        assert_eq!(collect(rx, 1).unwrap_err(), cancelled);
    }
    let (sink_e, _rx_e) = channel_sink();
    assert!(matches!(s.submit(GenRequest::new(prompt, greedy(8, false)), sink_e), Err(SubmitError::ShuttingDown)));
    s.shutdown(true); // again: a no-op
}

#[test]
fn graceful_shutdown_finishes_running_and_queued_requests() {
    let _g = serial();
    let s = Arc::new(start(SchedulerConfig { max_parallel: 2, ..SchedulerConfig::default() }));
    let mut rxs = Vec::new();
    for p in &PROMPTS[..3] {
        let (sink, rx) = channel_sink();
        s.submit(GenRequest::new(tokens(p), greedy(10, false)), sink).unwrap();
        rxs.push(rx);
    }
    let (done_tx, done_rx) = channel();
    let s2 = s.clone();
    std::thread::spawn(move || {
        s2.shutdown(false);
        done_tx.send(()).unwrap();
    });
    done_rx.recv_timeout(TIMEOUT).expect("graceful shutdown hangs");
    for rx in &rxs {
        let out = collect(rx, 1).unwrap();
        assert_eq!(out.samples[0].ids.len(), 10);
        assert_eq!(out.samples[0].finish, Some(FinishReason::Length));
    }
    // Dropping a scheduler with work in flight does not hang either.
    let (done_tx, done_rx) = channel();
    std::thread::spawn(move || {
        let s = start(SchedulerConfig::default());
        let (sink, _rx) = channel_sink();
        s.submit(GenRequest::new(tokens("Hello"), greedy(3000, false)), sink).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        done_tx.send(()).unwrap();
    });
    done_rx.recv_timeout(TIMEOUT).expect("drop hangs");
}

#[test]
fn admission_errors() {
    let _g = serial();
    let s = start(SchedulerConfig { ctx: 64, max_parallel: 4, ..SchedulerConfig::default() });
    assert_eq!(s.config().ctx, 64);
    let prompt: Vec<u32> = tokens(&"word ".repeat(60))[..40].to_vec();
    let sub = |req: GenRequest| {
        let (sink, _rx) = channel_sink();
        s.submit(req, sink)
    };
    match sub(GenRequest::new(prompt.clone(), greedy(30, true))) {
        Err(SubmitError::ContextOverflow { prompt_tokens: 40, max_tokens: 30, ctx: 64 }) => {}
        other => panic!("expected ContextOverflow {{40, 30, 64}}, got {other:?}"),
    }
    // Exactly filling the context is fine.
    let out = run(&s, GenRequest::new(prompt.clone(), greedy(24, false)));
    assert_eq!(out.samples[0].ids.len(), 24);

    let invalid = |req: GenRequest, needle: &str| match sub(req) {
        Err(e @ SubmitError::Invalid(_)) => assert!(e.to_string().contains(needle), "{e} should mention {needle}"),
        other => panic!("expected Invalid ({needle}), got {other:?}"),
    };
    let ok = GenRequest::new(prompt[..8].to_vec(), greedy(4, true));
    invalid(GenRequest { prompt: vec![], ..ok.clone() }, "empty");
    invalid(GenRequest { n: 0, ..ok.clone() }, "n must");
    invalid(GenRequest { n: 5, ..ok.clone() }, "n must");
    invalid(GenRequest { top_logprobs: Some(21), ..ok.clone() }, "top_logprobs");
    let vocab = model().model.config().vocab_size as u32;
    invalid(GenRequest { prompt: vec![1, vocab], ..ok.clone() }, &format!("token id {vocab}"));
    let mut bad = ok.clone();
    bad.params.sampling.temperature = -1.0;
    invalid(bad, "temperature");
    let mut bad = ok.clone();
    bad.params.sampling.top_p = 0.0;
    invalid(bad, "top_p");
    assert_eq!(s.stats().requests_total, 1, "rejected requests are not counted");

    // ctx is capped at the model's own context.
    let big = start(SchedulerConfig { ctx: 1 << 30, ..SchedulerConfig::default() });
    assert_eq!(big.config().ctx, model().model.config().context_length);
    // max_tokens 0: no tokens, a Length finish.
    let out = run(&s, GenRequest { n: 2, ..GenRequest::new(prompt[..8].to_vec(), greedy(0, true)) });
    assert!(out.samples.iter().all(|x| x.ids.is_empty() && x.finish == Some(FinishReason::Length)));
}

#[test]
fn logprobs_are_the_raw_log_softmax() {
    let _g = serial();
    let m = model();
    let prompt = tokens("The capital of France is");
    let s = start(SchedulerConfig::default());
    let out = run(&s, GenRequest { top_logprobs: Some(5), ..GenRequest::new(prompt.clone(), greedy(8, false)) });
    let lps = &out.samples[0].logprobs;
    assert_eq!(lps.len(), 8);
    for (lp, &id) in lps.iter().zip(&out.samples[0].ids) {
        assert_eq!(lp.id, id);
        assert!(lp.logprob <= 0.0);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "top not sorted: {:?}", lp.top);
        // Greedy picks the most likely token.
        assert_eq!(lp.top[0], (id, lp.logprob));
        assert!(lp.top.iter().map(|t| (t.1 as f64).exp()).sum::<f64>() <= 1.0 + 1e-5);
    }
    // The first token's numbers, from the prompt's logits directly.
    let mut cache = m.model.new_cache(256);
    let logits = m.model.forward_one(common::pool(), &mut cache, &prompt, Logits::Last).unwrap();
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let first = &lps[0];
    assert!((first.logprob as f64 - (logits[first.id as usize] as f64 - lse)).abs() < 1e-4);
    for &(t, l) in &first.top {
        assert!((l as f64 - (logits[t as usize] as f64 - lse)).abs() < 1e-4);
    }
    // Logprobs do not depend on sampling: a sampled request reports the
    // same numbers for its first token (the same raw logits).
    let sampled = GenerateParams {
        max_tokens: 1,
        sampling: SamplingParams {
            temperature: 5.0,
            top_k: 3,
            seed: 1,
            repeat_penalty: 1.5,
            ..SamplingParams::default()
        },
        stop: vec![],
        stop_at_eog: false,
        constraint: None,
        logit_bias: Vec::new(),
        adapter: None,
    };
    let out2 = run(&s, GenRequest { top_logprobs: Some(5), ..GenRequest::new(prompt.clone(), sampled) });
    assert_eq!(out2.samples[0].logprobs[0].top, first.top);
    // top_logprobs 0: the chosen token's logprob only.
    let out3 = run(&s, GenRequest { top_logprobs: Some(0), ..GenRequest::new(prompt, greedy(2, false)) });
    assert!(out3.samples[0].logprobs.iter().all(|l| l.top.is_empty()));
    assert_eq!(out3.samples[0].logprobs[0].logprob, first.logprob);
    s.shutdown(false);
}

#[test]
fn failures_are_contained_to_their_request() {
    let _g = serial();
    let s = start(SchedulerConfig::default());
    let pa = tokens("The history of mathematics");
    let pb = tokens("A recipe for bread:");
    let params = greedy(24, false);
    for fault in [Fault::Error, Fault::Panic] {
        let (sink_a, rx_a) = channel_sink();
        let (sink_b, rx_b) = channel_sink();
        s.submit(GenRequest::new(pa.clone(), params.clone()), sink_a).unwrap();
        let b = s.submit(GenRequest::new(pb.clone(), greedy(500, false)), sink_b).unwrap();
        s.inject_fault(b, fault);
        let err = collect(&rx_b, 1).unwrap_err();
        let want = if fault == Fault::Error { "injected fault" } else { "panicked: injected panic" };
        assert!(err.contains(want), "{err}");
        // The other request, batched with the failing one, is unaffected.
        assert_eq!(collect(&rx_a, 1).unwrap().samples[0], reference(&pa, &params));
        wait_until("the failed request's slot is free", || s.stats().active == 0);
    }
    // A sink that panics counts as a client gone; the thread lives on.
    let sink: EventSink = Box::new(|_| panic!("sink bug"));
    s.submit(GenRequest::new(pa.clone(), greedy(500, false)), sink).unwrap();
    wait_until("the panicking sink's request is dropped", || s.stats().active == 0 && s.stats().queue_depth == 0);
    assert_eq!(run(&s, GenRequest::new(pa.clone(), params.clone())).samples[0], reference(&pa, &params));
    s.shutdown(false);
}

/// 16 streams × 32 tokens against one stream × 32 tokens (greedy). Prints
/// the numbers; asserts only that batching helps, since the machine is shared.
#[test]
fn throughput_sixteen_streams_vs_one() {
    let _g = serial();
    let s = start(SchedulerConfig { prefix_cache_bytes: 0, ..SchedulerConfig::default() });
    let params = greedy(32, false);
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tokens(p)).collect();
    // Warm up (page in the weights).
    run(&s, GenRequest::new(prompts[0].clone(), greedy(4, false)));

    let t = Instant::now();
    let one = run(&s, GenRequest::new(prompts[1].clone(), params.clone()));
    let single_secs = t.elapsed().as_secs_f64();
    let single_tps = 32.0 / single_secs;

    let before = s.stats();
    let t = Instant::now();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (sink, rx) = channel_sink();
            s.submit(GenRequest::new(p.clone(), params.clone()), sink).unwrap();
            rx
        })
        .collect();
    let outs: Vec<Outcome> = rxs.iter().map(|rx| collect(rx, 1).unwrap()).collect();
    let batch_secs = t.elapsed().as_secs_f64();
    let total: usize = outs.iter().map(|o| o.usage.completion_tokens).sum();
    assert_eq!(total, 16 * 32);
    let batch_tps = total as f64 / batch_secs;
    let after = s.stats();
    let mut ttfts: Vec<f64> = outs.iter().map(|o| o.ttft_secs).collect();
    ttfts.sort_by(f64::total_cmp);
    let steps = after.steps_total - before.steps_total;
    eprintln!(
        "throughput: 1 stream {single_tps:.1} tok/s ({:.2} s, ttft {:.3} s); 16 streams {batch_tps:.1} tok/s total \
         ({batch_secs:.2} s, {steps} steps, mean batch {:.1}, busy {:.2} s, ttft p50 {:.3} s max {:.3} s, per-request total p50 {:.2} s): {:.1}x",
        single_secs,
        one.ttft_secs,
        (after.batch_size_sum - before.batch_size_sum) as f64 / steps as f64,
        after.busy_secs - before.busy_secs,
        ttfts[8],
        ttfts[15],
        outs[8].total_secs,
        batch_tps / single_tps
    );
    assert!(batch_tps > 1.5 * single_tps, "batching gives {batch_tps:.1} tok/s vs {single_tps:.1} alone");
    s.shutdown(false);
}

//! A fleet of teachers: one labeling run spread over several
//! OpenAI-compatible endpoints (`distill label --teacher-url A
//! --teacher-url B`, or `--teacher-urls FILE`), so labeling outgrows one
//! machine.
//!
//! Every endpoint runs its own workers (its `concurrency`) over one shared
//! queue of jobs. A worker makes one attempt per job on its endpoint:
//! - an answer is the job's answer;
//! - a failure worth retrying (429, 5xx, a dropped connection) puts the job
//!   back at the front of the queue, for whichever endpoint is free next,
//!   and benches the endpoint: its workers wait out a backoff (doubling
//!   with each failure in a row, `Retry-After` when the server gave one)
//!   while the others carry on; its next answer clears the count;
//! - a refusal that dooms every job there (401, 403, 404) takes the
//!   endpoint out for the rest of the run; when none is left the run stops
//!   with the last refusal;
//! - a failure of the job itself (a 400) fails that job alone.
//!
//! A job that failed `max_retries + 1` attempts, wherever they were, fails
//! with the last reason. With greedy decoding every endpoint gives the same
//! answer, so the dataset does not depend on how many endpoints there are
//! or which of them failed.

use crate::teacher::{deliver, Answer, Failure, GenSettings, Job, RemoteTeacher, Teacher};
use anyhow::{anyhow, bail, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// What a fleet knows of one endpoint.
#[derive(Default)]
struct Health {
    benched_until: Option<Instant>,
    failures_in_a_row: u32,
    dead: bool,
    answered: u64,
    failed_attempts: u64,
    benched: u64,
}

/// Several remote teachers answering one batch.
pub struct Fleet {
    endpoints: Vec<RemoteTeacher>,
    health: Vec<Mutex<Health>>,
    /// Attempts a job may fail, across endpoints, before it fails.
    max_retries: u32,
}

/// How often an idle or benched worker looks again.
const POLL: Duration = Duration::from_millis(20);

impl Fleet {
    pub fn new(endpoints: Vec<RemoteTeacher>) -> Result<Fleet> {
        if endpoints.is_empty() {
            bail!("a teacher fleet needs at least one endpoint");
        }
        let max_retries = endpoints.iter().map(|e| e.config().max_retries).max().unwrap_or(0);
        let health = endpoints.iter().map(|_| Mutex::new(Health::default())).collect();
        Ok(Fleet { endpoints, health, max_retries })
    }

    fn health(&self, e: usize) -> std::sync::MutexGuard<'_, Health> {
        self.health[e].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One line per endpoint: answers, failed attempts, times benched.
    pub fn summary(&self) -> String {
        self.endpoints
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let h = self.health(i);
                format!(
                    "{}: {} answered, {} failed attempts, benched {} times{}",
                    t.endpoint(),
                    h.answered,
                    h.failed_attempts,
                    h.benched,
                    if h.dead { ", out (refused)" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// `URL [CONCURRENCY]` per line (`#` starts a comment): the endpoints of
/// `--teacher-urls FILE`.
pub fn read_urls(path: &std::path::Path) -> Result<Vec<(String, Option<usize>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let url = parts.next().expect("non-empty").to_string();
        let concurrency = match parts.next() {
            None => None,
            Some(c) => Some(c.parse::<usize>().ok().filter(|&c| c > 0).ok_or_else(|| {
                anyhow!("{}:{}: {c:?} is not a concurrency (a positive integer after the URL)", path.display(), i + 1)
            })?),
        };
        if let Some(extra) = parts.next() {
            bail!("{}:{}: unexpected {extra:?}; a line is URL [CONCURRENCY]", path.display(), i + 1);
        }
        out.push((url, concurrency));
    }
    if out.is_empty() {
        bail!("{} lists no teacher URLs", path.display());
    }
    Ok(out)
}

impl Teacher for Fleet {
    fn describe(&self) -> String {
        format!(
            "fleet of {}: {}",
            self.endpoints.len(),
            self.endpoints.iter().map(|e| e.describe()).collect::<Vec<_>>().join(", ")
        )
    }

    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &GenSettings,
        on_answer: &mut dyn FnMut(usize, Result<Answer, String>) -> Result<()>,
    ) -> Result<()> {
        // (job, failed attempts so far)
        let queue: Mutex<VecDeque<(Job, u32)>> = Mutex::new(jobs.into_iter().map(|j| (j, 0)).collect());
        let in_flight = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<(usize, Result<Answer, Failure>)>();
        std::thread::scope(|scope| -> Result<()> {
            for (e, teacher) in self.endpoints.iter().enumerate() {
                for _ in 0..teacher.config().concurrency {
                    let (tx, queue, stop, in_flight) = (tx.clone(), &queue, &stop, &in_flight);
                    scope.spawn(move || self.worker(e, teacher, settings, queue, in_flight, stop, tx));
                }
            }
            drop(tx);
            deliver(&rx, &stop, on_answer, "every teacher endpoint refused the requests; the last")
        })?;
        eprintln!("minnow distill: teacher fleet: {}", self.summary());
        Ok(())
    }
}

impl Fleet {
    #[allow(clippy::too_many_arguments)]
    fn worker(
        &self,
        e: usize,
        teacher: &RemoteTeacher,
        settings: &GenSettings,
        queue: &Mutex<VecDeque<(Job, u32)>>,
        in_flight: &AtomicUsize,
        stop: &AtomicBool,
        tx: mpsc::Sender<(usize, Result<Answer, Failure>)>,
    ) {
        let cfg = teacher.config();
        while !stop.load(Ordering::SeqCst) {
            {
                let h = self.health(e);
                if h.dead {
                    return;
                }
                if let Some(until) = h.benched_until.filter(|&u| u > Instant::now()) {
                    drop(h);
                    std::thread::sleep((until - Instant::now()).min(POLL));
                    continue;
                }
            }
            // Taking a job and counting it in flight under one lock: an
            // empty queue with nothing in flight means the batch is done.
            let next = {
                let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                let j = q.pop_front();
                if j.is_some() {
                    in_flight.fetch_add(1, Ordering::SeqCst);
                }
                j
            };
            let Some((job, failed)) = next else {
                if in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                // A job in flight elsewhere may come back.
                std::thread::sleep(POLL);
                continue;
            };
            let result = teacher.try_once(&job.messages, settings);
            let requeue = |job: Job, failed: u32| {
                queue.lock().unwrap_or_else(|p| p.into_inner()).push_front((job, failed));
            };
            match result {
                Ok(a) => {
                    {
                        let mut h = self.health(e);
                        h.failures_in_a_row = 0;
                        h.answered += 1;
                    }
                    let _ = tx.send((job.index, Ok(a)));
                }
                Err(Failure::Retry { why, after, status }) => {
                    {
                        let mut h = self.health(e);
                        h.failed_attempts += 1;
                        h.failures_in_a_row += 1;
                        h.benched += 1;
                        h.benched_until = Some(Instant::now() + cfg.wait_after(h.failures_in_a_row - 1, after));
                    }
                    if failed + 1 > self.max_retries {
                        let why = format!("{why} (gave up after {} attempts across the fleet)", failed + 1);
                        let _ = tx.send((job.index, Err(Failure::Retry { why, after, status })));
                    } else {
                        requeue(job, failed + 1);
                    }
                }
                Err(Failure::Fatal(why)) => {
                    let all_out = {
                        self.health(e).dead = true;
                        (0..self.endpoints.len()).all(|i| self.health(i).dead)
                    };
                    eprintln!("minnow distill: teacher {} is out of the fleet: {why}", teacher.endpoint());
                    if all_out {
                        let _ = tx.send((job.index, Err(Failure::Fatal(why))));
                    } else {
                        requeue(job, failed);
                    }
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                Err(f @ Failure::Job(_)) => {
                    let _ = tx.send((job.index, Err(f)));
                }
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

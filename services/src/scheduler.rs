//! Continuous batching on one OS thread that owns the [`Engine`].
//!
//! Each iteration: take new requests off the channel into a FIFO waiting queue; drop sequences
//! whose client went away (the request's event receiver was dropped) and release their KV caches
//! at once; admit waiting requests while the batch has room; prefill up to `prefill_chunk` prompt
//! tokens (so a long prompt delays running sequences by one chunk, not by the whole prompt); run
//! one decode step for every sequence that has a token to feed; sample each sequence with its own
//! seeded sampler and send its text through the request's channel. A request with `n` choices is
//! `n` sequences sharing the prompt.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use lacuna_model::generate::{FinishReason, StopText};
use lacuna_model::sampling::{Penalties, Sampler, SamplingParams};
use lacuna_model::tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{Engine, SeqId};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// One generation request, tokenized and validated by a handler.
pub struct Submission {
    pub request_id: String,
    pub prompt: Vec<u32>,
    /// Choices, each an independent sequence.
    pub n: usize,
    /// Most tokens per choice (the handler has fitted it into the context).
    pub max_tokens: usize,
    /// Sampling of choice `i` uses `seed + i`.
    pub sampling: SamplingParams,
    pub penalties: Penalties,
    pub stop: Vec<String>,
    /// Generate past EOS until `max_tokens`.
    pub ignore_eos: bool,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// What a request's handler receives, per choice `index`.
#[derive(Debug)]
pub enum Event {
    /// One generated token: the text it released (possibly empty while a stop string may still
    /// match) and, when asked for, its log-probabilities.
    Token { index: usize, text: String, logprob: Option<TokenLogprob> },
    /// The choice is complete; `text` is what was held back until now.
    Finished { index: usize, text: String, reason: FinishReason, completion_tokens: usize },
    /// The engine failed; the request ends.
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(String, f32)>,
}

pub struct SchedulerConfig {
    pub max_batch: usize,
    pub max_queue: usize,
    pub prefill_chunk: usize,
}

enum Msg {
    Submit(Box<Submission>),
    Shutdown,
}

/// What handlers hold: submits requests, refusing them when the waiting queue is full.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

impl SchedulerHandle {
    /// Queues `s`; [`ApiError::QueueFull`] when `max_queue` requests already wait.
    pub fn submit(&self, s: Submission) -> Result<(), ApiError> {
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::QueueFull { waiting: prev, retry_after_s: 1 });
        }
        self.metrics.requests_waiting.store((prev + 1) as i64, Ordering::Relaxed);
        self.tx.send(Msg::Submit(Box::new(s))).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            ApiError::Internal("the scheduler has stopped".into())
        })
    }

    /// Asks the scheduler to stop: requests still running get [`Event::Failed`].
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
    }
}

/// Starts the scheduler thread.
pub fn spawn<E: Engine>(
    engine: E,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SchedulerHandle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    let handle =
        SchedulerHandle { tx, waiting: waiting.clone(), max_queue: config.max_queue, metrics: metrics.clone() };
    let thread = std::thread::Builder::new().name("lacuna-scheduler".into()).spawn(move || {
        let mut s = Scheduler {
            engine,
            tok: tokenizer.as_ref(),
            config,
            metrics,
            waiting_count: waiting,
            waiting: VecDeque::new(),
            running: Vec::new(),
            requests: HashMap::new(),
            next_seq: 0,
            next_request: 0,
        };
        s.run(rx);
    })?;
    Ok((handle, thread))
}

struct RequestState {
    id: String,
    arrived: Instant,
    first_token_seen: bool,
    live: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    any_length: bool,
    failed: bool,
}

struct Sequence<'t> {
    id: SeqId,
    request: u64,
    index: usize,
    prompt: Arc<[u32]>,
    prefilled: usize,
    /// The sampled token the next decode step feeds.
    next: Option<u32>,
    generated: usize,
    max_tokens: usize,
    counts: HashMap<u32, u32>,
    sampler: Sampler,
    penalties: Penalties,
    logprobs: Option<usize>,
    ignore_eos: bool,
    text: StopText<'t>,
    events: UnboundedSender<Event>,
    last_token_at: Option<Instant>,
    done: bool,
}

struct Scheduler<'t, E: Engine> {
    engine: E,
    tok: &'t Tokenizer,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    waiting_count: Arc<AtomicUsize>,
    waiting: VecDeque<Box<Submission>>,
    running: Vec<Sequence<'t>>,
    requests: HashMap<u64, RequestState>,
    next_seq: SeqId,
    next_request: u64,
}

impl<'t, E: Engine> Scheduler<'t, E> {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let mut logits = Vec::new();
        loop {
            // Block only when there is nothing to do.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(Msg::Submit(s)) => self.waiting.push_back(s),
                    Ok(Msg::Shutdown) | Err(_) => break,
                }
            }
            let mut stop = false;
            loop {
                match rx.try_recv() {
                    Ok(Msg::Submit(s)) => self.waiting.push_back(s),
                    Ok(Msg::Shutdown) => stop = true,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        stop = true;
                        break;
                    }
                }
            }
            if stop {
                break;
            }
            self.sweep();
            self.admit();
            self.prefill_chunk();
            self.decode_step(&mut logits);
            self.sweep();
        }
        for s in self.running.drain(..) {
            let _ = s.events.send(Event::Failed("the server stopped before the request finished".into()));
            self.engine.release(s.id);
        }
        for w in self.waiting.drain(..) {
            let _ = w.events.send(Event::Failed("the server stopped before the request started".into()));
        }
        self.metrics.requests_running.store(0, Ordering::Relaxed);
    }

    /// Drops finished and abandoned sequences (releasing their caches) and waiting requests whose
    /// client is gone; completes the bookkeeping of requests whose last sequence ended.
    fn sweep(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|w| !w.events.is_closed());
        let dropped = before - self.waiting.len();
        if dropped > 0 {
            self.waiting_count.fetch_sub(dropped, Ordering::SeqCst);
        }
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let abandoned = s.events.is_closed();
            if !(s.done || abandoned) {
                i += 1;
                continue;
            }
            let s = self.running.swap_remove(i);
            self.engine.release(s.id);
            let Some(r) = self.requests.get_mut(&s.request) else { continue };
            r.live -= 1;
            if abandoned && !s.done {
                tracing::info!(request_id = %r.id, choice = s.index, "client disconnected; sequence released");
            }
            // The request's last sequence ended: it leaves the table, counted as a success
            // unless its client went away or it failed.
            if r.live == 0
                && let Some(r) = self.requests.remove(&s.request)
                && !abandoned
                && !r.failed
            {
                let reason = if r.any_length { FinishReason::Length } else { FinishReason::Stop };
                self.metrics.request_succeeded(reason);
                self.metrics.e2e_request_latency.observe(r.arrived.elapsed().as_secs_f64());
                tracing::info!(
                    request_id = %r.id,
                    prompt_tokens = r.prompt_tokens,
                    completion_tokens = r.completion_tokens,
                    seconds = r.arrived.elapsed().as_secs_f64(),
                    "request finished"
                );
            }
        }
        // Keep the batch in admission order (swap_remove shuffles it).
        self.running.sort_by_key(|s| s.id);
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.metrics.requests_running.store(self.requests.len() as i64, Ordering::Relaxed);
        self.metrics.requests_waiting.store(self.waiting_count.load(Ordering::SeqCst) as i64, Ordering::Relaxed);
    }

    fn admit(&mut self) {
        while let Some(w) = self.waiting.front() {
            let room = self.config.max_batch.saturating_sub(self.running.len());
            if w.n > room && !self.running.is_empty() {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            let w = *w;
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            let key = self.next_request;
            self.next_request += 1;
            let prompt: Arc<[u32]> = w.prompt.into();
            self.metrics.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::Relaxed);
            let mut live = 0;
            for index in 0..w.n {
                let sampling =
                    SamplingParams { seed: w.sampling.seed.wrapping_add(index as u64), ..w.sampling.clone() };
                let sampler = match Sampler::new(sampling) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = w.events.send(Event::Failed(e.to_string()));
                        break;
                    }
                };
                self.running.push(Sequence {
                    id: self.next_seq,
                    request: key,
                    index,
                    prompt: prompt.clone(),
                    prefilled: 0,
                    next: None,
                    generated: 0,
                    max_tokens: w.max_tokens,
                    counts: HashMap::new(),
                    sampler,
                    penalties: w.penalties,
                    logprobs: w.logprobs,
                    ignore_eos: w.ignore_eos,
                    text: StopText::new(self.tok, &w.stop),
                    events: w.events.clone(),
                    last_token_at: None,
                    done: false,
                });
                self.next_seq += 1;
                live += 1;
            }
            tracing::debug!(request_id = %w.request_id, prompt_tokens = prompt.len(), n = w.n, "admitted");
            self.requests.insert(
                key,
                RequestState {
                    id: w.request_id,
                    arrived: w.arrived,
                    first_token_seen: false,
                    live,
                    prompt_tokens: prompt.len(),
                    completion_tokens: 0,
                    any_length: false,
                    failed: false,
                },
            );
        }
        self.update_gauges();
    }

    /// Prefills at most `prefill_chunk` prompt tokens, oldest sequences first.
    fn prefill_chunk(&mut self) {
        let mut budget = self.config.prefill_chunk;
        for i in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            if s.done || s.prefilled == s.prompt.len() {
                continue;
            }
            let take = budget.min(s.prompt.len() - s.prefilled);
            let (id, from, prompt) = (s.id, s.prefilled, s.prompt.clone());
            budget -= take;
            match self.engine.prefill(id, &prompt[from..from + take]) {
                Ok(logits) => {
                    let s = &mut self.running[i];
                    s.prefilled += take;
                    if s.prefilled == s.prompt.len() {
                        self.on_logits(i, &logits);
                    }
                }
                Err(e) => self.fail(i, &format!("prefill failed: {e:#}")),
            }
        }
    }

    fn decode_step(&mut self, logits: &mut Vec<f32>) {
        let rows: Vec<usize> =
            (0..self.running.len()).filter(|&i| !self.running[i].done && self.running[i].next.is_some()).collect();
        if rows.is_empty() {
            return;
        }
        let batch: Vec<(SeqId, u32)> =
            rows.iter().filter_map(|&i| self.running[i].next.map(|t| (self.running[i].id, t))).collect();
        match self.engine.decode(&batch, logits) {
            Ok(()) => {
                let vocab = self.engine.config().vocab_size;
                for (r, &i) in rows.iter().enumerate() {
                    self.running[i].next = None;
                    match logits.get(r * vocab..(r + 1) * vocab) {
                        Some(row) => self.on_logits(i, row),
                        None => self.fail(i, "the engine returned too few logits"),
                    }
                }
            }
            Err(e) => {
                let msg = format!("decode failed: {e:#}");
                for &i in &rows {
                    self.fail(i, &msg);
                }
            }
        }
    }

    fn fail(&mut self, i: usize, msg: &str) {
        let s = &mut self.running[i];
        tracing::error!(choice = s.index, "{msg}");
        let _ = s.events.send(Event::Failed(msg.to_owned()));
        s.done = true;
        s.next = None;
        if let Some(r) = self.requests.get_mut(&s.request) {
            r.failed = true;
        }
    }

    /// Samples sequence `i`'s next token from `logits` and reports it.
    fn on_logits(&mut self, i: usize, logits: &[f32]) {
        let now = Instant::now();
        let tok = self.tok;
        let s = &mut self.running[i];
        let next = if s.penalties.is_off() {
            s.sampler.sample(logits)
        } else {
            let mut penalised = logits.to_vec();
            s.penalties.apply(&mut penalised, &s.counts);
            s.sampler.sample(&penalised)
        };
        if let Some(prev) = s.last_token_at {
            self.metrics.inter_token_latency.observe(now.duration_since(prev).as_secs_f64());
        }
        s.last_token_at = Some(now);
        self.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = self.requests.get_mut(&s.request)
            && !r.first_token_seen
        {
            r.first_token_seen = true;
            self.metrics.time_to_first_token.observe(now.duration_since(r.arrived).as_secs_f64());
        }
        if !s.ignore_eos && tok.eos_ids().contains(&next) {
            self.finish(i, FinishReason::Stop);
            return;
        }
        let s = &mut self.running[i];
        s.generated += 1;
        *s.counts.entry(next).or_default() += 1;
        let logprob = s.logprobs.map(|k| {
            let (lp, top) = lacuna_model::sampling::logprobs(logits, next, k);
            let piece = |id: u32| tok.decode(&[id], false).unwrap_or_default();
            TokenLogprob { token: piece(next), logprob: lp, top: top.into_iter().map(|(t, l)| (piece(t), l)).collect() }
        });
        let step = match s.text.push(next) {
            Ok(step) => step,
            Err(e) => {
                self.fail(i, &format!("detokenizing: {e}"));
                return;
            }
        };
        let _ = s.events.send(Event::Token { index: s.index, text: step.text, logprob });
        if step.stopped {
            self.finish(i, FinishReason::Stop);
        } else if s.generated >= s.max_tokens {
            self.finish(i, FinishReason::Length);
        } else {
            s.next = Some(next);
        }
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
        let s = &mut self.running[i];
        let text = s.text.finish();
        let _ = s.events.send(Event::Finished { index: s.index, text, reason, completion_tokens: s.generated });
        s.done = true;
        s.next = None;
        if let Some(r) = self.requests.get_mut(&s.request) {
            r.completion_tokens += s.generated;
            r.any_length |= reason == FinishReason::Length;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use lacuna_model::config::LlamaConfig;

    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        Prefill(SeqId, usize),
        Decode(Vec<SeqId>),
        Release(SeqId),
    }

    /// Tokens the fake engine cycles through: the last ordinary pieces of the vocabulary.
    const SPAN: u32 = 30;
    fn base(vocab: usize) -> u32 {
        vocab as u32 - SPAN - 1
    }

    /// Logits that make token `t` followed by `base + (t + 1) % SPAN`; every call is logged.
    struct FakeEngine {
        config: LlamaConfig,
        log: Arc<Mutex<Vec<Call>>>,
        delay: Duration,
    }

    impl FakeEngine {
        fn logits(&self, last: u32) -> Vec<f32> {
            let mut l = vec![0f32; self.config.vocab_size];
            l[(base(self.config.vocab_size) + (last + 1) % SPAN) as usize] = 10.0;
            l
        }
    }

    impl Engine for FakeEngine {
        fn config(&self) -> &LlamaConfig {
            &self.config
        }
        fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
            self.log.lock().unwrap().push(Call::Prefill(seq, tokens.len()));
            Ok(self.logits(*tokens.last().unwrap()))
        }
        fn decode(&mut self, batch: &[(SeqId, u32)], logits: &mut Vec<f32>) -> anyhow::Result<()> {
            std::thread::sleep(self.delay);
            self.log.lock().unwrap().push(Call::Decode(batch.iter().map(|b| b.0).collect()));
            logits.clear();
            for &(_, t) in batch {
                logits.extend(self.logits(t));
            }
            Ok(())
        }
        fn release(&mut self, seq: SeqId) {
            self.log.lock().unwrap().push(Call::Release(seq));
        }
    }

    fn tokenizer() -> Tokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_spm.gguf");
        let file = lacuna_model::gguf::GgufFile::open(&path).unwrap();
        Tokenizer::from_gguf(&file).unwrap()
    }

    /// The scheduler, the fake engine's call log, the metrics and the scheduler thread.
    type Started = (SchedulerHandle, Arc<Mutex<Vec<Call>>>, Arc<Metrics>, JoinHandle<()>);

    fn start(max_batch: usize, prefill_chunk: usize, delay_ms: u64) -> Started {
        let tok = tokenizer();
        assert!(tok.eos_ids().iter().all(|&e| e < base(tok.vocab_size())), "EOS among the fake's tokens");
        let config = LlamaConfig {
            vocab_size: tok.vocab_size(),
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 8,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            torch_dtype: None,
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let engine = FakeEngine { config, log: log.clone(), delay: Duration::from_millis(delay_ms) };
        let metrics = Arc::new(Metrics::new("fake"));
        let (h, t) =
            spawn(engine, Arc::new(tok), SchedulerConfig { max_batch, max_queue: 4, prefill_chunk }, metrics.clone())
                .unwrap();
        (h, log, metrics, t)
    }

    fn submission(
        prompt_len: usize,
        max_tokens: usize,
        n: usize,
    ) -> (Submission, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let s = Submission {
            request_id: "t".into(),
            prompt: (0..prompt_len as u32).map(|i| base(tokenizer().vocab_size()) + i % SPAN).collect(),
            n,
            max_tokens,
            sampling: SamplingParams::default(),
            penalties: Penalties::default(),
            stop: vec![],
            ignore_eos: false,
            logprobs: None,
            arrived: Instant::now(),
            events: tx,
        };
        (s, rx)
    }

    /// Events until every choice finished.
    fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>, n: usize) -> Vec<(usize, usize)> {
        let mut done = Vec::new();
        while done.len() < n {
            match rx.blocking_recv().expect("scheduler hung up") {
                Event::Finished { index, completion_tokens, reason, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    done.push((index, completion_tokens));
                }
                Event::Failed(m) => panic!("{m}"),
                Event::Token { .. } => {}
            }
        }
        done.sort();
        done
    }

    #[test]
    fn long_prompts_prefill_in_chunks_between_decode_steps() {
        let (h, log, metrics, t) = start(8, 4, 5);
        let (a, mut ra) = submission(3, 40, 1);
        h.submit(a).unwrap();
        // Let A start decoding, then send B with a 10-token prompt.
        std::thread::sleep(Duration::from_millis(12));
        let (b, mut rb) = submission(10, 2, 1);
        h.submit(b).unwrap();
        assert_eq!(drain(&mut ra, 1), vec![(0, 40)]);
        assert_eq!(drain(&mut rb, 1), vec![(0, 2)]);
        h.shutdown();
        t.join().unwrap();
        let log = log.lock().unwrap().clone();
        let b_chunks: Vec<usize> =
            log.iter().filter_map(|c| if let Call::Prefill(1, n) = c { Some(*n) } else { None }).collect();
        assert_eq!(b_chunks, vec![4, 4, 2], "{log:?}");
        // Between B's first and last chunk, A kept decoding.
        let first = log.iter().position(|c| *c == Call::Prefill(1, 4)).unwrap();
        let last = log.iter().position(|c| *c == Call::Prefill(1, 2)).unwrap();
        assert!(log[first..last].iter().any(|c| matches!(c, Call::Decode(b) if b.contains(&0))), "{log:?}");
        // Some step decoded both sequences together.
        assert!(log.iter().any(|c| matches!(c, Call::Decode(b) if b.len() == 2)), "{log:?}");
        assert!(log.contains(&Call::Release(0)) && log.contains(&Call::Release(1)));
        assert_eq!(metrics.running(), 0);
        assert_eq!(metrics.prompt_tokens.load(Ordering::Relaxed), 13);
    }

    #[test]
    fn n_choices_are_separate_sequences_and_a_dropped_receiver_releases_them() {
        let (h, log, metrics, t) = start(8, 64, 2);
        let (s, mut rx) = submission(5, 4, 3);
        h.submit(s).unwrap();
        assert_eq!(drain(&mut rx, 3), vec![(0, 4), (1, 4), (2, 4)]);
        let (s, rx) = submission(5, 200, 1);
        h.submit(s).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        drop(rx);
        let t0 = Instant::now();
        while !log.lock().unwrap().contains(&Call::Release(3)) {
            assert!(t0.elapsed() < Duration::from_secs(5), "the abandoned sequence was never released");
            std::thread::sleep(Duration::from_millis(5));
        }
        let decodes = log.lock().unwrap().iter().filter(|c| matches!(c, Call::Decode(b) if b.contains(&3))).count();
        assert!(decodes < 150, "kept decoding after the client left ({decodes} steps)");
        h.shutdown();
        t.join().unwrap();
        assert_eq!(metrics.running(), 0);
    }
}

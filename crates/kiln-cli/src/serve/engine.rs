//! The scheduler: continuous batching over one model on its own thread.
//!
//! ```text
//! loop:
//!     drop the sequences whose client hung up (their KV caches are freed)
//!     admit waiting sequences while the batch has room (and the step's prefill budget lasts):
//!         prefill each alone (one forward of its prompt), sample its first token
//!     one batched decode step over every live sequence: forward_batch (chunks of at most
//!         gemm::INVARIANT_ROWS rows), then each sequence samples with its own sampler
//!     a sequence that is done (end of text, max_tokens, a stop string) leaves at once
//! ```
//!
//! A sequence gets exactly the tokens it gets generated alone with the same settings
//! (`kiln gpt2 generate`): its prompt is prefilled on its own, its sampler is its own, and each
//! row of a row-invariant batched product of up to `INVARIANT_ROWS` rows is bitwise that row's own product
//! (`docs/gemm.md`, "Batch invariance").
use super::metrics::Metrics;
use kiln_models::gpt2::{Gpt2, Gpt2State, Logits, Sampler, SamplerConfig, TextStream, EOT};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// One sequence to generate (a choice of a request).
pub struct SeqRequest {
    /// Index of the choice in its response.
    pub index: usize,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Text that ends the generation (not included in the output).
    pub stop: Vec<String>,
    /// Log-probabilities: `Some(n)` reports the chosen token's and the `n` most likely ones'.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
    pub enqueued: Instant,
}

/// The log-probabilities of one generated token.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely tokens at this step: (text, bytes, logprob), most likely first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of text or a stop string.
    Stop,
    /// `max_tokens` generated.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine reports about a sequence, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text that is now final (possibly empty: an unfinished UTF-8
    /// character, or text that may start a stop string, is held back).
    Token {
        index: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        index: usize,
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The sequence failed (a panic or error in its work, or the server stopping).
    Error { index: usize, message: String },
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<SeqRequest>,
    pub waiting: Arc<AtomicUsize>,
    pub max_queue: usize,
    pub stopping: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Queues the sequences of one request, all or none: false when the queue has no room for
    /// them.
    pub fn submit(&self, seqs: Vec<SeqRequest>) -> bool {
        let n = seqs.len();
        let mut cur = self.waiting.load(Ordering::SeqCst);
        loop {
            if cur + n > self.max_queue {
                return false;
            }
            match self
                .waiting
                .compare_exchange(cur, cur + n, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        for s in seqs {
            if self.tx.send(s).is_err() {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        true
    }
}

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch: usize,
    pub max_queue: usize,
    /// Prompt tokens prefilled between two decode steps (at least one prompt is, whatever its
    /// length): bounds the pause a long prompt makes in the other sequences' streams.
    pub prefill_budget: usize,
    /// A prompt that makes its prefill panic (to test that a panic is contained); none in use.
    pub fault_prompt: Option<Vec<u32>>,
}

/// A sequence in the batch.
struct Live {
    req: SeqRequest,
    state: Gpt2State,
    sampler: Sampler,
    history: Vec<u32>,
    /// The token chosen last, fed to the next step.
    next: u32,
    generated: usize,
    stream: TextStream,
    /// Text decided but not yet sent (it may be the start of a stop string).
    held: String,
    started: Instant,
    last_token: Option<Instant>,
}

/// Starts the engine thread on `threads` threads (all cores when `None`).
pub fn start(
    gpt2: Arc<Gpt2>,
    cfg: EngineConfig,
    threads: Option<usize>,
    metrics: Arc<Metrics>,
) -> kiln_tensor::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<SeqRequest>();
    let waiting = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle {
        tx,
        waiting: waiting.clone(),
        max_queue: cfg.max_queue,
        stopping: stopping.clone(),
    };
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        builder = builder.num_threads(t);
    }
    let pool = builder
        .build()
        .map_err(|e| kiln_tensor::Error::invalid(format!("thread pool: {e}")))?;
    let join = std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || {
            pool.install(|| {
                Scheduler {
                    gpt2,
                    cfg,
                    rx,
                    waiting,
                    stopping,
                    metrics,
                    live: Vec::new(),
                    logits: Vec::new(),
                }
                .run()
            })
        })
        .map_err(|e| kiln_tensor::Error::invalid(format!("engine thread: {e}")))?;
    Ok((handle, join))
}

struct Scheduler {
    gpt2: Arc<Gpt2>,
    cfg: EngineConfig,
    rx: mpsc::Receiver<SeqRequest>,
    waiting: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    live: Vec<Live>,
    logits: Vec<f32>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            // Sequences whose client hung up leave the batch (and free their caches) first.
            self.live.retain(|l| !l.req.events.is_closed());
            if !self.admit() {
                break;
            }
            self.metrics
                .running
                .store(self.live.len(), Ordering::Relaxed);
            if !self.live.is_empty() {
                self.decode_step();
            }
            self.metrics
                .running
                .store(self.live.len(), Ordering::Relaxed);
        }
        // The channel is closed: the server is going away.
        for l in self.live.drain(..) {
            let _ = l.req.events.send(Event::Error {
                index: l.req.index,
                message: "the server is shutting down".into(),
            });
        }
    }

    /// Admits waiting sequences while there is room; blocks when nothing runs. Returns false
    /// when the channel is closed and nothing is left to do.
    fn admit(&mut self) -> bool {
        let mut budget = self.cfg.prefill_budget;
        let mut admitted = 0;
        while self.live.len() < self.cfg.max_batch && (admitted == 0 || budget > 0) {
            let req = if self.live.is_empty() && admitted == 0 {
                match self.rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if self.stopping.load(Ordering::SeqCst) && self.waiting() == 0 {
                            return true;
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue.store(self.waiting(), Ordering::Relaxed);
            if req.events.is_closed() {
                continue; // the client left while it waited
            }
            admitted += 1;
            budget = budget.saturating_sub(req.prompt_ids.len());
            self.prefill(req);
        }
        true
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Prefills one sequence alone and handles its first token; it joins the batch unless it
    /// is already done.
    fn prefill(&mut self, req: SeqRequest) {
        let index = req.index;
        let events = req.events.clone();
        let prompt_tokens = req.prompt_ids.len();
        if req.max_tokens == 0 {
            let _ = events.send(Event::Done {
                index,
                finish: Finish::Length,
                prompt_tokens,
                completion_tokens: 0,
            });
            return;
        }
        let gpt2 = self.gpt2.clone();
        let fault = self.cfg.fault_prompt.as_ref() == Some(&req.prompt_ids);
        let logits = &mut self.logits;
        let result = std::panic::catch_unwind(AssertUnwindSafe(
            || -> kiln_tensor::Result<(Gpt2State, Sampler, u32, Option<TokenLogprob>)> {
                if fault {
                    panic!("injected fault in the prefill of a request");
                }
                let model = &gpt2.model;
                let mut state = model.new_state(req.prompt_ids.len() + req.max_tokens - 1)?;
                let mut sampler = Sampler::new(req.sampler.clone())?;
                model.forward(&req.prompt_ids, &mut state, Logits::Last, logits)?;
                let lp = req.logprobs.map(|n| Logprobs::of(logits, n));
                let next = sampler.sample(logits, &req.prompt_ids)?;
                let lp = lp.map(|l| l.token(&gpt2, next));
                Ok((state, sampler, next, lp))
            },
        ));
        let (state, sampler, next, lp) = match result {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = events.send(Event::Error {
                    index,
                    message: e.to_string(),
                });
                return;
            }
            Err(p) => {
                let _ = events.send(Event::Error {
                    index,
                    message: format!("internal error: {}", panic_message(&p)),
                });
                return;
            }
        };
        let history = req.prompt_ids.clone();
        let mut live = Live {
            started: req.enqueued,
            req,
            state,
            sampler,
            history,
            next,
            generated: 0,
            stream: TextStream::default(),
            held: String::new(),
            last_token: None,
        };
        if self.record(&mut live, lp) {
            self.live.push(live);
        }
    }

    /// One batched decode step over every live sequence.
    fn decode_step(&mut self) {
        let v = self.gpt2.model.config.vocab_size;
        let bsz = self.live.len();
        self.metrics.batch_size.observe(bsz as f64);
        let gpt2 = self.gpt2.clone();
        let live = &mut self.live;
        let logits = &mut self.logits;
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| -> kiln_tensor::Result<Vec<f32>> {
                let mut all = Vec::with_capacity(bsz * v);
                // Chunks of at most INVARIANT_ROWS sequences: within one, each row is its own product.
                for chunk in live.chunks_mut(kiln_cpu::gemm::INVARIANT_ROWS) {
                    let ids: Vec<u32> = chunk.iter().map(|l| l.next).collect();
                    let mut states: Vec<&mut Gpt2State> =
                        chunk.iter_mut().map(|l| &mut l.state).collect();
                    gpt2.model.forward_batch(&ids, &mut states, logits)?;
                    all.extend_from_slice(logits);
                }
                Ok(all)
            }));
        let mut all = match result {
            Ok(Ok(all)) => all,
            Ok(Err(e)) => return self.fail_all(e.to_string()),
            Err(p) => return self.fail_all(format!("internal error: {}", panic_message(&p))),
        };
        let mut keep = Vec::with_capacity(bsz);
        for (row, mut l) in std::mem::take(&mut self.live).into_iter().enumerate() {
            let lg = &mut all[row * v..(row + 1) * v];
            let lp = l.req.logprobs.map(|n| Logprobs::of(lg, n));
            let next = match l.sampler.sample(lg, &l.history) {
                Ok(id) => id,
                Err(e) => {
                    let _ = l.req.events.send(Event::Error {
                        index: l.req.index,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            l.next = next;
            let lp = lp.map(|x| x.token(&self.gpt2, next));
            if self.record(&mut l, lp) {
                keep.push(l);
            }
        }
        self.live = keep;
    }

    /// Every live sequence fails with `message` (their states may be broken).
    fn fail_all(&mut self, message: String) {
        for l in self.live.drain(..) {
            let _ = l.req.events.send(Event::Error {
                index: l.req.index,
                message: message.clone(),
            });
        }
    }

    /// Takes the token `l.next` as generate does: end of text ends the sequence; otherwise
    /// it is appended and reported, and the sequence ends at `max_tokens` or a stop string.
    /// Returns whether the sequence goes on.
    fn record(&self, l: &mut Live, lp: Option<TokenLogprob>) -> bool {
        let id = l.next;
        let index = l.req.index;
        let now = Instant::now();
        match l.last_token {
            None => self
                .metrics
                .ttft
                .observe(now.duration_since(l.started).as_secs_f64()),
            Some(t) => self
                .metrics
                .itl
                .observe(now.duration_since(t).as_secs_f64()),
        }
        l.last_token = Some(now);
        if id == EOT {
            let rest = l.stream.finish();
            l.held.push_str(&rest);
            let text = std::mem::take(&mut l.held);
            if !text.is_empty() {
                let _ = l.req.events.send(Event::Token {
                    index,
                    text,
                    logprob: None,
                });
            }
            return self.done(l, Finish::Stop);
        }
        l.generated += 1;
        self.metrics.tokens_out.fetch_add(1, Ordering::Relaxed);
        l.history.push(id);
        let bytes = self.gpt2.tokenizer.decode_bytes(&[id]).unwrap_or_default();
        let piece = l.stream.push(&bytes);
        l.held.push_str(&piece);
        let last = l.generated == l.req.max_tokens;
        if last {
            let rest = l.stream.finish();
            l.held.push_str(&rest);
        }
        // A stop string: the text before it is the end of the output.
        if let Some(pos) = l
            .req
            .stop
            .iter()
            .filter_map(|s| l.held.find(s.as_str()))
            .min()
        {
            l.held.truncate(pos);
            let text = std::mem::take(&mut l.held);
            let _ = l.req.events.send(Event::Token {
                index,
                text,
                logprob: lp,
            });
            return self.done(l, Finish::Stop);
        }
        // Hold back the longest end of the text that could begin a stop string.
        let keep = if last {
            0
        } else {
            stop_prefix_len(&l.held, &l.req.stop)
        };
        let cut = l.held.len() - keep;
        let text: String = l.held.drain(..cut).collect();
        let sent = l.req.events.send(Event::Token {
            index,
            text,
            logprob: lp,
        });
        if sent.is_err() {
            return false; // the client left
        }
        if last {
            return self.done(l, Finish::Length);
        }
        true
    }

    fn done(&self, l: &mut Live, finish: Finish) -> bool {
        let _ = l.req.events.send(Event::Done {
            index: l.req.index,
            finish,
            prompt_tokens: l.req.prompt_ids.len(),
            completion_tokens: l.generated,
        });
        false
    }
}

/// The length of the longest end of `text` that is the beginning of a stop string (and not a
/// whole one).
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

/// The text of a caught panic.
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Log-probabilities at one step, from the raw logits (before the sampler's penalties).
struct Logprobs {
    lse: f32,
    top: Vec<(u32, f32)>,
    logits_of_all: Vec<f32>,
}

impl Logprobs {
    fn of(logits: &[f32], n: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max + sum.ln() as f32;
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
        if n > 0 {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            let by = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            let n = n.min(idx.len());
            idx.select_nth_unstable_by(n - 1, by);
            idx.truncate(n);
            idx.sort_unstable_by(by);
            top = idx
                .into_iter()
                .map(|i| (i, logits[i as usize] - lse))
                .collect();
        }
        Logprobs {
            lse,
            top,
            logits_of_all: logits.to_vec(),
        }
    }

    fn token(self, gpt2: &Gpt2, id: u32) -> TokenLogprob {
        let text = |i: u32| -> (String, Vec<u8>) {
            let b = gpt2.tokenizer.decode_bytes(&[i]).unwrap_or_default();
            (String::from_utf8_lossy(&b).into_owned(), b)
        };
        let (token, bytes) = text(id);
        TokenLogprob {
            token,
            bytes,
            logprob: self.logits_of_all[id as usize] - self.lse,
            top: self
                .top
                .iter()
                .map(|&(i, lp)| {
                    let (t, b) = text(i);
                    (t, b, lp)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefixes_are_held_back() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(stop_prefix_len("hello\nUs", &stops), 3);
        assert_eq!(stop_prefix_len("hello E", &stops), 1);
        assert_eq!(stop_prefix_len("hello", &stops), 0);
        assert_eq!(stop_prefix_len("héllo", &["é!".to_string()]), 0);
    }
}

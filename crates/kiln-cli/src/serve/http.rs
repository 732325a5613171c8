//! The HTTP routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`, with the API key check, the body limit and timeout, and a
//! caught panic answered as a 500.
use super::api::{self, ApiError, Common, Fields, Prompt};
use super::engine::{EngineHandle, Event, SeqRequest, TokenLogprob};
use super::metrics::Metrics;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::FutureExt;
use kiln_models::gpt2::Gpt2;
use serde_json::{json, Value};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// What every handler shares.
pub struct AppState {
    pub gpt2: Arc<Gpt2>,
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub model_name: String,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// A request body must arrive within this.
    pub body_timeout: Duration,
    pub created: u64,
    pub next_id: AtomicU64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Around every request: the API key (for `/v1/…`), a caught panic as a 500, and the count of
/// answers by endpoint and status.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let endpoint = match path.as_str() {
        "/v1/completions" | "/v1/chat/completions" | "/v1/models" | "/health" | "/metrics" => {
            path.clone()
        }
        _ => "other".to_string(),
    };
    let resp = if path.starts_with("/v1/") && !authorized(&st, &req) {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or incorrect API key (send `Authorization: Bearer KEY`)",
        )
        .with_code("invalid_api_key")
        .into_response()
    } else {
        match AssertUnwindSafe(next.run(req)).catch_unwind().await {
            Ok(r) => r,
            Err(p) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("internal error: {}", super::engine::panic_message(&p)),
            )
            .into_response(),
        }
    };
    st.metrics.request(&endpoint, resp.status().as_u16());
    resp
}

fn authorized(st: &AppState, req: &Request) -> bool {
    let Some(key) = &st.api_key else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn health() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_name,
            "object": "model",
            "created": st.created,
            "owned_by": "kiln",
            "max_model_len": st.gpt2.model.config.n_positions,
        }],
    }))
    .into_response()
}

/// The body, within the size limit (413) and the time limit (408).
async fn read_body(st: &AppState, req: Request) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the body exceeds {} bytes", st.max_body_bytes),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > st.max_body_bytes as u64 {
            return Err(too_large());
        }
    }
    let body = req.into_body();
    match tokio::time::timeout(
        st.body_timeout,
        axum::body::to_bytes(body, st.max_body_bytes),
    )
    .await
    {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the body did not arrive within {} s",
                st.body_timeout.as_secs_f64()
            ),
        )),
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("length limit") {
                Err(too_large())
            } else {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("reading the body: {text}"),
                ))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A validated generation request.
struct Job {
    kind: Kind,
    common: Common,
    /// Token ids of each prompt.
    prompts: Vec<Vec<u32>>,
    /// Text of each prompt (for `echo`).
    prompt_texts: Vec<String>,
    max_tokens: usize,
    logprobs: Option<usize>,
    echo: bool,
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    match completion_job(&st, req).await {
        Ok(job) => run_job(st, job).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    match chat_job(&st, req).await {
        Ok(job) => run_job(st, job).await,
        Err(e) => e.into_response(),
    }
}

async fn completion_job(st: &AppState, req: Request) -> Result<Job, ApiError> {
    let body = read_body(st, req).await?;
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let common = api::common(&f, &st.model_name)?;
    let logprobs = f.int_in("logprobs", 0, 20)?.map(|n| n as usize);
    let echo = f.bool("echo")?.unwrap_or(false);
    let n_pos = st.gpt2.model.config.n_positions;
    let v = st.gpt2.model.config.vocab_size;
    let mut prompts = Vec::new();
    let mut texts = Vec::new();
    let mut max = 16;
    for p in api::prompts(&f)? {
        let (ids, text) = match p {
            Prompt::Text(t) => (st.gpt2.encode(&t, false), t),
            Prompt::Ids(ids) => {
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {v} tokens"),
                    ));
                }
                let text = st.gpt2.decode(&ids).unwrap_or_default();
                (ids, text)
            }
        };
        max = api::max_tokens(&f, &["max_tokens"], Some(16), ids.len(), n_pos)?;
        prompts.push(ids);
        texts.push(text);
    }
    Ok(Job {
        kind: Kind::Completion,
        common,
        prompts,
        prompt_texts: texts,
        max_tokens: max,
        logprobs,
        echo,
    })
}

async fn chat_job(st: &AppState, req: Request) -> Result<Job, ApiError> {
    let body = read_body(st, req).await?;
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let mut common = api::common(&f, &st.model_name)?;
    common.stop.push(api::CHAT_STOP.to_string());
    let want_logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.int_in("top_logprobs", 0, 20)?.unwrap_or(0) as usize;
    let prompt = api::chat_prompt(&f)?;
    let ids = st.gpt2.encode(&prompt, false);
    let n_pos = st.gpt2.model.config.n_positions;
    let max = api::max_tokens(
        &f,
        &["max_completion_tokens", "max_tokens"],
        None,
        ids.len(),
        n_pos,
    )?;
    Ok(Job {
        kind: Kind::Chat,
        common,
        prompts: vec![ids],
        prompt_texts: vec![prompt],
        max_tokens: max,
        logprobs: want_logprobs.then_some(top),
        echo: false,
    })
}

/// Per choice, what the answer collects.
#[derive(Default, Clone)]
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
}

/// Queues the job's sequences and answers: one JSON object, or server-sent events.
async fn run_job(st: Arc<AppState>, job: Job) -> Response {
    let (tx, rx) = mpsc::unbounded_channel();
    let seed = job.common.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ st.next_id.load(Ordering::Relaxed).wrapping_mul(0x9e37_79b9)
    });
    let n = job.common.n;
    let mut seqs = Vec::new();
    for (pi, ids) in job.prompts.iter().enumerate() {
        for c in 0..n {
            let mut sampling = job.common.sampling.clone();
            // Choice c of a prompt samples with seed + c: with n = 1 it is the request's seed.
            sampling.seed = seed.wrapping_add(c as u64);
            let sampler = match sampling.config(false) {
                Ok(s) => s,
                Err(e) => return ApiError::from(e).into_response(),
            };
            seqs.push(SeqRequest {
                index: pi * n + c,
                prompt_ids: ids.clone(),
                max_tokens: job.max_tokens,
                sampler,
                stop: job.common.stop.clone(),
                logprobs: job.logprobs,
                events: tx.clone(),
                enqueued: Instant::now(),
            });
        }
    }
    drop(tx);
    let total = seqs.len();
    if st.engine.stopping.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
        .into_response();
    }
    if total > st.engine.max_queue {
        return ApiError::invalid(
            "n",
            format!(
                "{total} sequences (prompts × n) exceed the queue of {}",
                st.engine.max_queue
            ),
        )
        .into_response();
    }
    if !st.engine.submit(seqs) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the queue is full ({} sequences waiting); retry later",
                st.engine.max_queue
            ),
        );
        e.retry_after = Some(1);
        return e.into_response();
    }
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
    st.metrics
        .tokens_in
        .fetch_add((prompt_tokens * n) as u64, Ordering::Relaxed);
    let id_num = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match job.kind {
        Kind::Completion => format!("cmpl-{id_num:016x}"),
        Kind::Chat => format!("chatcmpl-{id_num:016x}"),
    };
    // Echo with log-probabilities: the prompt's own tokens scored in one forward pass.
    let mut prompt_lps: Vec<Option<Vec<TokenLogprob>>> = vec![None; job.prompts.len()];
    if job.echo && job.logprobs.is_some() {
        for (pi, ids) in job.prompts.iter().enumerate() {
            let gpt2 = st.gpt2.clone();
            let ids = ids.clone();
            let top = job.logprobs.unwrap_or(0);
            prompt_lps[pi] = tokio::task::spawn_blocking(move || prompt_logprobs(&gpt2, &ids, top))
                .await
                .ok()
                .flatten();
        }
    }
    if job.common.stream {
        stream_job(st, job, id, rx, total, prompt_lps)
    } else {
        collect_job(st, job, id, rx, total, prompt_lps).await
    }
}

/// Scores every prompt token but the first (`null` in the answer).
fn prompt_logprobs(gpt2: &Gpt2, ids: &[u32], top: usize) -> Option<Vec<TokenLogprob>> {
    let logits = gpt2.model.logits(ids).ok()?;
    let v = gpt2.model.config.vocab_size;
    let text = |i: u32| {
        let b = gpt2.tokenizer.decode_bytes(&[i]).unwrap_or_default();
        (String::from_utf8_lossy(&b).into_owned(), b)
    };
    let mut out = Vec::with_capacity(ids.len());
    for (t, &id) in ids.iter().enumerate() {
        let (token, bytes) = text(id);
        if t == 0 {
            out.push(TokenLogprob {
                token,
                bytes,
                logprob: f32::NAN,
                top: Vec::new(),
            });
            continue;
        }
        let row = &logits[(t - 1) * v..t * v];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max
            + row
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln() as f32;
        let mut order: Vec<u32> = (0..v as u32).collect();
        let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let mut tops = Vec::new();
        if top > 0 {
            order.select_nth_unstable_by(top - 1, by);
            order.truncate(top);
            order.sort_unstable_by(by);
            tops = order
                .iter()
                .map(|&i| {
                    let (t, b) = text(i);
                    (t, b, row[i as usize] - lse)
                })
                .collect();
        }
        out.push(TokenLogprob {
            token,
            bytes,
            logprob: row[id as usize] - lse,
            top: tops,
        });
    }
    Some(out)
}

/// The whole answer as one JSON object.
async fn collect_job(
    st: Arc<AppState>,
    job: Job,
    id: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
    total: usize,
    prompt_lps: Vec<Option<Vec<TokenLogprob>>>,
) -> Response {
    let mut choices = vec![Choice::default(); total];
    let mut done = 0;
    let mut completion_tokens = 0;
    while done < total {
        match rx.recv().await {
            Some(Event::Token {
                index,
                text,
                logprob,
            }) => {
                choices[index].text.push_str(&text);
                choices[index].logprobs.extend(logprob);
            }
            Some(Event::Done {
                index,
                finish,
                completion_tokens: c,
                ..
            }) => {
                choices[index].finish = Some(finish.as_str());
                completion_tokens += c;
                done += 1;
            }
            Some(Event::Error { message, .. }) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
                    .into_response();
            }
            None => break,
        }
    }
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
    let n = job.common.n;
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let pi = i / n;
            match job.kind {
                Kind::Completion => {
                    let (text, lps) = if job.echo {
                        let mut lps = prompt_lps[pi].clone().unwrap_or_default();
                        lps.extend(c.logprobs.iter().cloned());
                        (format!("{}{}", job.prompt_texts[pi], c.text), lps)
                    } else {
                        (c.text.clone(), c.logprobs.clone())
                    };
                    json!({
                        "text": text,
                        "index": i,
                        "logprobs": job.logprobs.map(|_| completion_logprobs(&lps, 0)),
                        "finish_reason": c.finish,
                    })
                }
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": job.logprobs.map(|_| chat_logprobs(&c.logprobs)),
                    "finish_reason": c.finish,
                }),
            }
        })
        .collect();
    let object = match job.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    axum::Json(json!({
        "id": id,
        "object": object,
        "created": unix_now(),
        "model": st.model_name,
        "system_fingerprint": "kiln",
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// The completions `logprobs` object; `offset` is the text offset of the first token.
fn completion_logprobs(lps: &[TokenLogprob], offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(lps.len());
    let mut at = offset;
    for l in lps {
        text_offset.push(at);
        at += l.token.len();
    }
    let num = |x: f32| if x.is_nan() { Value::Null } else { json!(x) };
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| num(l.logprob)).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            if l.logprob.is_nan() {
                return Value::Null;
            }
            let mut m = serde_json::Map::new();
            for (t, _, lp) in &l.top {
                m.insert(t.clone(), json!(lp));
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    json!({"content": lps.iter().map(|l| json!({
        "token": l.token,
        "logprob": l.logprob,
        "bytes": l.bytes,
        "top_logprobs": l.top.iter().map(|(t, b, lp)| json!({
            "token": t, "logprob": lp, "bytes": b,
        })).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}

/// Server-sent events: `data: {chunk}` per token (and a last chunk per choice with its
/// `finish_reason`), `data: [DONE]` at the end. The client hanging up drops the receiver, and the
/// engine drops its sequences at the next step.
fn stream_job(
    st: Arc<AppState>,
    job: Job,
    id: String,
    rx: mpsc::UnboundedReceiver<Event>,
    total: usize,
    prompt_lps: Vec<Option<Vec<TokenLogprob>>>,
) -> Response {
    let created = unix_now();
    let model = st.model_name.clone();
    let object = match job.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let chunk = move |choices: Value, usage: Option<Value>| -> Bytes {
        let mut v = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "system_fingerprint": "kiln",
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
    let n = job.common.n;
    let kind = job.kind;
    let logprobs = job.logprobs.is_some();
    // What goes out before the first token: the role (chat), the prompt text (echo).
    let mut first: Vec<Bytes> = Vec::new();
    for i in 0..total {
        match kind {
            Kind::Chat => first.push(chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                        "logprobs": null, "finish_reason": null}]),
                None,
            )),
            Kind::Completion if job.echo => {
                let pi = i / n;
                let lp = prompt_lps[pi]
                    .as_ref()
                    .filter(|_| logprobs)
                    .map(|l| completion_logprobs(l, 0));
                first.push(chunk(
                    json!([{"index": i, "text": job.prompt_texts[pi], "logprobs": lp,
                            "finish_reason": null}]),
                    None,
                ));
            }
            Kind::Completion => {}
        }
    }
    let include_usage = job.common.include_usage;
    struct S {
        rx: mpsc::UnboundedReceiver<Event>,
        pending: std::collections::VecDeque<Bytes>,
        done: usize,
        completion_tokens: usize,
        finished: bool,
    }
    let state = S {
        rx,
        pending: first.into(),
        done: 0,
        completion_tokens: 0,
        finished: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut s| {
        let chunk = chunk.clone();
        async move {
            loop {
                if let Some(b) = s.pending.pop_front() {
                    return Some((Ok::<Bytes, std::convert::Infallible>(b), s));
                }
                if s.finished {
                    return None;
                }
                if s.done == total {
                    if include_usage {
                        s.pending.push_back(chunk(
                            json!([]),
                            Some(json!({
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": s.completion_tokens,
                                "total_tokens": prompt_tokens + s.completion_tokens,
                            })),
                        ));
                    }
                    s.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    s.finished = true;
                    continue;
                }
                match s.rx.recv().await {
                    Some(Event::Token {
                        index,
                        text,
                        logprob,
                    }) => {
                        let lp = logprob.map(|l| match kind {
                            Kind::Completion => completion_logprobs(&[l], 0),
                            Kind::Chat => chat_logprobs(&[l]),
                        });
                        let c = match kind {
                            Kind::Completion => json!([{"index": index, "text": text,
                                "logprobs": lp, "finish_reason": null}]),
                            Kind::Chat => json!([{"index": index, "delta": {"content": text},
                                "logprobs": lp, "finish_reason": null}]),
                        };
                        s.pending.push_back(chunk(c, None));
                    }
                    Some(Event::Done {
                        index,
                        finish,
                        completion_tokens,
                        ..
                    }) => {
                        s.done += 1;
                        s.completion_tokens += completion_tokens;
                        let c = match kind {
                            Kind::Completion => json!([{"index": index, "text": "",
                                "logprobs": null, "finish_reason": finish.as_str()}]),
                            Kind::Chat => json!([{"index": index, "delta": {},
                                "logprobs": null, "finish_reason": finish.as_str()}]),
                        };
                        s.pending.push_back(chunk(c, None));
                    }
                    Some(Event::Error { message, .. }) => {
                        let e = ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "server_error",
                            message,
                        );
                        s.pending
                            .push_back(Bytes::from(format!("data: {}\n\n", e.body())));
                        s.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                        s.finished = true;
                    }
                    None => s.finished = true,
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

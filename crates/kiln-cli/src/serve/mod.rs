//! `kiln serve`: an OpenAI-compatible HTTP server for GPT-2, with streaming and continuous
//! batching (`docs/serve.md`).
//!
//! | module | what |
//! |---|---|
//! | [`engine`] | the scheduler thread: prefill newcomers, one batched decode step, repeat |
//! | [`http`] | routes, API key, body limit and timeout, SSE, a panic answered as a 500 |
//! | [`api`] | request fields read with errors that name them, the chat template |
//! | [`metrics`] | Prometheus counters and histograms |
pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;

use clap::Args;
use kiln_models::gpt2::{Gpt2, LoadOptions};
use kiln_tensor::{DType, Error, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint folder (as `kiln gpt2 generate --model`).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Weight dtype in memory: f32 or bf16 (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Threads of the model (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most sequences waiting to join the batch; beyond it requests get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on `/v1/…` (default: no key).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name clients ask for (`model` in requests, `GET /v1/models`).
    #[arg(long, default_value = "gpt2")]
    pub model_name: String,
    /// Largest request body in bytes (larger ones get 413).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a client has to send a request's headers (also how long an idle connection is
    /// kept) and its body (408 after that).
    #[arg(long, default_value_t = 30.0)]
    pub timeout_secs: f64,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cut.
    #[arg(long, default_value_t = 10.0)]
    pub shutdown_secs: f64,
    /// Prompt tokens prefilled between two decode steps (one prompt always is).
    #[arg(long, default_value_t = 1024)]
    pub prefill_budget: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.threads == Some(0) {
        return Err(Error::invalid("--threads must be at least 1"));
    }
    if a.max_batch == 0 || a.max_queue == 0 {
        return Err(Error::invalid(
            "--max-batch and --max-queue must be at least 1",
        ));
    }
    let timeout_ok = a.timeout_secs.is_finite() && a.timeout_secs > 0.0;
    let shutdown_ok = a.shutdown_secs.is_finite() && a.shutdown_secs >= 0.0;
    if !timeout_ok || !shutdown_ok {
        return Err(Error::invalid(
            "--timeout-secs must be > 0 and --shutdown-secs ≥ 0",
        ));
    }
    let dtype = match a.dtype.as_deref() {
        None => None,
        Some("f32") => Some(DType::F32),
        Some("bf16") => Some(DType::BF16),
        Some(d) => {
            return Err(Error::invalid(format!(
                "--dtype `{d}`: expected f32 or bf16"
            )))
        }
    };
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (a.host.as_str(), a.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or(())
        })
        .map_err(|_| Error::invalid(format!("--host `{}`: not an address", a.host)))?;
    let gpt2 = Arc::new(Gpt2::load(
        &a.model,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )?);
    // Every running sequence may hold a KV cache of the whole context: refuse a batch limit
    // whose caches cannot fit, rather than be killed for memory under load.
    let cfg = &gpt2.model.config;
    let kv_per_sequence = 2 * cfg.n_layer as u64 * cfg.n_positions as u64 * cfg.n_embd as u64 * 4;
    kiln_models::memory::check(
        (a.max_batch as u64).saturating_mul(kv_per_sequence),
        &format!(
            "--max-batch {}: that many sequences of the full context ({} tokens, {:.0} MiB of \
             KV cache each)",
            a.max_batch,
            cfg.n_positions,
            kv_per_sequence as f64 / (1u64 << 20) as f64
        ),
        "use a smaller --max-batch",
    )?;
    let fault_prompt = std::env::var("KILN_SERVE_FAULT_PROMPT")
        .ok()
        .map(|p| gpt2.encode(&p, false));
    let metrics = Arc::new(metrics::Metrics::default());
    let (engine, join) = engine::start(
        gpt2.clone(),
        engine::EngineConfig {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            prefill_budget: a.prefill_budget,
            fault_prompt,
        },
        a.threads,
        metrics.clone(),
    )?;
    // A panic inside a request's work is answered as a 500; it is logged, not fatal.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("kiln serve: a request's work panicked ({msg}); answered 500");
    }));
    let state = Arc::new(http::AppState {
        gpt2: gpt2.clone(),
        engine: engine.clone(),
        metrics,
        model_name: a.model_name.clone(),
        api_key: a.api_key.clone(),
        max_body_bytes: a.max_body_bytes,
        body_timeout: Duration::from_secs_f64(a.timeout_secs),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        next_id: AtomicU64::new(1),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("tokio runtime: {e}")))?;
    let timeout = Duration::from_secs_f64(a.timeout_secs);
    let shutdown = Duration::from_secs_f64(a.shutdown_secs);
    let stopping = engine.stopping.clone();
    let result = rt.block_on(serve(addr, state, timeout, shutdown, stopping, &a));
    drop(engine);
    rt.shutdown_timeout(Duration::from_millis(100));
    // The engine ends when its channel closes (every handle dropped with the runtime).
    let _ = join.join();
    result
}

async fn serve(
    addr: SocketAddr,
    state: Arc<http::AppState>,
    timeout: Duration,
    shutdown: Duration,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    a: &ServeArgs,
) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::invalid(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::invalid(format!("{addr}: {e}")))?;
    let cfg = &state.gpt2.model.config;
    eprintln!(
        "kiln serve: {} ({} layers, width {}, context {}, {} weights) as `{}` on http://{local} · max batch {} · queue {}",
        a.model.display(),
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_positions,
        state.gpt2.model.weights.dtype,
        a.model_name,
        a.max_batch,
        a.max_queue
    );
    let app = http::router(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(true);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = http1.serve_connection(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = fut.await;
                });
            }
            _ = &mut signal => break,
        }
    }
    // Stop accepting, let what is in flight finish within the deadline, then cut it.
    drop(listener);
    stopping.store(true, Ordering::SeqCst);
    eprintln!(
        "kiln serve: stopping; in-flight requests get {:.0} s",
        shutdown.as_secs_f64()
    );
    if tokio::time::timeout(shutdown, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("kiln serve: requests still running after the deadline were cut");
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

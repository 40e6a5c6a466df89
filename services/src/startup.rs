//! Build (load the model, start the scheduler, bind the listener), then run until a signal.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_web::{App, HttpServer, web};
use anyhow::{Context, Result, bail};
use lacuna_model::chat::ChatTemplate;
use lacuna_model::checkpoint::Checkpoint;
use lacuna_model::runtime::Runtime;
use lacuna_model::tokenizer::Tokenizer;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::routes::{self, AppState};
use crate::scheduler::{self, SchedulerConfig};
use crate::settings::Settings;

/// A built server: model loaded, scheduler running, listener bound. Nothing is served until
/// [`Application::run_until_stopped`].
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: web::Data<AppState>,
    scheduler: JoinHandle<()>,
    settings: Settings,
    shutdown: Arc<Notify>,
}

/// Starts the same drain as SIGTERM (for embedding and tests).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Notify>);

impl ShutdownHandle {
    pub fn trigger(&self) {
        self.0.notify_one();
    }
}

/// The name a model is served under by default: its file's stem or its directory's name.
pub fn default_model_name(path: &Path) -> String {
    let p = if path.is_dir() { path.file_name() } else { path.file_stem() };
    p.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_owned())
}

impl Application {
    /// Loads `settings.model` into the batched CPU runtime and binds `settings.host:port`.
    pub fn build(settings: Settings) -> Result<Self> {
        settings.validate()?;
        let path = settings.model.clone().context("no model given")?;
        let t0 = Instant::now();
        let ck = Checkpoint::open(&path).with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(model = %path.display(), seconds = t0.elapsed().as_secs_f64(), "model loaded");
        let name = settings.served_model_name.clone().unwrap_or_else(|| default_model_name(&path));
        let Checkpoint { mut model, tokenizer, .. } = ck;
        if settings.int8_lm_head {
            model.quantize_lm_head().context("quantizing the LM head to INT8")?;
        }
        let max_context = settings.max_context.unwrap_or(model.config().max_position_embeddings);
        let runtime = Runtime::new(Arc::new(model), settings.max_batch.max(1), max_context, settings.kv_cache)
            .context("starting the decode runtime")?;
        Self::build_with_engine(settings, runtime, tokenizer, name)
    }

    /// Like [`Application::build`] with a given engine (a batched runtime, or a test double).
    pub fn build_with_engine<E: Engine>(
        settings: Settings,
        engine: E,
        tokenizer: Tokenizer,
        model_name: String,
    ) -> Result<Self> {
        let model_ctx = engine.config().max_position_embeddings;
        let max_context = match settings.max_context {
            Some(c) if c > model_ctx => bail!("max_context {c} exceeds the model's context of {model_ctx}"),
            Some(c) => c,
            None => model_ctx,
        };
        let template = match ChatTemplate::from_tokenizer(&tokenizer) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("no chat completions: {e}");
                None
            }
        };
        let api_key_digest = match &settings.api_key_file {
            None => None,
            Some(p) => {
                let key = std::fs::read_to_string(p).with_context(|| format!("reading the API key {}", p.display()))?;
                let key = key.trim();
                if key.is_empty() {
                    bail!("the API key file {} is empty", p.display());
                }
                Some(Sha256::digest(key.as_bytes()).into())
            }
        };
        let metrics = Arc::new(Metrics::new(&model_name));
        let tokenizer = Arc::new(tokenizer);
        let (scheduler, thread) = scheduler::spawn(
            engine,
            tokenizer.clone(),
            SchedulerConfig {
                max_batch: settings.max_batch,
                max_queue: settings.max_queue,
                prefill_chunk: settings.prefill_chunk,
            },
            metrics.clone(),
        )
        .context("starting the scheduler thread")?;
        let listener = TcpListener::bind((settings.host.as_str(), settings.port))
            .with_context(|| format!("binding {}:{}", settings.host, settings.port))?;
        let port = listener.local_addr()?.port();
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let state = web::Data::new(AppState {
            model_name,
            tokenizer,
            template,
            scheduler,
            metrics,
            max_context,
            max_batch: settings.max_batch,
            max_body_bytes: settings.max_body_bytes,
            api_key_digest,
            draining: AtomicBool::new(false),
            in_flight: Arc::new(AtomicUsize::new(0)),
            created,
        });
        Ok(Self { listener, port, state, scheduler: thread, settings, shutdown: Arc::new(Notify::new()) })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn model_name(&self) -> &str {
        &self.state.model_name
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Serves until SIGTERM, SIGINT or [`ShutdownHandle::trigger`]; then drains: `/ready` turns
    /// 503, new `/v1` requests get 503, requests in flight get `grace_seconds` to finish, and the
    /// server stops. Returns `Ok` after a clean drain.
    pub async fn run_until_stopped(self) -> Result<()> {
        let Application { listener, port, state, scheduler, settings, shutdown } = self;
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .wrap(actix_web::middleware::from_fn(routes::request_id))
                .configure(routes::configure)
                .default_service(web::to(routes::not_found))
        })
        .workers(settings.http_workers)
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)
        .context("starting the HTTP server")?
        .run();
        let handle = server.handle();
        let mut server = tokio::spawn(server);
        tracing::info!(port, model = %state.model_name, "serving");
        tokio::select! {
            r = &mut server => {
                r.context("the HTTP server task")?.context("the HTTP server")?;
            }
            _ = shutdown_signal(shutdown) => {
                state.draining.store(true, Ordering::SeqCst);
                let grace = Duration::from_secs(settings.grace_seconds);
                tracing::info!(in_flight = state.in_flight.load(Ordering::SeqCst), ?grace, "draining");
                let deadline = Instant::now() + grace;
                while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let left = state.in_flight.load(Ordering::SeqCst);
                if left > 0 {
                    tracing::warn!(left, "grace period over; cutting requests still in flight");
                }
                handle.stop(true).await;
                server.await.context("the HTTP server task")?.context("the HTTP server")?;
            }
        }
        state.scheduler.shutdown();
        drop(state);
        tokio::task::spawn_blocking(move || scheduler.join())
            .await
            .context("joining the scheduler")?
            .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn shutdown_signal(manual: Arc<Notify>) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        _ = manual.notified() => tracing::info!("shutdown requested"),
    }
}

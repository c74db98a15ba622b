//! # janus-serve
//!
//! An OpenAI-compatible HTTP server for Janus models: image understanding through
//! `POST /v1/chat/completions` and text-to-image through `POST /v1/images/generations`, with
//! requests batched across clients, a small web page at `/`, `GET /health` and `GET /metrics`.
//! `janus serve` (in `janus-cli`) parses its flags and calls [`serve`].
//!
//! The HTTP side runs on tokio (axum); the model runs on a thread of its own that advances every
//! running request together, one token a step ([`scheduler`]), with the library's step-wise
//! decoder ([`janus_core::engine`]): batching never changes a result.

#![warn(missing_docs)]

pub mod api;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod scheduler;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use janus_core::pipeline::Janus;

use crate::api::Limits;
use crate::routes::{AppState, ModelInfo};
use crate::scheduler::Shared;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (loopback by default).
    pub host: String,
    /// Port to listen on (0: any free port).
    pub port: u16,
    /// Every request but the page and the health check must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Most sequences decoded together (an image counts once, an answer once).
    pub max_batch: usize,
    /// Most requests waiting for the batch; past it, 429.
    pub max_queue: usize,
    /// Resource limits of a request (most images, largest image, most generated images),
    /// named and defaulted as everywhere in janus-rs ([`janus_core::Limits`]).
    pub limits: janus_core::Limits,
    /// Largest request body, in MiB; past it, 413.
    pub max_body_mb: usize,
    /// Whether `http(s)` image URLs are fetched (else refused with 400).
    pub allow_remote_images: bool,
    /// The model's name in `/v1/models` and responses (the `--model` argument as given).
    pub model_id: String,
    /// Print nothing but errors.
    pub quiet: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_batch: 8,
            max_queue: 64,
            limits: janus_core::Limits::default(),
            max_body_mb: 20,
            allow_remote_images: false,
            model_id: "janus".into(),
            quiet: false,
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The options cannot work.
    #[error("{0}")]
    Options(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The model did not load.
    #[error("{0}")]
    Load(String),
    /// The async runtime or the server failed.
    #[error("server: {0}")]
    Runtime(String),
}

/// Serves until SIGINT or SIGTERM: binds the port first (so that `GET /health` answers 503
/// `loading` while the model loads), then runs `load` on the model's own thread. On a signal,
/// new connections are refused, queued and running requests end with 503, and this returns
/// `Ok`. A model that fails to load stops the server with [`ServeError::Load`].
pub fn serve<F>(options: ServeOptions, load: F) -> Result<(), ServeError>
where
    F: FnOnce() -> Result<Janus, String> + Send + 'static,
{
    if options.max_batch == 0 || options.max_queue == 0 {
        return Err(ServeError::Options(
            "--max-batch and --max-queue must be at least 1".into(),
        ));
    }
    options
        .limits
        .validate()
        .map_err(|e| ServeError::Options(e.to_string()))?;
    if options.max_body_mb == 0 || options.max_body_mb > 4096 {
        return Err(ServeError::Options(
            "--max-body-mb must be 1 to 4096".into(),
        ));
    }
    // The HTTP side is light: two threads leave the cores to the model.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ServeError::Runtime(e.to_string()))?;
    runtime.block_on(run(options, load))
}

async fn run<F>(options: ServeOptions, load: F) -> Result<(), ServeError>
where
    F: FnOnce() -> Result<Janus, String> + Send + 'static,
{
    let addr = format!("{}:{}", options.host, options.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Runtime(e.to_string()))?;
    if !options.quiet {
        eprintln!("janus serve: listening on http://{local} (loading the model)");
    }
    let shared = Arc::new(Shared {
        metrics: Default::default(),
        ready: AtomicBool::new(false),
        shutdown: AtomicBool::new(false),
        max_batch: options.max_batch,
        max_queue: options.max_queue,
    });
    let (queue, rx) = scheduler::queue(shared.clone());
    let info: Arc<OnceLock<ModelInfo>> = Arc::new(OnceLock::new());
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    let worker = {
        let (shared, info, quiet) = (shared.clone(), info.clone(), options.quiet);
        std::thread::Builder::new()
            .name("janus-model".into())
            .spawn(move || {
                let janus = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
                    Ok(Ok(janus)) => janus,
                    Ok(Err(e)) => {
                        let _ = failed_tx.send(e);
                        return;
                    }
                    Err(_) => {
                        let _ = failed_tx.send("loading the model failed (internal error)".into());
                        return;
                    }
                };
                let _ = info.set(ModelInfo {
                    image_size: janus.config().vq.image_size(),
                });
                shared.ready.store(true, Ordering::SeqCst);
                if !quiet {
                    eprintln!("janus serve: ready");
                }
                scheduler::run(&janus, &rx, &shared);
            })
            .map_err(|e| ServeError::Runtime(e.to_string()))?
    };
    let state = AppState {
        queue,
        model_id: options.model_id.as_str().into(),
        api_key: options.api_key.as_deref().map(Into::into),
        limits: Limits {
            max_images: options.limits.max_images,
            max_image_pixels: options.limits.max_image_pixels,
            allow_remote_images: options.allow_remote_images,
            max_image_bytes: options.max_body_mb << 20,
        },
        max_body_bytes: options.max_body_mb << 20,
        info,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let load_error = Arc::new(OnceLock::<String>::new());
    let stop = {
        let (shared, load_error) = (shared.clone(), load_error.clone());
        async move {
            tokio::select! {
                _ = signal() => {}
                failed = failed_rx => {
                    if let Ok(e) = failed {
                        let _ = load_error.set(e);
                    }
                }
            }
            shared.shutdown.store(true, Ordering::SeqCst);
        }
    };
    let served = axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(stop)
        .await;
    shared.shutdown.store(true, Ordering::SeqCst);
    // The model thread ends at its next step; a load in progress is left to the process exit.
    if shared.ready.load(Ordering::SeqCst) {
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    if let Some(e) = load_error.get() {
        return Err(ServeError::Load(e.clone()));
    }
    served.map_err(|e| ServeError::Runtime(e.to_string()))?;
    if !options.quiet {
        eprintln!("janus serve: stopped");
    }
    Ok(())
}

/// SIGINT or (on Unix) SIGTERM.
async fn signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate => {}
        }
    }
    #[cfg(not(unix))]
    interrupt.await;
}

//! The HTTP routes: OpenAI's endpoints, health, metrics and the web page.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as Sse_, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures_util::stream::{self, Stream, StreamExt};
use janus_core::engine::Finish;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::api::{self, Limits};
use crate::error::ApiError;
use crate::scheduler::{Event, Job, Queue, Work};

/// The page served at `/`.
const INDEX_HTML: &str = include_str!("../assets/index.html");

/// What the model tells the routes once it is loaded.
#[derive(Debug, Clone, Copy)]
pub struct ModelInfo {
    /// The side of the images it draws, in pixels.
    pub image_size: usize,
}

/// What every route can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The model thread's queue.
    pub queue: Queue,
    /// The model's name as `/v1/models` lists it (the `--model` argument).
    pub model_id: Arc<str>,
    /// Every request must carry this bearer token, when set.
    pub api_key: Option<Arc<str>>,
    /// Request-parsing limits.
    pub limits: Limits,
    /// Most bytes in a request body.
    pub max_body_bytes: usize,
    /// Set once the model is loaded.
    pub info: Arc<OnceLock<ModelInfo>>,
    /// When the server started (Unix seconds).
    pub started: u64,
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/images/generations", post(images))
        .route("/ui/images", post(ui_images))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks the API key (all routes but the page and the health check) and counts the request.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("other".to_string(), |p| p.as_str().to_string());
    let open = request.method() == Method::GET && matches!(endpoint.as_str(), "/" | "/health");
    let response = match &state.api_key {
        Some(key) if !open && !authorized(&request, key) => {
            ApiError::unauthorized().into_response()
        }
        _ => next.run(request).await,
    };
    state
        .queue
        .shared
        .metrics
        .request(&endpoint, response.status().as_u16());
    response
}

fn authorized(request: &Request, key: &str) -> bool {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()))
}

/// Compares without stopping at the first difference (the key's bytes are not leaked by timing).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> Response {
    ApiError::not_found(request.uri().path()).into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request(format!(
            "{} is not served on {}",
            request.method(),
            request.uri().path()
        ))
    }
    .into_response()
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn health(State(state): State<AppState>) -> Response {
    if state.info.get().is_some() {
        axum::Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.queue.shared.metrics.render(),
    )
        .into_response()
}

async fn models(State(state): State<AppState>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": &*state.model_id,
            "object": "model",
            "created": state.started,
            "owned_by": "janus-rs",
        }]
    }))
    .into_response()
}

/// The model's facts, or 503 while it loads.
fn loaded(state: &AppState) -> Result<ModelInfo, ApiError> {
    state
        .info
        .get()
        .copied()
        .ok_or_else(|| ApiError::unavailable("the model is still loading"))
}

/// The body, at most `limit` bytes (413 past it).
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.to_string().contains("length limit") {
                return ApiError::too_large(limit >> 20);
            }
            source = s.source();
        }
        ApiError::bad_request(format!("reading the body: {e}"))
    })
}

/// A fresh id with OpenAI's prefix.
fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{:x}{:08x}",
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Queues a job and waits until it has joined the batch: a request that fails before any
/// output (bad prompt, prompt past the context) still gets its proper status.
async fn start(
    state: &AppState,
    work: Work,
) -> Result<(UnboundedReceiver<Event>, usize), ApiError> {
    let (tx, mut rx) = unbounded_channel();
    state.queue.submit(Job { work, events: tx })?;
    match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => Ok((rx, prompt_tokens)),
        Some(Event::Failed(e)) => Err(e),
        _ => Err(ApiError::internal("the model thread stopped")),
    }
}

fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Length => "length",
        Finish::Done | Finish::StopString | Finish::NonFiniteLogits { .. } => "stop",
    }
}

async fn chat(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    loaded(&state)?;
    let bytes = read_body(body, state.max_body_bytes).await?;
    let limits = state.limits.clone();
    let request = tokio::task::spawn_blocking(move || api::chat_request(&bytes, &limits))
        .await
        .map_err(|_| ApiError::internal("reading the request failed"))??;
    let (stream, include_usage) = (request.stream, request.include_usage);
    let (mut rx, prompt_tokens) = start(&state, Work::Chat(request)).await?;
    let id = new_id("chatcmpl");
    let created = now();
    let model = state.model_id.to_string();
    if stream {
        let chunks = chat_chunks(rx, id, created, model, include_usage);
        return Ok(Sse::new(chunks)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    loop {
        match rx.recv().await {
            Some(Event::Answer {
                text,
                completion_tokens,
                finish,
                ..
            }) => {
                return Ok(axum::Json(json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish_reason(finish),
                    }],
                    "usage": usage(prompt_tokens, completion_tokens),
                }))
                .into_response());
            }
            Some(Event::Failed(e)) => return Err(e),
            Some(_) => {}
            None => return Err(ApiError::internal("the model thread stopped")),
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The answer as `chat.completion.chunk` events: the role, the text as it comes, the finish
/// reason, the usage when asked for, and `[DONE]`.
fn chat_chunks(
    rx: UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> impl Stream<Item = Result<Sse_, Infallible>> {
    let chunk = move |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let head = stream::iter([Ok(Sse_::default().data(first.to_string()))]);
    let body = stream::unfold(Some(rx), move |rx| {
        let chunk = chunk.clone();
        async move {
            let mut rx = rx?;
            let events: Vec<Value> = match rx.recv().await {
                Some(Event::Text(piece)) => {
                    return Some((vec![chunk(json!({"content": piece}), None)], Some(rx)));
                }
                Some(Event::Answer {
                    prompt_tokens,
                    completion_tokens,
                    finish,
                    ..
                }) => {
                    let mut out = vec![chunk(json!({}), Some(finish_reason(finish)))];
                    if include_usage {
                        let mut last = chunk(json!({}), None);
                        last["choices"] = json!([]);
                        last["usage"] = usage(prompt_tokens, completion_tokens);
                        out.push(last);
                    }
                    out
                }
                Some(Event::Failed(e)) => vec![e.body()],
                Some(_) => return Some((Vec::new(), Some(rx))),
                None => vec![ApiError::internal("the model thread stopped").body()],
            };
            Some((events, None))
        }
    })
    .flat_map(|values| {
        stream::iter(
            values
                .into_iter()
                .map(|v| Ok(Sse_::default().data(v.to_string()))),
        )
    });
    let done = stream::iter([Ok(Sse_::default().data("[DONE]"))]);
    head.chain(body).chain(done)
}

/// Waits for the images of a started job.
async fn images_of(rx: &mut UnboundedReceiver<Event>) -> Result<Vec<Vec<u8>>, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Images(pngs)) => return Ok(pngs),
            Some(Event::Failed(e)) => return Err(e),
            Some(_) => {}
            None => return Err(ApiError::internal("the model thread stopped")),
        }
    }
}

fn b64_data(pngs: &[Vec<u8>]) -> Value {
    let engine = base64::engine::general_purpose::STANDARD;
    Value::Array(
        pngs.iter()
            .map(|png| json!({"b64_json": engine.encode(png)}))
            .collect(),
    )
}

async fn images(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let info = loaded(&state)?;
    let bytes = read_body(body, state.max_body_bytes).await?;
    let request = api::image_request(&bytes, info.image_size)?;
    let (mut rx, _) = start(&state, Work::Images(request)).await?;
    let pngs = images_of(&mut rx).await?;
    Ok(axum::Json(json!({"created": now(), "data": b64_data(&pngs)})).into_response())
}

/// The web page's image endpoint: the request of `/v1/images/generations`, answered as
/// server-sent events: `progress` (`{"step", "total"}`) after every image-token step, then
/// `done` (`{"data": [{"b64_json"}], "seed"}`) or `error` (an error object).
async fn ui_images(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let info = loaded(&state)?;
    let bytes = read_body(body, state.max_body_bytes).await?;
    let request = api::image_request(&bytes, info.image_size)?;
    let seed = request.options.seed;
    let (rx, _) = start(&state, Work::Images(request)).await?;
    let events = stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        let (event, data, more) = loop {
            break match rx.recv().await {
                Some(Event::Progress { step, total }) => {
                    ("progress", json!({"step": step, "total": total}), true)
                }
                Some(Event::Images(pngs)) => (
                    "done",
                    json!({"data": b64_data(&pngs), "seed": seed}),
                    false,
                ),
                Some(Event::Failed(e)) => ("error", e.body(), false),
                // Nothing else comes for images.
                Some(_) => continue,
                None => (
                    "error",
                    ApiError::internal("the model thread stopped").body(),
                    false,
                ),
            };
        };
        let sse = Sse_::default().event(event).data(data.to_string());
        Some((Ok::<_, Infallible>(sse), more.then_some(rx)))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}

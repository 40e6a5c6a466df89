//! HTTP handlers and middleware: OpenAI's endpoints, health, readiness and metrics.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError};
use futures_util::{Stream, StreamExt, stream};
use lacuna_model::chat::ChatTemplate;
use lacuna_model::generate::FinishReason;
use lacuna_model::tokenizer::Tokenizer;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::Instrument;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{self, Prompt, Request, Usage};
use crate::scheduler::{Event, SchedulerHandle, Submission, TokenLogprob};

/// Default `max_tokens` of `/v1/completions` (OpenAI's); chat defaults to the rest of the context.
const DEFAULT_COMPLETION_TOKENS: usize = 16;

pub(crate) struct AppState {
    pub model_name: String,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub scheduler: SchedulerHandle,
    pub metrics: Arc<Metrics>,
    pub max_context: usize,
    pub max_batch: usize,
    pub max_body_bytes: usize,
    /// SHA-256 of the API key: comparing digests in constant time leaks neither bytes nor length.
    pub api_key_digest: Option<[u8; 32]>,
    pub draining: AtomicBool,
    pub in_flight: Arc<AtomicUsize>,
    pub created: u64,
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics))
        .service(
            web::scope("/v1")
                .wrap(actix_web::middleware::from_fn(gate))
                .route("/models", web::get().to(models))
                .service(
                    web::resource("/completions")
                        .route(web::post().to(completions))
                        .default_service(web::to(method_not_allowed)),
                )
                .service(
                    web::resource("/chat/completions")
                        .route(web::post().to(chat_completions))
                        .default_service(web::to(method_not_allowed)),
                )
                .default_service(web::to(not_found)),
        );
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Counts a generation request until it is dropped (for a stream: until the stream ends).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        InFlight(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Gives every request an id (the client's `x-request-id` when it is sane, else a fresh one), runs
/// it inside a span carrying that id, and echoes the id on the response.
pub(crate) async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(random_id);
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.path(),
        status = tracing::field::Empty,
    );
    req.extensions_mut().insert(RequestId(id.clone()));
    let t0 = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    span.record("status", res.status().as_u16());
    span.in_scope(|| tracing::info!(seconds = t0.elapsed().as_secs_f64(), "responded"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    Ok(res)
}

#[derive(Clone)]
struct RequestId(String);

fn request_id_of(req: &HttpRequest) -> String {
    req.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_else(random_id)
}

/// `/v1/*`: refused with 503 while draining, and with 401 without the API key when one is set.
async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let refusal = match req.app_data::<web::Data<AppState>>() {
        None => Some(ApiError::Internal("no application state".into())),
        Some(state) if state.draining.load(Ordering::SeqCst) => Some(ApiError::Draining),
        Some(state) => state.api_key_digest.as_ref().and_then(|digest| {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            match given {
                None => Some(ApiError::Unauthorized("missing API key: send `Authorization: Bearer KEY`".into())),
                Some(key) => {
                    let ok: bool = Sha256::digest(key.as_bytes()).as_slice().ct_eq(digest).into();
                    (!ok).then(|| ApiError::Unauthorized("invalid API key".into()))
                }
            }
        }),
    };
    match refusal {
        Some(e) => Ok(req.into_response(e.error_response())),
        None => Ok(next.call(req).await?.map_into_boxed_body()),
    }
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.load(Ordering::SeqCst) {
        HttpResponse::ServiceUnavailable().json(json!({"status": "draining"}))
    } else {
        HttpResponse::Ok().json(json!({"status": "ready", "model": state.model_name}))
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(state.metrics.render())
}

async fn models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "lacuna",
            "max_model_len": state.max_context,
        }],
    }))
}

pub(crate) async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())).error_response()
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    ApiError::MethodNotAllowed(format!("{} is not allowed on {}", req.method(), req.path())).error_response()
}

/// How much of an oversized body is read (and dropped) before answering 413: closing a socket with
/// unread data makes the kernel reset the connection, and the client may lose the answer.
const DRAIN_LIMIT: usize = 16 << 20;

async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(DRAIN_LIMIT)) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut too_large = declared.is_some_and(|n| n > limit);
    let mut body = Vec::with_capacity(if too_large { 0 } else { declared.unwrap_or(0) });
    let mut total = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        total += chunk.len();
        too_large |= total > limit;
        if too_large {
            if total > limit.saturating_add(DRAIN_LIMIT) {
                break;
            }
            continue;
        }
        body.extend_from_slice(&chunk);
    }
    if too_large {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Ok(body)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// The body read within its size limit, parsed as an OpenAI request for the served model.
async fn read_request(req: &HttpRequest, payload: web::Payload, state: &AppState) -> Result<Request, ApiError> {
    let body = read_body(req, payload, state.max_body_bytes).await?;
    let r: Request = openai::parse(&body)?;
    check_model(state, &r)?;
    Ok(r)
}

async fn completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let r = read_request(&req, payload, &state).await?;
    if r.messages.is_some() {
        return Err(ApiError::param("messages", "messages belongs to /v1/chat/completions; send prompt here"));
    }
    if r.echo == Some(true) {
        return Err(ApiError::param("echo", "echo is not supported"));
    }
    let prompt = match &r.prompt {
        None => return Err(ApiError::param("prompt", "missing field `prompt`")),
        Some(Prompt::Text(t)) => encode(&state.tokenizer, t, true)?,
        Some(Prompt::Texts(v)) if v.len() == 1 => encode(&state.tokenizer, &v[0], true)?,
        Some(Prompt::Texts(v)) => {
            return Err(ApiError::param("prompt", format!("one prompt per request, got {}", v.len())));
        }
        Some(Prompt::Tokens(ids)) => {
            let vocab = state.tokenizer.vocab_size();
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(ApiError::param("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
            }
            ids.clone()
        }
    };
    let logprobs = openai::completion_logprobs(&r.logprobs)?;
    generate(&req, &state, &r, prompt, logprobs, Kind::Completion).await
}

async fn chat_completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let r = read_request(&req, payload, &state).await?;
    if r.prompt.is_some() {
        return Err(ApiError::param("prompt", "prompt belongs to /v1/completions; send messages here"));
    }
    let messages = match &r.messages {
        None => return Err(ApiError::param("messages", "missing field `messages`")),
        Some(m) => openai::chat_messages(m)?,
    };
    let template = state
        .template
        .as_ref()
        .ok_or_else(|| ApiError::param("messages", "this model has no chat template; use /v1/completions"))?;
    let text = template.render(&messages, true).map_err(|e| ApiError::param("messages", e.to_string()))?;
    let prompt = encode(&state.tokenizer, &text, false)?;
    let logprobs = openai::chat_logprobs(&r.logprobs, r.top_logprobs)?;
    generate(&req, &state, &r, prompt, logprobs, Kind::Chat).await
}

fn check_model(state: &AppState, r: &Request) -> Result<(), ApiError> {
    if r.model != state.model_name {
        return Err(ApiError::ModelNotFound(r.model.clone()));
    }
    Ok(())
}

fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    let ids = tok.encode(text, special).map_err(|e| ApiError::param("prompt", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    Ok(ids)
}

/// What a response needs to know besides the events.
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
}

async fn generate(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    r: &Request,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
    kind: Kind,
) -> Result<HttpResponse, ApiError> {
    let g = r.validate(state.max_batch)?;
    let param = if kind == Kind::Chat { "messages" } else { "prompt" };
    let ctx = state.max_context;
    let default = match kind {
        Kind::Completion => DEFAULT_COMPLETION_TOKENS,
        Kind::Chat => ctx.saturating_sub(prompt.len()).max(1),
    };
    let max_tokens = g.max_tokens.unwrap_or(default);
    if prompt.len() + max_tokens > ctx {
        return Err(ApiError::ContextOverflow {
            param: param.to_owned(),
            message: format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the \
                 {param}, {max_tokens} for the completion). Please reduce the length of the {param} or max_tokens.",
                prompt.len() + max_tokens,
                prompt.len()
            ),
        });
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let guard = InFlight::new(&state.in_flight);
    let meta = Meta {
        kind,
        id: format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, random_id()),
        created: unix_now(),
        model: state.model_name.clone(),
        n: g.n,
        prompt_tokens: prompt.len(),
        include_usage: g.include_usage,
    };
    state.scheduler.submit(Submission {
        request_id: request_id_of(req),
        prompt,
        n: g.n,
        max_tokens,
        sampling: g.sampling,
        penalties: g.penalties,
        stop: g.stop,
        ignore_eos: g.ignore_eos,
        logprobs,
        arrived: Instant::now(),
        events: tx,
    })?;
    if g.stream {
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .streaming(sse(rx, meta, guard)));
    }
    let body = collect(rx, &meta).await?;
    drop(guard);
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
}

fn reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

async fn collect(mut rx: UnboundedReceiver<Event>, meta: &Meta) -> Result<Value, ApiError> {
    let mut choices: Vec<Choice> = (0..meta.n).map(|_| Choice::default()).collect();
    let mut done = 0;
    while done < meta.n {
        match rx.recv().await {
            None => return Err(ApiError::Internal("the scheduler dropped the request".into())),
            Some(Event::Failed(msg)) => return Err(ApiError::Internal(msg)),
            Some(Event::Token { index, text, logprob }) => {
                if let Some(c) = choices.get_mut(index) {
                    c.text.push_str(&text);
                    c.logprobs.extend(logprob);
                }
            }
            Some(Event::Finished { index, text, reason, completion_tokens }) => {
                if let Some(c) = choices.get_mut(index) {
                    c.text.push_str(&text);
                    c.finish = Some(reason);
                    c.completion_tokens = completion_tokens;
                    done += 1;
                }
            }
        }
    }
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let usage = Usage {
        prompt_tokens: meta.prompt_tokens,
        completion_tokens,
        total_tokens: meta.prompt_tokens + completion_tokens,
    };
    let wants_logprobs = choices.iter().any(|c| !c.logprobs.is_empty());
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let lp = wants_logprobs.then(|| logprobs_json(meta.kind, &c.logprobs, 0));
            let reason = c.finish.map(reason_str);
            match meta.kind {
                Kind::Completion => {
                    json!({"index": index, "text": c.text, "logprobs": lp, "finish_reason": reason})
                }
                Kind::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp,
                    "finish_reason": reason,
                }),
            }
        })
        .collect();
    Ok(json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage,
    }))
}

/// OpenAI's log-probability objects: the legacy completions shape (parallel arrays, text offsets
/// from `offset0`) or the chat shape (`content: [{token, logprob, bytes, top_logprobs}]`).
fn logprobs_json(kind: Kind, lps: &[TokenLogprob], offset0: usize) -> Value {
    match kind {
        Kind::Completion => {
            let mut offset = offset0;
            let mut offsets = Vec::with_capacity(lps.len());
            for t in lps {
                offsets.push(offset);
                offset += t.token.len();
            }
            json!({
                "tokens": lps.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|t| {
                    t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat => json!({
            "content": lps.iter().map(|t| json!({
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.token.as_bytes(),
                "top_logprobs": t.top.iter().map(|(s, l)| json!({
                    "token": s, "logprob": l, "bytes": s.as_bytes(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    }
}

struct SseState {
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    _guard: InFlight,
    queue: VecDeque<Bytes>,
    started: bool,
    finished: bool,
    done: usize,
    completion_tokens: usize,
    /// Per choice, the text length sent so far (completions' `text_offset`).
    offsets: Vec<usize>,
}

impl SseState {
    fn chunk(&self, index: usize, text: Option<&str>, role: bool, lp: Option<Value>, reason: Option<&str>) -> Bytes {
        let choice = match self.meta.kind {
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": reason})
            }
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason})
            }
        };
        self.data(json!({
            "id": self.meta.id,
            "object": if self.meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [choice],
        }))
    }

    fn data(&self, v: Value) -> Bytes {
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn end(&mut self) {
        self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.finished = true;
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            None => {
                let e = ApiError::Internal("the scheduler dropped the request".into());
                self.queue.push_back(Bytes::from(format!("data: {}\n\n", e.body_json())));
                self.end();
            }
            Some(Event::Failed(msg)) => {
                self.queue.push_back(Bytes::from(format!("data: {}\n\n", ApiError::Internal(msg).body_json())));
                self.end();
            }
            Some(Event::Token { index, text, logprob }) => {
                if text.is_empty() && logprob.is_none() {
                    return;
                }
                let offset = self.offsets.get(index).copied().unwrap_or(0);
                let lp = logprob.map(|l| logprobs_json(self.meta.kind, std::slice::from_ref(&l), offset));
                if let Some(o) = self.offsets.get_mut(index) {
                    *o += text.len();
                }
                let c = self.chunk(index, Some(&text), false, lp, None);
                self.queue.push_back(c);
            }
            Some(Event::Finished { index, text, reason, completion_tokens }) => {
                let t = (!text.is_empty() || self.meta.kind == Kind::Completion).then_some(text.as_str());
                let c = self.chunk(index, t, false, None, Some(reason_str(reason)));
                self.queue.push_back(c);
                self.done += 1;
                self.completion_tokens += completion_tokens;
                if self.done == self.meta.n {
                    if self.meta.include_usage {
                        let p = self.meta.prompt_tokens;
                        let usage = Usage {
                            prompt_tokens: p,
                            completion_tokens: self.completion_tokens,
                            total_tokens: p + self.completion_tokens,
                        };
                        let v = json!({
                            "id": self.meta.id,
                            "object": if self.meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                            "created": self.meta.created,
                            "model": self.meta.model,
                            "choices": [],
                            "usage": usage,
                        });
                        let d = self.data(v);
                        self.queue.push_back(d);
                    }
                    self.end();
                }
            }
        }
    }
}

/// Server-sent events: one `data:` line per chunk, `data: [DONE]` last. Dropping the stream (the
/// client went away) drops the receiver, which the scheduler notices before its next step.
fn sse(
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    guard: InFlight,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> + 'static {
    let n = meta.n;
    let st = SseState {
        rx,
        meta,
        _guard: guard,
        queue: VecDeque::new(),
        started: false,
        finished: false,
        done: 0,
        completion_tokens: 0,
        offsets: vec![0; n],
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                return Some((Ok::<Bytes, actix_web::Error>(b), st));
            }
            if st.finished {
                return None;
            }
            if !st.started {
                st.started = true;
                if st.meta.kind == Kind::Chat {
                    for i in 0..st.meta.n {
                        let c = st.chunk(i, Some(""), true, None, None);
                        st.queue.push_back(c);
                    }
                }
                continue;
            }
            let ev = st.rx.recv().await;
            st.on_event(ev);
        }
    })
}

//! The inference service end to end: servers on random ports running SmolLM2, driven over HTTP by
//! reqwest and by the official `openai` Python client; `/metrics` checked by the Prometheus
//! client's own parser.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lacuna_model::chat::{ChatMessage, ChatTemplate};
use lacuna_model::generate::{GenerateParams, generate};
use lacuna_services::{Application, Settings, ShutdownHandle};
use serde_json::{Value, json};

struct Server {
    base: String,
    model: String,
    shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

fn settings() -> Settings {
    Settings {
        model: Some(lacuna_tests::smollm2_gguf()),
        host: "127.0.0.1".into(),
        port: 0,
        max_context: Some(512),
        max_body_bytes: 64 << 10,
        http_workers: 1,
        ..Settings::default()
    }
}

/// Builds and runs a server on its own thread and runtime.
fn start(s: Settings) -> Server {
    let app = Application::build(s).unwrap_or_else(|e| panic!("building the server: {e:#}"));
    let base = format!("http://127.0.0.1:{}", app.port());
    let model = app.model_name().to_owned();
    let shutdown = app.shutdown_handle();
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(app.run_until_stopped())
    });
    Server { base, model, shutdown, thread: Some(thread) }
}

/// One server shared by the tests that only read from it (not stopped: the process ends it).
fn shared() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start(settings()))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client().post(format!("{base}{path}")).json(&body).send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

/// The `data:` payloads of a server-sent event stream, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {e:?}")).to_owned())
        .collect()
}

/// A metric's value for `model_name` (and extra label text) in the exposition text.
fn metric(text: &str, name: &str) -> f64 {
    let line =
        text.lines().find(|l| l.starts_with(&format!("{name}{{"))).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad sample {line}"))
}

async fn metrics(base: &str) -> String {
    client().get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text")
}

/// Polls `/metrics` until `pred` holds (or panics after `timeout`).
async fn wait_metrics(base: &str, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let m = metrics(base).await;
        if pred(&m) {
            return m;
        }
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}; metrics:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn greedy(prompt: &[u32], max_new_tokens: usize) -> lacuna_model::generate::Generation {
    let ck = lacuna_tests::smollm2();
    // The reference with the server's KV cache type (f16 by default), rounded the same way.
    let params = GenerateParams { max_new_tokens, kv_cache: settings().kv_cache, ..Default::default() };
    generate(&ck.model, &ck.tokenizer, prompt, &params, |_| {}).expect("generate")
}

#[tokio::test]
async fn health_ready_models_and_metrics() {
    let s = shared();
    let c = client();
    let r = c.get(format!("{}/health", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(format!("{}/ready", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let models: Value = c.get(format!("{}/v1/models", s.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], s.model.as_str());
    assert_eq!(models["data"][0]["max_model_len"], 512);
    assert_eq!(s.model, lacuna_tests::smollm2_gguf().file_stem().unwrap().to_string_lossy());
    let r = c.get(format!("{}/metrics", s.base)).send().await.unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for name in [
        "lacuna:num_requests_running",
        "lacuna:num_requests_waiting",
        "lacuna:time_to_first_token_seconds_bucket",
        "lacuna:inter_token_latency_seconds_bucket",
        "lacuna:e2e_request_latency_seconds_count",
        "lacuna:prompt_tokens_total",
        "lacuna:generation_tokens_total",
        "lacuna:request_success_total",
    ] {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        assert!(line.contains(&format!("model_name=\"{}\"", s.model)), "{line}");
    }
}

#[tokio::test]
async fn greedy_completion_equals_generate_and_echoes_the_request_id() {
    let s = shared();
    let prompt = "The capital of France is";
    let r = client()
        .post(format!("{}/v1/completions", s.base))
        .header("x-request-id", "test-greedy-1")
        .json(&json!({"model": s.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "test-greedy-1");
    let v: Value = r.json().await.unwrap();
    let ck = lacuna_tests::smollm2();
    let ids = ck.tokenizer.encode(prompt, true).unwrap();
    let want = greedy(&ids, 8);
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], s.model.as_str());
    assert_eq!(v["choices"][0]["text"], want.text.as_str(), "{v}");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["finish_reason"], serde_json::to_value(want.finish_reason).unwrap());
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], want.ids.len());
    assert_eq!(v["usage"]["total_tokens"], ids.len() + want.ids.len());
}

fn chat_prompt(messages: &[ChatMessage]) -> Vec<u32> {
    let ck = lacuna_tests::smollm2();
    let t = ChatTemplate::from_tokenizer(&ck.tokenizer).unwrap();
    ck.tokenizer.encode(&t.render(messages, true).unwrap(), false).unwrap()
}

#[tokio::test]
async fn chat_completion_uses_the_chat_template() {
    let s = shared();
    let body = json!({
        "model": s.model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 10,
        "temperature": 0,
    });
    let (status, v) = post(&s.base, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let ids = chat_prompt(&[ChatMessage::new("user", "What is the capital of France?")]);
    let want = greedy(&ids, 10);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.text.as_str(), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
}

#[tokio::test]
async fn streaming_chunks_are_shaped_like_openai_and_end_with_done() {
    let s = shared();
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]);
    let body = json!({"model": s.model, "messages": messages, "max_tokens": 12, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}});
    let r = client().post(format!("{}/v1/chat/completions", s.base)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "{:?}", chunks[0]);
    let id = chunks[0]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("chatcmpl-"));
    let mut text = String::new();
    let mut reasons = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id.as_str(), "one id for the whole stream");
        if let Some(choice) = c["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(r) = choice["finish_reason"].as_str() {
                reasons.push(r.to_owned());
            }
        }
    }
    let ids = chat_prompt(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Name a color.")]);
    let want = greedy(&ids, 12);
    assert_eq!(reasons, vec![serde_json::to_value(want.finish_reason).unwrap()]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], want.ids.len(), "{usage}");
    assert_eq!(usage["prompt_tokens"], ids.len(), "{usage}");
    assert_eq!(text, want.text);

    // The completions stream: text_completion chunks whose texts join to the plain response's.
    let body = json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0});
    let (_, plain) = post(&s.base, "/v1/completions", body.clone()).await;
    let mut body = body;
    body["stream"] = json!(true);
    let r = client().post(format!("{}/v1/completions", s.base)).json(&body).send().await.unwrap();
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        text.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them() {
    let s = shared();
    let body =
        json!({"model": s.model, "prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let (_, full) = post(&s.base, "/v1/completions", body.clone()).await;
    let full = full["choices"][0]["text"].as_str().unwrap().to_owned();
    // Stop at the second character-run of the text that is not at its start.
    let stop: String = full.chars().skip(3).take(2).collect();
    assert!(!stop.trim().is_empty(), "the model's continuation is too short to test: {full:?}");
    let cut = full.find(&stop).unwrap();
    let mut body = body;
    body["stop"] = json!(["never-appears", stop]);
    let (status, v) = post(&s.base, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], &full[..cut], "stop {stop:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn n_choices_are_seeded_and_reproducible() {
    let s = shared();
    let body = json!({"model": s.model, "prompt": "My favourite animal is", "max_tokens": 8, "n": 2,
                      "temperature": 1.0, "top_p": 0.95, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.5, "ignore_eos": true});
    let (status, a) = post(&s.base, "/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{a}");
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!((choices[0]["index"].as_u64(), choices[1]["index"].as_u64()), (Some(0), Some(1)));
    assert_eq!(a["usage"]["completion_tokens"], 16, "{a}");
    assert_ne!(choices[0]["text"], choices[1]["text"], "two choices with different seeds came out equal");
    let (_, b) = post(&s.base, "/v1/completions", body).await;
    assert_eq!(a["choices"], b["choices"], "the same seed reproduces the same choices");
}

#[tokio::test]
async fn logprobs_are_reported_for_each_token() {
    let s = shared();
    let body = json!({"model": s.model, "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "logprobs": 3});
    let (status, v) = post(&s.base, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{lp}");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert!(
            chosen <= 0.0 && (chosen - best).abs() < 1e-5,
            "greedy picks the most likely token: {chosen} vs {best}"
        );
    }
    let body = json!({"model": s.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                      "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, v) = post(&s.base, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        assert!(t["bytes"].is_array());
    }
}

fn assert_error(status: u16, v: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[tokio::test]
async fn client_mistakes_get_openai_shaped_errors() {
    let s = shared();
    let c = client();
    let url = format!("{}/v1/completions", s.base);
    // Malformed JSON.
    let r = c.post(&url).header("content-type", "application/json").body("{\"model\": ").send().await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 400, None);
    // A parameter out of range, and one of the wrong type: both named.
    let (st, v) = post(&s.base, "/v1/completions", json!({"model": s.model, "prompt": "x", "temperature": 5})).await;
    assert_error(st, &v, 400, Some("temperature"));
    let (st, v) =
        post(&s.base, "/v1/completions", json!({"model": s.model, "prompt": "x", "max_tokens": "many"})).await;
    assert_error(st, &v, 400, Some("max_tokens"));
    let (st, v) = post(&s.base, "/v1/chat/completions", json!({"model": s.model, "messages": "hi"})).await;
    assert_error(st, &v, 400, Some("messages"));
    // Context overflow, refused before any work.
    let before = metric(&metrics(&s.base).await, "lacuna:prompt_tokens_total");
    let (st, v) = post(&s.base, "/v1/completions", json!({"model": s.model, "prompt": "x", "max_tokens": 600})).await;
    assert_error(st, &v, 400, Some("prompt"));
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let long = "word ".repeat(600);
    let (st, v) = post(
        &s.base,
        "/v1/chat/completions",
        json!({"model": s.model, "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_error(st, &v, 400, Some("messages"));
    let after = metric(&metrics(&s.base).await, "lacuna:prompt_tokens_total");
    assert!(after - before < 600.0, "an overflowing prompt was prefilled ({before} -> {after})");
    // Unknown model and unknown routes.
    let (st, v) = post(&s.base, "/v1/completions", json!({"model": "gpt-9", "prompt": "x"})).await;
    assert_error(st, &v, 404, Some("model"));
    let (st, v) = post(&s.base, "/v1/nothing", json!({})).await;
    assert_error(st, &v, 404, None);
    let r = c.get(format!("{}/nothing", s.base)).send().await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 404, None);
    // A body over the limit (64 KiB here).
    let big = json!({"model": s.model, "prompt": "a".repeat(100 << 10)});
    let (st, v) = post(&s.base, "/v1/completions", big).await;
    assert_error(st, &v, 413, None);
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sekrit-key\n").unwrap();
    let mut server = start(Settings { api_key_file: Some(key_file), ..settings() });
    let c = client();
    let url = format!("{}/v1/completions", server.base);
    let body = json!({"model": server.model, "prompt": "Hi", "max_tokens": 1});
    let r = c.post(&url).json(&body).send().await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 401, None);
    let r = c.post(&url).bearer_auth("sekrit-kez").json(&body).send().await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 401, None);
    let r = c.post(&url).bearer_auth("sekrit-key").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Probes stay open.
    assert_eq!(c.get(format!("{}/health", server.base)).send().await.unwrap().status(), 200);
    stop(&mut server);
}

fn stop(server: &mut Server) {
    server.shutdown.trigger();
    if let Some(t) = server.thread.take() {
        t.join().expect("server thread").expect("run_until_stopped");
    }
}

/// A streaming request that reads `chunks` events and keeps the response open.
async fn open_stream(base: &str, model: &str, max_tokens: usize) -> reqwest::Response {
    let body = json!({"model": model, "prompt": "Tell me a long story about a dragon.", "max_tokens": max_tokens,
                      "temperature": 0, "stream": true, "ignore_eos": true});
    let r = client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r
}

#[tokio::test]
async fn full_queue_gets_429_and_a_disconnect_frees_its_sequence() {
    let mut server = start(Settings { max_batch: 1, max_queue: 1, ..settings() });
    let base = server.base.clone();
    let model = server.model.clone();
    // A occupies the only batch slot.
    let mut a = open_stream(&base, &model, 400).await.bytes_stream();
    let first = a.next().await.expect("a first chunk").unwrap();
    assert!(first.starts_with(b"data: "));
    wait_metrics(&base, Duration::from_secs(30), "A running", |m| metric(m, "lacuna:num_requests_running") == 1.0)
        .await;
    // B waits in the queue.
    let b = tokio::spawn({
        let (base, model) = (base.clone(), model.clone());
        async move { post(&base, "/v1/completions", json!({"model": model, "prompt": "Hi", "max_tokens": 2})).await }
    });
    wait_metrics(&base, Duration::from_secs(30), "B waiting", |m| metric(m, "lacuna:num_requests_waiting") == 1.0)
        .await;
    // C finds the queue full.
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": model, "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some(), "429 without Retry-After");
    assert_error(429, &r.json().await.unwrap(), 429, None);
    // A's client goes away: its sequence is released at once, so B runs and finishes.
    let generated_before_drop = metric(&metrics(&base).await, "lacuna:generation_tokens_total");
    drop(a);
    let (st, v) = tokio::time::timeout(Duration::from_secs(60), b).await.expect("B never ran").unwrap();
    assert_eq!(st, 200, "{v}");
    let m = wait_metrics(&base, Duration::from_secs(10), "nothing running", |m| {
        metric(m, "lacuna:num_requests_running") == 0.0
    })
    .await;
    let generated = metric(&m, "lacuna:generation_tokens_total");
    assert!(generated < 400.0, "A ran to its end ({generated} tokens) instead of stopping at the disconnect");
    assert!(generated_before_drop >= 1.0);
    stop(&mut server);
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_stops() {
    let mut server = start(Settings { grace_seconds: 60, ..settings() });
    let (base, model) = (server.base.clone(), server.model.clone());
    let mut stream = open_stream(&base, &model, 24).await.bytes_stream();
    let mut body = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    server.shutdown.trigger();
    let c = client();
    // Draining: not ready, new work refused, probes answered.
    let t0 = Instant::now();
    loop {
        let r = c.get(format!("{base}/ready")).send().await.unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "/ready never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (st, v) = post(&base, "/v1/completions", json!({"model": model, "prompt": "Hi", "max_tokens": 1})).await;
    assert_error(st, &v, 503, None);
    // The in-flight stream runs to its end.
    while let Some(chunk) = stream.next().await {
        body.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    // And the server stops cleanly.
    let thread = server.thread.take().unwrap();
    let t0 = Instant::now();
    while !thread.is_finished() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the server did not stop after draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    thread.join().unwrap().expect("run_until_stopped returns Ok after draining");
    assert!(c.get(format!("{base}/health")).send().await.is_err(), "still accepting connections");
}

/// The Python interpreter that has `openai` and `prometheus_client` (see scripts/test-deps.sh).
fn python() -> PathBuf {
    PathBuf::from(std::env::var_os("LACUNA_PYTHON").unwrap_or_else(|| "python3".into()))
}

#[test]
fn official_openai_client_and_prometheus_parser() {
    let s = shared();
    let script = lacuna_tests::fixtures_dir().join("serve_openai_client.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .args(["--base-url", &format!("{}/v1", s.base), "--model", &s.model])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python().display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}); install its packages with scripts/test-deps.sh\nstdout:\n{stdout}\nstderr:\n{stderr}",
        script.display(),
        out.status
    );
    for line in ["completion ok", "chat ok", "stream ok", "metrics ok"] {
        assert!(stdout.lines().any(|l| l.starts_with(line)), "no {line:?} in\n{stdout}\n{stderr}");
    }
}

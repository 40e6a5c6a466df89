//! A fake API server for reconcile tests (the controller-rs pattern): the reconciler's client talks
//! to a tower-test mock, and a [`Scenario`] answers each request after asserting its method, path,
//! content type and body. A request the scenario does not expect fails the test (the reconciler
//! then waits for an answer that never comes, and the timeout fires).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use crate::context::{Context, OperatorConfig};
use crate::lineage::InMemoryLineage;
use crate::metrics::Metrics;

pub const APPLY: &str = "application/apply-patch+yaml";
pub const JSON_PATCH: &str = "application/json-patch+json";
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The fixed time of the test clock.
pub fn test_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_790_000_000).expect("a valid timestamp"))
}

/// How a request's body is checked.
pub enum Check {
    /// No body is expected (GET, DELETE, LIST).
    Empty,
    /// The body equals this JSON exactly.
    Equals(Value),
    /// Any assertions on the body.
    With(Box<dyn FnOnce(&Value) + Send>),
}

/// One request the reconciler must send, and the fake API server's answer.
pub struct Exchange {
    pub method: Method,
    /// Path and query, exactly as the client sends them.
    pub path: String,
    pub content_type: Option<&'static str>,
    pub check: Check,
    pub status: StatusCode,
    /// The answer; `Null` echoes the request body (what an apply of a new object returns).
    pub response: Value,
}

impl Exchange {
    pub fn get(path: impl Into<String>, response: Value) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            content_type: None,
            check: Check::Empty,
            status: StatusCode::OK,
            response,
        }
    }
    pub fn not_found(method: Method, path: impl Into<String>) -> Self {
        let response = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "not found", "reason": "NotFound", "code": 404});
        Self {
            method,
            path: path.into(),
            content_type: None,
            check: Check::Empty,
            status: StatusCode::NOT_FOUND,
            response,
        }
    }
    /// A server-side apply (PATCH, `application/apply-patch+yaml`) by the operator's field manager.
    pub fn apply(path: impl Into<String>, check: Check, response: Value) -> Self {
        Self {
            method: Method::PATCH,
            path: path.into(),
            content_type: Some(APPLY),
            check,
            status: StatusCode::OK,
            response,
        }
    }
    pub fn json_patch(path: impl Into<String>, expected: Value, response: Value) -> Self {
        Self {
            method: Method::PATCH,
            path: path.into(),
            content_type: Some(JSON_PATCH),
            check: Check::Equals(expected),
            status: StatusCode::OK,
            response,
        }
    }
}

/// What the fake API server expects in one test.
pub enum Scenario {
    /// A resource without our finalizer: one JSON patch adding it, nothing else.
    FinalizerCreation { path: String, object: Value },
    /// A deleted resource with our finalizer: cleanup, then one JSON patch removing the finalizer.
    FinalizerRemoval { path: String, object: Value },
    /// These exchanges, in this order, and nothing else.
    Exchanges(Vec<Exchange>),
}

impl Scenario {
    fn exchanges(self) -> Vec<Exchange> {
        match self {
            Scenario::FinalizerCreation { path, mut object } => {
                let expected = json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": [crate::FINALIZER]}
                ]);
                object["metadata"]["finalizers"] = json!([crate::FINALIZER]);
                vec![Exchange::json_patch(format!("{path}?"), expected, object)]
            }
            Scenario::FinalizerRemoval { path, mut object } => {
                let expected = json!([
                    {"op": "test", "path": "/metadata/finalizers/0", "value": crate::FINALIZER},
                    {"op": "remove", "path": "/metadata/finalizers/0"}
                ]);
                object["metadata"]["finalizers"] = json!([]);
                vec![Exchange::json_patch(format!("{path}?"), expected, object)]
            }
            Scenario::Exchanges(e) => e,
        }
    }
}

pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    /// Answers the scenario's requests in order; panics (in the returned task) on any mismatch.
    pub fn run(self, scenario: Scenario) -> tokio::task::JoinHandle<()> {
        let mut handle = self.0;
        tokio::spawn(async move {
            for (i, ex) in scenario.exchanges().into_iter().enumerate() {
                let (request, send) = handle.next_request().await.unwrap_or_else(|| panic!("request {i} never came"));
                let what = format!("request {i} ({} {})", request.method(), request.uri());
                assert_eq!(request.method(), ex.method, "{what}: method");
                assert_eq!(request.uri().to_string(), ex.path, "{what}: path");
                let ct =
                    request.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                if let Some(expected) = ex.content_type {
                    assert_eq!(ct.as_deref(), Some(expected), "{what}: content type");
                }
                let bytes = request.into_body().collect_bytes().await.expect("request body");
                let echo =
                    if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
                match ex.check {
                    Check::Empty => assert!(bytes.is_empty(), "{what}: unexpected body {bytes:?}"),
                    Check::Equals(expected) => {
                        let body: Value = serde_json::from_slice(&bytes).expect("JSON body");
                        assert_eq!(body, expected, "{what}: body");
                    }
                    Check::With(f) => {
                        let body: Value = serde_json::from_slice(&bytes).expect("JSON body");
                        f(&body);
                    }
                }
                let response = Response::builder()
                    .status(ex.status)
                    .body(Body::from(
                        serde_json::to_vec(if ex.response.is_null() { &echo } else { &ex.response })
                            .expect("response JSON"),
                    ))
                    .expect("response");
                send.send_response(response);
            }
        })
    }
}

/// A context whose client talks to the returned verifier, with a fixed clock and in-memory lineage.
pub fn test_context() -> (Arc<Context>, ApiServerVerifier, Arc<InMemoryLineage>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let lineage = Arc::new(InMemoryLineage::default());
    let ctx = Context {
        client: Client::new(service, "default"),
        config: OperatorConfig { image: "lacuna:test".into(), ..OperatorConfig::default() },
        lineage: lineage.clone(),
        metrics: Arc::new(Metrics::default()),
        clock: Arc::new(test_time),
    };
    (Arc::new(ctx), ApiServerVerifier(handle), lineage)
}

/// Runs `reconcile` against `scenario`, both under [`TIMEOUT`].
pub async fn run_scenario<F, T>(verifier: ApiServerVerifier, scenario: Scenario, reconcile: F) -> T
where
    F: std::future::Future<Output = T>,
{
    let server = verifier.run(scenario);
    let out = tokio::time::timeout(TIMEOUT, reconcile).await.expect("reconcile timed out: a request was not expected");
    tokio::time::timeout(TIMEOUT, server).await.expect("scenario timed out: a request never came").expect("scenario");
    out
}

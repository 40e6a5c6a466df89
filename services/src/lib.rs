//! The OpenAI-compatible inference service behind `lacuna serve`.
//!
//! Data flow: [`Settings`] (defaults < config file < `LACUNA_` environment < flags) →
//! [`Application::build`] loads the model and binds the listener → [`Application::run_until_stopped`]
//! serves HTTP on actix-web. Handlers ([`routes`]) validate and tokenize a request, then hand it to
//! the [`scheduler`], one OS thread that owns the [`Engine`] and runs continuous batching: between
//! decode steps it admits waiting sequences, prefills them in chunks, decodes one token for every
//! running sequence and streams text back through a channel per request. [`metrics`] counts what
//! happens in vLLM's names (with a `lacuna:` prefix); [`telemetry`] sets up tracing and OTLP export.

pub mod engine;
mod error;
pub mod metrics;
mod openai;
mod routes;
pub mod scheduler;
pub mod settings;
mod startup;
pub mod telemetry;

pub use engine::{Engine, LlamaEngine};
pub use error::ApiError;
pub use settings::{Backend, Settings, SettingsError};
pub use startup::{Application, ShutdownHandle};

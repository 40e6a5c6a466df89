//! Logs and traces: a `fmt` layer on stderr, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an
//! OpenTelemetry layer exporting spans over OTLP/HTTP (protobuf) in batches. The exporter reads
//! the standard `OTEL_*` variables (endpoint, headers, timeout); `OTEL_SERVICE_NAME` names the
//! service (default `lacuna-serve`).

use std::io::IsTerminal;

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and stops the span exporter when dropped (at the end of `lacuna serve`).
pub struct TelemetryGuard(Option<SdkTracerProvider>);

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing traces: {e}");
        }
    }
}

/// Installs the global subscriber; `default_filter` applies when `RUST_LOG` is unset.
pub fn init(default_filter: &str) -> Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|v| !v.trim().is_empty());
    let Some(endpoint) = endpoint else {
        registry.try_init().context("installing the log subscriber")?;
        return Ok(TelemetryGuard(None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .with_context(|| format!("building the OTLP exporter for {endpoint}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "lacuna-serve".to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer("lacuna-services");
    registry
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()
        .context("installing the log and trace subscriber")?;
    tracing::info!(%endpoint, "exporting traces over OTLP/HTTP");
    Ok(TelemetryGuard(Some(provider)))
}

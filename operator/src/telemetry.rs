//! Logging, and OpenTelemetry traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (in builds with the
//! `otel` feature, as the container image is).

use anyhow::Context as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

/// Flushes buffered spans when dropped.
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn otlp_endpoint() -> Option<String> {
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.is_empty())
}

/// Installs the global subscriber.
pub fn init() -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let fmt = tracing_subscriber::fmt::layer();
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TracerProvider as _;
        let provider = match otlp_endpoint() {
            Some(_) => {
                // The exporter reads the endpoint (and OTEL_EXPORTER_OTLP_HEADERS) from the environment.
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .build()
                    .context("building the OTLP span exporter")?;
                let resource = opentelemetry_sdk::Resource::builder().with_service_name("lacuna-operator").build();
                Some(
                    opentelemetry_sdk::trace::SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                )
            }
            None => None,
        };
        let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("lacuna-operator")));
        Registry::default()
            .with(filter)
            .with(fmt)
            .with(otel)
            .try_init()
            .context("installing the tracing subscriber")?;
        Ok(TelemetryGuard { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        Registry::default().with(filter).with(fmt).try_init().context("installing the tracing subscriber")?;
        if let Some(endpoint) = otlp_endpoint() {
            tracing::warn!(%endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT is set but this build has no `otel` feature");
        }
        Ok(TelemetryGuard {})
    }
}

//! Prometheus metrics: reconciliations and failures per kind, and reconcile duration.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: &'static str,
    /// One fixed string per error variant ([`Error::metric_label`]).
    pub error: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

#[derive(Debug)]
pub struct Metrics {
    pub reconciliations: Family<KindLabel, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<KindLabel, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciliations: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl Metrics {
    /// Registers the metrics under the `lacuna_operator` prefix.
    pub fn register(self, registry: &mut Registry) -> Self {
        let sub = registry.sub_registry_with_prefix("lacuna_operator");
        sub.register("reconciliations", "Reconciliations started", self.reconciliations.clone());
        sub.register("reconcile_failures", "Reconciliations that returned an error", self.failures.clone());
        sub.register("reconcile_duration_seconds", "Duration of a reconciliation", self.duration.clone());
        self
    }

    /// Counts a reconciliation and times it until the returned guard drops.
    pub fn reconcile(&self, kind: &'static str) -> ReconcileTimer<'_> {
        self.reconciliations.get_or_create(&KindLabel { kind }).inc();
        ReconcileTimer { metrics: self, kind, start: Instant::now() }
    }

    pub fn failure(&self, kind: &'static str, error: &Error) {
        self.failures.get_or_create(&FailureLabels { kind, error: error.metric_label() }).inc();
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.get_or_create(&KindLabel { kind: self.kind }).observe(self.start.elapsed().as_secs_f64());
    }
}

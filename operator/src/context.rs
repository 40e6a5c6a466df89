//! What every reconcile shares: the client, the operator's settings, lineage, metrics and a clock.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;

use crate::lineage::LineageRecorder;
use crate::metrics::Metrics;

/// The field manager of every server-side apply the operator sends.
pub const FIELD_MANAGER: &str = "lacuna-operator";
/// The finalizer the operator puts on its resources.
pub const FINALIZER: &str = "lacuna.dev/cleanup";

/// Settings of one operator deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorConfig {
    /// Image with the `lacuna` binary, for pods whose resource names none.
    pub image: String,
    /// User and group the pods run as.
    pub run_as_user: i64,
    /// Seconds between checks of a `fromJob` input that has not succeeded yet.
    pub input_poll_seconds: u64,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self { image: "ghcr.io/lacuna-ml/lacuna:latest".into(), run_as_user: 65532, input_poll_seconds: 15 }
    }
}

pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| Time(k8s_openapi::jiff::Timestamp::now()))
}

#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub lineage: Arc<dyn LineageRecorder>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
}

impl Context {
    pub fn now(&self) -> Time {
        (self.clock)()
    }
}

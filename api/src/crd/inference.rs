//! `SparseInferenceService`: `lacuna serve` behind a Deployment, a Service and an autoscaler.

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{ModelInput, Phase, ResolvedInput};
use crate::RecipeError;

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Lacuna's sparse CPU kernels.
    #[default]
    Cpu,
    /// NVIDIA GPUs (`lacuna serve --backend gpu`, the CUDA backend of `lacuna-gpu`): each replica
    /// requests `spec.gpus` of `nvidia.com/gpu` (default 1).
    Gpu,
}

/// What the autoscaler tracks: average CPU utilisation, or waiting requests per pod.
/// Exactly one is given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend(
    "minProperties" = 1,
    "maxProperties" = 1,
    "x-kubernetes-validations" = [{"rule": "has(self.cpuUtilization) != has(self.waitingRequests)", "message": "give exactly one of cpuUtilization or waitingRequests"}]
))]
pub struct AutoscalingTarget {
    /// Target average CPU utilisation, percent of the CPU request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub cpu_utilization: Option<i32>,
    /// Target average of the per-pod metric `lacuna:num_requests_waiting` (needs a custom-metrics
    /// adapter such as prometheus-adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub waiting_requests: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend(
    "x-kubernetes-validations" = [{"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not exceed maxReplicas"}]
))]
pub struct Autoscaling {
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    pub target: AutoscalingTarget,
}

/// The metric name `lacuna serve` exports per pod for queued requests.
pub const WAITING_REQUESTS_METRIC: &str = "lacuna:num_requests_waiting";

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lacuna.dev",
    version = "v1alpha1",
    kind = "SparseInferenceService",
    namespaced,
    derive = "PartialEq",
    status = "InferenceStatus",
    shortname = "sis",
    category = "lacuna",
    doc = "Serves a (sparse) model over HTTP with `lacuna serve`, autoscaled.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SparseInferenceServiceSpec {
    pub model: ModelInput,
    #[serde(default)]
    pub backend: Backend,
    /// Container image with the `lacuna` binary (default: the operator's `--image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Extra arguments to `lacuna serve`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Replicas when no autoscaler is configured (the scale subresource sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// GPUs per replica with `backend: gpu`: the container's `nvidia.com/gpu` limit (default 1;
    /// overrides one given in `resources`). Not allowed with `backend: cpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub gpus: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

fn default_port() -> i32 {
    8080
}

impl SparseInferenceServiceSpec {
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.model.validate("spec.model")?;
        if !(1..=65535).contains(&self.port) {
            return Err(RecipeError::invalid("spec.port", format!("{} is not a TCP port", self.port)));
        }
        if let Some(r) = self.replicas
            && r < 0
        {
            return Err(RecipeError::invalid("spec.replicas", "must not be negative"));
        }
        match (self.backend, self.gpus) {
            (Backend::Cpu, Some(_)) => {
                return Err(RecipeError::invalid("spec.gpus", "only applies with backend: gpu"));
            }
            (Backend::Gpu, Some(g)) if !(1..=16).contains(&g) => {
                return Err(RecipeError::invalid("spec.gpus", format!("{g} is not in [1, 16]")));
            }
            _ => {}
        }
        if let Some(a) = &self.autoscaling {
            if a.min_replicas < 1 || a.min_replicas > a.max_replicas {
                return Err(RecipeError::invalid(
                    "spec.autoscaling.minReplicas",
                    format!("{} must be in [1, maxReplicas = {}]", a.min_replicas, a.max_replicas),
                ));
            }
            match (a.target.cpu_utilization, a.target.waiting_requests) {
                (Some(c), None) if (1..=100).contains(&c) => {}
                (Some(c), None) => {
                    return Err(RecipeError::invalid(
                        "spec.autoscaling.target.cpuUtilization",
                        format!("{c} is not a percentage in [1, 100]"),
                    ));
                }
                (None, Some(w)) if w >= 1 => {}
                (None, Some(_)) => {
                    return Err(RecipeError::invalid("spec.autoscaling.target.waitingRequests", "must be positive"));
                }
                _ => {
                    return Err(RecipeError::invalid(
                        "spec.autoscaling.target",
                        "give exactly one of cpuUtilization or waitingRequests",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceStatus {
    #[serde(default)]
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ResolvedInput>,
    /// Replicas of the Deployment (the scale subresource reads it).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// In-cluster URL of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

//! Pieces every `lacuna.dev` resource shares: where a model comes from, where a job writes,
//! how its pods run, and the status a job reports.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::RecipeError;

/// The API group of every Lacuna resource.
pub const GROUP: &str = "lacuna.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Pattern of a model URI: a PersistentVolumeClaim path, an object-store prefix, or a local path.
pub const URI_PATTERN: &str =
    r"^(pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?|s3://[a-z0-9][-a-z0-9.]*[a-z0-9](/.*)?|file:///.*)$";
/// Pattern of a Kubernetes object name (RFC 1123 subdomain).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// A model a job or service reads: the output of another job in the same namespace, or a URI.
/// Exactly one of the two is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend(
    "minProperties" = 1,
    "maxProperties" = 1,
    "x-kubernetes-validations" = [{"rule": "has(self.fromJob) != has(self.uri)", "message": "give exactly one of fromJob or uri"}]
))]
pub struct ModelInput {
    /// Name of a SparsePretrainJob, FineTuneJob or QuantizeJob in this namespace whose output is
    /// the input; the consumer waits until that job has succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub from_job: Option<String>,
    /// `pvc://claim/path`, `s3://bucket/prefix` or `file:///path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 7), regex(pattern = URI_PATTERN))]
    pub uri: Option<String>,
}

/// Where a job writes its finished model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelOutput {
    /// `pvc://claim/path`, `s3://bucket/prefix` or `file:///path`.
    #[schemars(length(min = 7), regex(pattern = URI_PATTERN))]
    pub uri: String,
}

/// A parsed model URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelUri {
    /// A path inside a PersistentVolumeClaim of the job's namespace.
    Pvc { claim: String, path: String },
    /// An S3 (or S3-compatible) bucket and key prefix.
    S3 { bucket: String, prefix: String },
    /// A path on the local file system (the local runner, or a hostPath the pod already has).
    File { path: String },
}

impl ModelUri {
    /// Parses `pvc://claim/path`, `s3://bucket/prefix` or `file:///path`, naming `field` on error.
    pub fn parse(field: &str, uri: &str) -> Result<Self, RecipeError> {
        let bad = |why: &str| RecipeError::invalid(field, format!("{uri:?}: {why}"));
        let name_ok = |s: &str| regex::Regex::new(NAME_PATTERN).map(|r| r.is_match(s)).unwrap_or(false);
        if let Some(rest) = uri.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if !name_ok(claim) {
                return Err(bad("the claim name is not a valid Kubernetes name"));
            }
            if path.split('/').any(|c| c == "..") {
                return Err(bad("the path may not contain `..`"));
            }
            Ok(Self::Pvc { claim: claim.to_owned(), path: path.trim_matches('/').to_owned() })
        } else if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.len() < 3 || !name_ok(bucket) {
                return Err(bad("the bucket name is not valid"));
            }
            Ok(Self::S3 { bucket: bucket.to_owned(), prefix: prefix.trim_matches('/').to_owned() })
        } else if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file URI needs an absolute path (file:///...)"));
            }
            Ok(Self::File { path: path.to_owned() })
        } else {
            Err(bad("not one of pvc://claim/path, s3://bucket/prefix, file:///path"))
        }
    }

    /// The same location with `child` appended (a stage's intermediate output).
    pub fn join(&self, child: &str) -> Self {
        let j = |base: &str| if base.is_empty() { child.to_owned() } else { format!("{base}/{child}") };
        match self {
            Self::Pvc { claim, path } => Self::Pvc { claim: claim.clone(), path: j(path) },
            Self::S3 { bucket, prefix } => Self::S3 { bucket: bucket.clone(), prefix: j(prefix) },
            Self::File { path } => Self::File { path: format!("{}/{child}", path.trim_end_matches('/')) },
        }
    }
}

impl fmt::Display for ModelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pvc { claim, path } if path.is_empty() => write!(f, "pvc://{claim}"),
            Self::Pvc { claim, path } => write!(f, "pvc://{claim}/{path}"),
            Self::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Self::File { path } => write!(f, "file://{path}"),
        }
    }
}

impl ModelInput {
    /// Exactly one source, and a well-formed URI; `field` prefixes the names in errors.
    pub fn validate(&self, field: &str) -> Result<(), RecipeError> {
        match (&self.from_job, &self.uri) {
            (Some(_), Some(_)) => Err(RecipeError::invalid(field, "give exactly one of fromJob or uri, not both")),
            (None, None) => Err(RecipeError::invalid(field, "give exactly one of fromJob or uri")),
            (Some(j), None) if j.is_empty() => Err(RecipeError::invalid(&format!("{field}.fromJob"), "empty")),
            (Some(_), None) => Ok(()),
            (None, Some(u)) => ModelUri::parse(&format!("{field}.uri"), u).map(|_| ()),
        }
    }
}

/// How a training or conversion job runs, after Kubeflow's PyTorchJob `runPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunPolicy {
    /// Retries of a failed pod before the stage fails (the Job's `backoffLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: Option<i32>,
    /// Wall-clock limit of one stage, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Finished stage Jobs are deleted this many seconds after they finish (their result stays in
    /// this resource's status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Creates the stage Jobs suspended (no pods) until this is set back to false.
    #[serde(default)]
    pub suspend: bool,
    /// Kueue LocalQueue: set as the `kueue.x-k8s.io/queue-name` label of the Jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub queue_name: Option<String>,
}

/// Pod settings of a job's stages or a service's replicas.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerSpec {
    /// Container image with the `lacuna` binary (default: the operator's `--image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// CPU, memory and `nvidia.com/gpu` requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Extra environment (object-store credentials, `LACUNA_THREADS`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// Where a job or service is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted; its pods are not running yet.
    #[default]
    Pending,
    /// Its `fromJob` input has not succeeded yet.
    WaitingForInput,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A finished model: where it is, its checksum, and what it measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputArtifact {
    pub uri: String,
    /// SHA-256 over the model's files (hex); consumers verify it before they read the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// Fraction of the pruned weights that are zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sparsity: Option<f64>,
    /// Named measurements (perplexity, loss, accuracy ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// The input a job resolved (its `fromJob`'s output, or its URI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedInput {
    pub uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The job it came from, for `fromJob` inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_job: Option<String>,
}

/// One finished stage of a multi-stage job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    pub name: String,
    /// The `batch/v1` Job that ran it.
    pub job_name: String,
    pub output: OutputArtifact,
}

/// Status of SparsePretrainJob, FineTuneJob and QuantizeJob.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    #[serde(default)]
    pub phase: Phase,
    /// The stage now running (or the last one, once finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The `batch/v1` Job of the current stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ResolvedInput>,
    /// Stages finished so far, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageStatus>,
    /// The job's result, once it has succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputArtifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What a stage's pod reports when it ends, as JSON in its termination message
/// (`/dev/termination-log`, the path in `LACUNA_REPORT_PATH`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result")]
pub enum PodReport {
    Succeeded { output: OutputArtifact },
    Failed { reason: String, message: String },
}

/// Condition types and reasons: constant strings, so that clients can match on them.
pub mod conditions {
    /// The resource has reached its goal (job finished successfully, service serving).
    pub const READY: &str = "Ready";
    /// A job has failed for good.
    pub const FAILED: &str = "Failed";
    /// The input is available.
    pub const INPUT_AVAILABLE: &str = "InputAvailable";

    pub const REASON_INPUT_NOT_READY: &str = "InputNotReady";
    pub const REASON_INPUT_NOT_FOUND: &str = "InputNotFound";
    pub const REASON_INPUT_AMBIGUOUS: &str = "InputAmbiguous";
    pub const REASON_INPUT_RESOLVED: &str = "InputResolved";
    pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
    pub const REASON_STAGE_PENDING: &str = "StagePending";
    pub const REASON_STAGE_RUNNING: &str = "StageRunning";
    pub const REASON_SUSPENDED: &str = "Suspended";
    pub const REASON_SUCCEEDED: &str = "Succeeded";
    pub const REASON_STAGE_FAILED: &str = "StageFailed";
    /// The pod found that its input's SHA-256 is not the one its producer recorded.
    pub const REASON_CHECKSUM_MISMATCH: &str = "ChecksumMismatch";
    pub const REASON_DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const REASON_BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
    pub const REASON_REPLICAS_READY: &str = "ReplicasReady";
    pub const REASON_REPLICAS_NOT_READY: &str = "ReplicasNotReady";
}

/// Environment variable through which a pod receives the SHA-256 its input must have.
pub const INPUT_SHA256_ENV: &str = "LACUNA_INPUT_SHA256";
/// Environment variable naming the file a pod writes its [`PodReport`] to.
pub const REPORT_PATH_ENV: &str = "LACUNA_REPORT_PATH";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_join() {
        let u = ModelUri::parse("model.uri", "pvc://models/smollm2/base").unwrap();
        assert_eq!(u, ModelUri::Pvc { claim: "models".into(), path: "smollm2/base".into() });
        assert_eq!(u.join("stages/prune").to_string(), "pvc://models/smollm2/base/stages/prune");
        let s = ModelUri::parse("m", "s3://bucket-1/a/b/").unwrap();
        assert_eq!(s.to_string(), "s3://bucket-1/a/b");
        assert_eq!(ModelUri::parse("m", "file:///x/y").unwrap().join("z").to_string(), "file:///x/y/z");
        for bad in ["http://x/y", "pvc://Bad_Claim/x", "file://relative", "pvc://c/../etc", "s3://a"] {
            let e = ModelUri::parse("model.uri", bad).expect_err(bad).to_string();
            assert!(e.starts_with("model.uri:"), "{e}");
        }
    }

    #[test]
    fn input_needs_exactly_one_source() {
        let both = ModelInput { from_job: Some("a".into()), uri: Some("pvc://c/x".into()) };
        assert!(both.validate("spec.model").unwrap_err().to_string().contains("spec.model"));
        let none = ModelInput { from_job: None, uri: None };
        assert!(none.validate("spec.model").is_err());
        let ok = ModelInput { from_job: Some("prune-50".into()), uri: None };
        ok.validate("spec.model").unwrap();
    }

    #[test]
    fn pod_report_round_trips() {
        let r = PodReport::Failed { reason: conditions::REASON_CHECKSUM_MISMATCH.into(), message: "x".into() };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"result\":\"Failed\""), "{j}");
        assert_eq!(serde_json::from_str::<PodReport>(&j).unwrap(), r);
    }
}

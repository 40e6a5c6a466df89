//! The Kubernetes objects the operator owns, built as plain values (no API calls), so tests can
//! compare them field by field.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lacuna_api::crd::common::{INPUT_SHA256_ENV, REPORT_PATH_ENV};
use lacuna_api::crd::inference::WAITING_REQUESTS_METRIC;
use lacuna_api::crd::{Backend, ModelUri, ResolvedInput, RunPolicy, SparseInferenceService, WorkerSpec};
use sha2::{Digest, Sha256};

use crate::context::OperatorConfig;

/// Exit code with which a `lacuna` pod refuses its input (a checksum mismatch): the Job fails at
/// once instead of retrying on the same corrupted weights.
pub const EXIT_INPUT_REJECTED: i32 = 65;
/// Where a pod's termination message (its [`lacuna_api::crd::PodReport`]) is written.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The container name of every pod the operator creates.
pub const CONTAINER: &str = "lacuna";
/// Mount point of PersistentVolumeClaims: `pvc://claim/path` is `/models/claim/path` in the pod.
pub const MODELS_DIR: &str = "/models";
const RECIPE_DIR: &str = "/etc/lacuna";
const CACHE_DIR: &str = "/cache";
/// The extended resource a GPU replica requests (the NVIDIA device plugin's).
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_KIND: &str = "lacuna.dev/kind";
pub const LABEL_RESOURCE: &str = "lacuna.dev/name";
pub const LABEL_STAGE: &str = "lacuna.dev/stage";
pub const LABEL_KUEUE_QUEUE: &str = "kueue.x-k8s.io/queue-name";
pub const MANAGED_BY: &str = "lacuna-operator";

/// The labels that tie a child object (and its pods) to the resource that owns it.
pub fn owner_labels(kind: &str, name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), "lacuna".to_owned()),
        (LABEL_INSTANCE.to_owned(), name.to_owned()),
        (LABEL_COMPONENT.to_owned(), component.to_owned()),
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_KIND.to_owned(), kind.to_owned()),
        (LABEL_RESOURCE.to_owned(), name.to_owned()),
    ])
}

/// `<name>-<stage>-<hash>` (at most 63 characters, the limit of the `job-name` label): the hash
/// covers the generation, the stage and the input, so one spec version and input always map to
/// the same Job and a changed spec to a new one.
pub fn stage_job_name(name: &str, stage: &str, generation: i64, input_uri: &str) -> String {
    let digest = Sha256::digest(format!("{generation}\n{stage}\n{input_uri}").as_bytes());
    let hash = &hex::encode(digest)[..8];
    let suffix = format!("-{stage}-{hash}");
    let keep = 63usize.saturating_sub(suffix.len());
    let prefix: String = name.chars().take(keep).collect();
    format!("{}{suffix}", prefix.trim_end_matches(['-', '.']))
}

/// Where a model URI is inside a pod, and the volume that puts it there.
fn local_path(uri: &str, volumes: &mut BTreeMap<String, bool>, read_only: bool) -> String {
    match ModelUri::parse("uri", uri) {
        Ok(ModelUri::Pvc { claim, path }) => {
            let ro = volumes.entry(claim.clone()).or_insert(read_only);
            *ro &= read_only;
            if path.is_empty() { format!("{MODELS_DIR}/{claim}") } else { format!("{MODELS_DIR}/{claim}/{path}") }
        }
        Ok(ModelUri::File { path }) => path,
        // Object stores are read and written by `lacuna` itself (object_store).
        Ok(ModelUri::S3 { .. }) | Err(_) => uri.to_owned(),
    }
}

fn pvc_volume_name(claim: &str) -> String {
    let mut n = format!("model-{claim}").replace('.', "-");
    n.truncate(63);
    n.trim_end_matches('-').to_owned()
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

fn restricted_pod_security(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn empty_dir(name: &str) -> Volume {
    Volume { name: name.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

/// Scratch volumes every pod needs with a read-only root: `/tmp` and Lacuna's cache.
fn scratch(volumes: &mut Vec<Volume>, mounts: &mut Vec<VolumeMount>) {
    volumes.push(empty_dir("tmp"));
    volumes.push(empty_dir("cache"));
    mounts.push(mount("tmp", "/tmp", false));
    mounts.push(mount("cache", CACHE_DIR, false));
}

fn claim_volumes(claims: &BTreeMap<String, bool>, volumes: &mut Vec<Volume>, mounts: &mut Vec<VolumeMount>) {
    for (claim, read_only) in claims {
        let name = pvc_volume_name(claim);
        volumes.push(Volume {
            name: name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: read_only.then_some(true),
            }),
            ..Default::default()
        });
        mounts.push(mount(&name, &format!("{MODELS_DIR}/{claim}"), *read_only));
    }
}

pub use lacuna_api::crd::Stage;
use lacuna_api::crd::stages::recipe_file;

/// Everything a stage's Job is built from.
pub struct StageJob<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub job_name: &'a str,
    pub stage: &'a Stage,
    pub input: &'a ResolvedInput,
    pub output_uri: &'a str,
    pub run_policy: &'a RunPolicy,
    pub worker: &'a WorkerSpec,
}

impl StageJob<'_> {
    fn metadata(&self, name: &str) -> ObjectMeta {
        let mut labels = owner_labels(self.kind, self.name, self.stage.name);
        labels.insert(LABEL_STAGE.into(), self.stage.name.into());
        if let Some(q) = &self.run_policy.queue_name {
            labels.insert(LABEL_KUEUE_QUEUE.into(), q.clone());
        }
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(self.namespace.into()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    /// The ConfigMap holding the stage's recipe, mounted at `/etc/lacuna`.
    pub fn config_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: self.metadata(self.job_name),
            data: Some(BTreeMap::from([(recipe_file(self.stage), self.stage.recipe_yaml.clone())])),
            ..Default::default()
        }
    }

    pub fn job(&self, config: &OperatorConfig) -> Job {
        let mut claims = BTreeMap::new();
        let model = local_path(&self.input.uri, &mut claims, true);
        let out = local_path(self.output_uri, &mut claims, false);
        let mut args: Vec<String> = self.stage.command.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--recipe".into(),
            format!("{RECIPE_DIR}/{}", recipe_file(self.stage)),
            "--model".into(),
            model,
            "--out".into(),
            out,
        ]);
        let mut envs = vec![
            env(REPORT_PATH_ENV, TERMINATION_LOG),
            env("LACUNA_CACHE", CACHE_DIR),
            env("HOME", "/tmp"),
            env("LACUNA_INPUT_URI", &self.input.uri),
            env("LACUNA_OUTPUT_URI", self.output_uri),
        ];
        if let Some(sha) = &self.input.sha256 {
            envs.push(env(INPUT_SHA256_ENV, sha));
        }
        envs.extend(self.worker.env.iter().cloned());
        let mut volumes = vec![Volume {
            name: "recipe".into(),
            config_map: Some(ConfigMapVolumeSource { name: self.job_name.into(), ..Default::default() }),
            ..Default::default()
        }];
        let mut mounts = vec![mount("recipe", RECIPE_DIR, true)];
        scratch(&mut volumes, &mut mounts);
        claim_volumes(&claims, &mut volumes, &mut mounts);
        let meta = self.metadata(self.job_name);
        let container = Container {
            name: CONTAINER.into(),
            image: Some(self.worker.image.clone().unwrap_or_else(|| config.image.clone())),
            command: Some(vec!["lacuna".into()]),
            args: Some(args),
            env: Some(envs),
            resources: self.worker.resources.clone(),
            volume_mounts: Some(mounts),
            security_context: Some(restricted_container_security()),
            termination_message_path: Some(TERMINATION_LOG.into()),
            termination_message_policy: Some("File".into()),
            ..Default::default()
        };
        Job {
            metadata: meta.clone(),
            spec: Some(JobSpec {
                backoff_limit: self.run_policy.backoff_limit,
                active_deadline_seconds: self.run_policy.active_deadline_seconds,
                ttl_seconds_after_finished: self.run_policy.ttl_seconds_after_finished,
                // Kueue suspends queued Jobs itself and resumes them when admitted; the operator
                // must not own the field then.
                suspend: self.run_policy.queue_name.is_none().then_some(self.run_policy.suspend),
                pod_failure_policy: Some(PodFailurePolicy {
                    rules: vec![PodFailurePolicyRule {
                        action: "FailJob".into(),
                        on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                            container_name: Some(CONTAINER.into()),
                            operator: "In".into(),
                            values: vec![EXIT_INPUT_REJECTED],
                        }),
                        ..Default::default()
                    }],
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: meta.labels.clone(), ..Default::default() }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        service_account_name: self.worker.service_account_name.clone(),
                        security_context: Some(restricted_pod_security(config.run_as_user)),
                        containers: vec![container],
                        volumes: Some(volumes),
                        node_selector: (!self.worker.node_selector.is_empty())
                            .then(|| self.worker.node_selector.clone()),
                        tolerations: (!self.worker.tolerations.is_empty()).then(|| self.worker.tolerations.clone()),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// The Deployment, Service and (optional) HorizontalPodAutoscaler of a SparseInferenceService.
pub struct Serving<'a> {
    pub svc: &'a SparseInferenceService,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub input: &'a ResolvedInput,
}

pub const SERVE_COMPONENT: &str = "serve";

impl Serving<'_> {
    fn metadata(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.into()),
            namespace: Some(self.namespace.into()),
            labels: Some(owner_labels("SparseInferenceService", self.name, SERVE_COMPONENT)),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    /// The pod selector (also the scale subresource's `status.selector`).
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_INSTANCE.to_owned(), self.name.to_owned()),
            (LABEL_KIND.to_owned(), "SparseInferenceService".to_owned()),
        ])
    }

    pub fn selector_string(&self) -> String {
        self.selector().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }

    pub fn url(&self) -> String {
        format!("http://{}.{}.svc:{}", self.name, self.namespace, self.svc.spec.port)
    }

    pub fn deployment(&self, config: &OperatorConfig) -> Deployment {
        let spec = &self.svc.spec;
        let mut claims = BTreeMap::new();
        let model = local_path(&self.input.uri, &mut claims, true);
        let backend = match spec.backend {
            Backend::Cpu => "cpu",
            Backend::Gpu => "gpu",
        };
        let mut args = vec![
            "serve".to_owned(),
            "--model".into(),
            model,
            "--host".into(),
            "0.0.0.0".into(),
            "--port".into(),
            spec.port.to_string(),
            "--backend".into(),
            backend.into(),
        ];
        args.extend(spec.args.iter().cloned());
        let mut envs =
            vec![env("LACUNA_CACHE", CACHE_DIR), env("HOME", "/tmp"), env("LACUNA_INPUT_URI", &self.input.uri)];
        if let Some(sha) = &self.input.sha256 {
            envs.push(env(INPUT_SHA256_ENV, sha));
        }
        let mut resources = spec.resources.clone().unwrap_or_default();
        if spec.backend == Backend::Gpu {
            // Extended resources are limits only (Kubernetes sets the request equal): `gpus` when
            // given, else what `resources` says, else one.
            let limits = resources.limits.get_or_insert_with(BTreeMap::new);
            match spec.gpus {
                Some(n) => {
                    limits.insert(GPU_RESOURCE.into(), Quantity(n.to_string()));
                }
                None => {
                    limits.entry(GPU_RESOURCE.into()).or_insert_with(|| Quantity("1".into()));
                }
            }
        }
        let resources = (resources != ResourceRequirements::default()).then_some(resources);
        let mut volumes = Vec::new();
        let mut mounts = Vec::new();
        scratch(&mut volumes, &mut mounts);
        claim_volumes(&claims, &mut volumes, &mut mounts);
        let probe = |path: &str, period: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            period_seconds: Some(period),
            ..Default::default()
        };
        let mut pod_labels = self.metadata().labels.unwrap_or_default();
        pod_labels.extend(self.selector());
        Deployment {
            metadata: self.metadata(),
            spec: DeploymentSpec {
                // With an autoscaler the HPA owns the replica count.
                replicas: if spec.autoscaling.is_some() { None } else { Some(spec.replicas.unwrap_or(1)) },
                selector: LabelSelector { match_labels: Some(self.selector()), ..Default::default() },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(pod_labels), ..Default::default() }),
                    spec: Some(PodSpec {
                        security_context: Some(restricted_pod_security(config.run_as_user)),
                        containers: vec![Container {
                            name: CONTAINER.into(),
                            image: Some(spec.image.clone().unwrap_or_else(|| config.image.clone())),
                            command: Some(vec!["lacuna".into()]),
                            args: Some(args),
                            env: Some(envs),
                            ports: Some(vec![ContainerPort {
                                name: Some("http".into()),
                                container_port: spec.port,
                                protocol: Some("TCP".into()),
                                ..Default::default()
                            }]),
                            readiness_probe: Some(probe("/ready", 5)),
                            liveness_probe: Some(probe("/health", 10)),
                            resources,
                            volume_mounts: Some(mounts),
                            security_context: Some(restricted_container_security()),
                            ..Default::default()
                        }],
                        volumes: Some(volumes),
                        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
                        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
            status: None,
        }
    }

    pub fn service(&self) -> Service {
        Service {
            metadata: self.metadata(),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(self.selector()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: self.svc.spec.port,
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// The autoscaler, when the resource asks for one.
    pub fn hpa(&self) -> Option<HorizontalPodAutoscaler> {
        let a = self.svc.spec.autoscaling.as_ref()?;
        let metric = match (a.target.cpu_utilization, a.target.waiting_requests) {
            (Some(cpu), _) => MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(cpu),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            },
            (None, waiting) => MetricSpec {
                type_: "Pods".into(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier { name: WAITING_REQUESTS_METRIC.into(), selector: None },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(waiting.unwrap_or(1).to_string())),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            },
        };
        Some(HorizontalPodAutoscaler {
            metadata: self.metadata(),
            spec: HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some("apps/v1".into()),
                    kind: "Deployment".into(),
                    name: self.name.into(),
                },
                min_replicas: Some(a.min_replicas),
                max_replicas: a.max_replicas,
                metrics: Some(vec![metric]),
                behavior: None,
            },
            status: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_deterministic_short_and_change_with_the_spec() {
        let a = stage_job_name("smollm2-prune50", "prune", 1, "pvc://models/base");
        assert_eq!(a, stage_job_name("smollm2-prune50", "prune", 1, "pvc://models/base"));
        assert_ne!(a, stage_job_name("smollm2-prune50", "prune", 2, "pvc://models/base"));
        assert_ne!(a, stage_job_name("smollm2-prune50", "prune", 1, "pvc://models/other"));
        assert!(a.starts_with("smollm2-prune50-prune-"), "{a}");
        let long = stage_job_name(&"x".repeat(80), "pretrain", 1, "s3://b/p");
        assert!(long.len() <= 63, "{long}");
    }

    #[test]
    fn pvc_uris_become_mounts_and_claims_are_read_only_only_when_only_read() {
        let mut claims = BTreeMap::new();
        assert_eq!(local_path("pvc://models/a/b", &mut claims, true), "/models/models/a/b");
        assert!(claims["models"]);
        assert_eq!(local_path("pvc://models/out", &mut claims, false), "/models/models/out");
        assert!(!claims["models"]);
        assert_eq!(local_path("s3://bucket/x", &mut claims, true), "s3://bucket/x");
        assert_eq!(local_path("file:///data/m", &mut claims, true), "/data/m");
    }
}

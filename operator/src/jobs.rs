//! The three job kinds (SparsePretrainJob, FineTuneJob, QuantizeJob): each stage becomes a
//! `batch/v1` Job that runs one `lacuna` subcommand on a recipe mounted from a ConfigMap.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use lacuna_api::RecipeError;
use lacuna_api::crd::common::conditions;
use lacuna_api::crd::stages::stage_output;
use lacuna_api::crd::{
    FineTuneJob, JobStatus, ModelInput, ModelOutput, OutputArtifact, Phase, PodReport, QuantizeJob, ResolvedInput,
    RunPolicy, SparsePretrainJob, StageStatus, WorkerSpec,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, instrument, warn};

use crate::context::{Context, FIELD_MANAGER, FINALIZER};
use crate::error::{Error, Result};
use crate::input::{InputState, resolve};
use crate::lineage::{Execution, ResourceRef};
use crate::resources::{CONTAINER, Stage, StageJob, stage_job_name};
use crate::status::{apply_status, set_condition};

/// What the job controller needs to know about one of the three job kinds.
pub trait LacunaJob:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn model(&self) -> &ModelInput;
    fn output(&self) -> &ModelOutput;
    fn run_policy(&self) -> &RunPolicy;
    fn worker(&self) -> &WorkerSpec;
    fn validate_spec(&self) -> Result<(), RecipeError>;
    /// The stages, in order, with their recipes serialized.
    fn stages(&self) -> Result<Vec<Stage>>;
    fn job_status(&self) -> Option<&JobStatus>;
}

impl LacunaJob for SparsePretrainJob {
    const KIND: &'static str = "SparsePretrainJob";
    fn model(&self) -> &ModelInput {
        &self.spec.model
    }
    fn output(&self) -> &ModelOutput {
        &self.spec.output
    }
    fn run_policy(&self) -> &RunPolicy {
        &self.spec.run_policy
    }
    fn worker(&self) -> &WorkerSpec {
        &self.spec.worker
    }
    fn validate_spec(&self) -> Result<(), RecipeError> {
        self.spec.validate()
    }
    fn stages(&self) -> Result<Vec<Stage>> {
        Ok(self.spec.stages()?)
    }
    fn job_status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }
}

impl LacunaJob for FineTuneJob {
    const KIND: &'static str = "FineTuneJob";
    fn model(&self) -> &ModelInput {
        &self.spec.model
    }
    fn output(&self) -> &ModelOutput {
        &self.spec.output
    }
    fn run_policy(&self) -> &RunPolicy {
        &self.spec.run_policy
    }
    fn worker(&self) -> &WorkerSpec {
        &self.spec.worker
    }
    fn validate_spec(&self) -> Result<(), RecipeError> {
        self.spec.validate()
    }
    fn stages(&self) -> Result<Vec<Stage>> {
        Ok(self.spec.stages()?)
    }
    fn job_status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }
}

impl LacunaJob for QuantizeJob {
    const KIND: &'static str = "QuantizeJob";
    fn model(&self) -> &ModelInput {
        &self.spec.model
    }
    fn output(&self) -> &ModelOutput {
        &self.spec.output
    }
    fn run_policy(&self) -> &RunPolicy {
        &self.spec.run_policy
    }
    fn worker(&self) -> &WorkerSpec {
        &self.spec.worker
    }
    fn validate_spec(&self) -> Result<(), RecipeError> {
        self.spec.validate()
    }
    fn stages(&self) -> Result<Vec<Stage>> {
        Ok(self.spec.stages()?)
    }
    fn job_status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }
}

/// Where a `batch/v1` Job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobPhase {
    Pending,
    Suspended,
    Running,
    Succeeded,
    Failed { reason: String, message: String },
}

pub fn job_phase(job: &Job) -> JobPhase {
    let status = job.status.clone().unwrap_or_default();
    let conds = status.conditions.unwrap_or_default();
    let is_true = |t: &str| conds.iter().find(|c| c.type_ == t && c.status == "True");
    if is_true("Complete").is_some() {
        return JobPhase::Succeeded;
    }
    if let Some(c) = is_true("Failed") {
        return JobPhase::Failed {
            reason: c.reason.clone().unwrap_or_else(|| conditions::REASON_STAGE_FAILED.into()),
            message: c.message.clone().unwrap_or_default(),
        };
    }
    let suspended = job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false) || is_true("Suspended").is_some();
    if suspended {
        JobPhase::Suspended
    } else if status.active.unwrap_or(0) > 0 {
        JobPhase::Running
    } else {
        JobPhase::Pending
    }
}

/// The reports the pods of a stage's Job wrote to their termination messages.
async fn pod_reports(client: &kube::Client, namespace: &str, job_name: &str) -> Result<Vec<PodReport>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job_name}"));
    let mut reports = Vec::new();
    for pod in pods.list(&lp).await?.items {
        let statuses = pod.status.and_then(|s| s.container_statuses).unwrap_or_default();
        for cs in statuses.into_iter().filter(|c| c.name == CONTAINER) {
            let msg = cs.state.and_then(|s| s.terminated).and_then(|t| t.message);
            match msg.as_deref().map(serde_json::from_str::<PodReport>) {
                Some(Ok(r)) => reports.push(r),
                Some(Err(e)) => warn!(job = job_name, "unreadable pod report: {e}"),
                None => {}
            }
        }
    }
    Ok(reports)
}

async fn apply_child<T>(client: &kube::Client, namespace: &str, obj: &T) -> Result<T>
where
    T: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + Debug,
{
    let api: Api<T> = Api::namespaced(client.clone(), namespace);
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await?)
}

fn fail(st: &mut JobStatus, reason: &str, message: String, generation: Option<i64>, ctx: &Context) {
    let now = ctx.now();
    st.phase = Phase::Failed;
    st.completion_time.get_or_insert(now.clone());
    set_condition(&mut st.conditions, conditions::FAILED, true, reason, message.clone(), generation, &now);
    set_condition(&mut st.conditions, conditions::READY, false, reason, message, generation, &now);
}

/// Reconciles one job resource (wrapped in the finalizer).
#[instrument(skip(obj, ctx), fields(kind = K::KIND, name = %obj.name_any()))]
pub async fn reconcile<K: LacunaJob>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(K::KIND);
    let ns = obj.namespace().ok_or_else(|| Error::MissingNamespace { kind: K::KIND, name: obj.name_any() })?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(o) => apply(o, ctx.clone(), &ns).await,
            Finalizer::Cleanup(o) => cleanup(o, ctx.clone(), &ns).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy<K: LacunaJob>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(kind = K::KIND, name = %obj.name_any(), "reconcile failed: {error}");
    ctx.metrics.failure(K::KIND, error);
    Action::requeue(Duration::from_secs(30))
}

async fn cleanup<K: LacunaJob>(obj: Arc<K>, ctx: Arc<Context>, ns: &str) -> Result<Action> {
    // Child Jobs and ConfigMaps go with their owner (garbage collection); the record stays.
    ctx.lineage
        .resource_deleted(&ResourceRef {
            kind: K::KIND.into(),
            namespace: ns.into(),
            name: obj.name_any(),
            uid: obj.uid().unwrap_or_default(),
        })
        .await?;
    info!(kind = K::KIND, name = %obj.name_any(), "deleted; lineage recorded");
    Ok(Action::await_change())
}

async fn apply<K: LacunaJob>(obj: Arc<K>, ctx: Arc<Context>, ns: &str) -> Result<Action> {
    let name = obj.name_any();
    let generation = obj.meta().generation;
    let old = obj.job_status().cloned().unwrap_or_default();
    if old.phase.is_finished() && old.observed_generation == generation {
        return Ok(Action::await_change());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let mut st = old.clone();
    if old.observed_generation != generation {
        st.stages.clear();
        st.output = None;
        st.completion_time = None;
        st.conditions.retain(|c| c.type_ != conditions::FAILED);
        st.phase = Phase::Pending;
    }
    st.observed_generation = generation;
    let now = ctx.now();

    if let Err(e) = obj.validate_spec() {
        fail(&mut st, conditions::REASON_INVALID_SPEC, e.to_string(), generation, &ctx);
        if st != old {
            apply_status(&api, obj.as_ref(), &st).await?;
        }
        return Ok(Action::await_change());
    }

    let input = match resolve(&ctx.client, ns, obj.model()).await? {
        InputState::Ready(i) => i,
        InputState::Waiting { reason, message } => {
            st.phase = Phase::WaitingForInput;
            st.input = None;
            set_condition(&mut st.conditions, conditions::INPUT_AVAILABLE, false, reason, message, generation, &now);
            if st != old {
                apply_status(&api, obj.as_ref(), &st).await?;
            }
            return Ok(Action::requeue(Duration::from_secs(ctx.config.input_poll_seconds)));
        }
    };
    let msg = format!("reading {}", input.uri);
    set_condition(
        &mut st.conditions,
        conditions::INPUT_AVAILABLE,
        true,
        conditions::REASON_INPUT_RESOLVED,
        msg,
        generation,
        &now,
    );
    st.input = Some(input.clone());

    let stages = obj.stages()?;
    let owner = obj.controller_owner_ref(&()).ok_or_else(|| Error::MissingUid { kind: K::KIND, name: name.clone() })?;
    let mut stage_input = input;
    let mut stopped = false;
    for (i, stage) in stages.iter().enumerate() {
        let job_name = stage_job_name(&name, stage.name, generation.unwrap_or(0), &stage_input.uri);
        if let Some(done) = st.stages.iter().find(|s| s.name == stage.name && s.job_name == job_name) {
            stage_input =
                ResolvedInput { uri: done.output.uri.clone(), sha256: done.output.sha256.clone(), from_job: None };
            continue;
        }
        let output_uri = stage_output(&obj.output().uri, stage, i, stages.len())?;
        let sj = StageJob {
            kind: K::KIND,
            name: &name,
            namespace: ns,
            owner: owner.clone(),
            job_name: &job_name,
            stage,
            input: &stage_input,
            output_uri: &output_uri,
            run_policy: obj.run_policy(),
            worker: obj.worker(),
        };
        apply_child::<ConfigMap>(&ctx.client, ns, &sj.config_map()).await?;
        let job = apply_child::<Job>(&ctx.client, ns, &sj.job(&ctx.config)).await?;
        let execution = Execution {
            kind: K::KIND.into(),
            namespace: ns.into(),
            name: name.clone(),
            uid: obj.uid().unwrap_or_default(),
            stage: stage.name.into(),
            workload: job_name.clone(),
            input: Some(stage_input.clone()),
        };
        if old.job_name.as_deref() != Some(job_name.as_str()) {
            ctx.lineage.execution_started(&execution).await?;
            st.start_time.get_or_insert(now.clone());
        }
        st.stage = Some(stage.name.into());
        st.job_name = Some(job_name.clone());
        match job_phase(&job) {
            JobPhase::Succeeded => {
                let reports = pod_reports(&ctx.client, ns, &job_name).await?;
                let output = reports
                    .into_iter()
                    .find_map(|r| match r {
                        PodReport::Succeeded { output } => Some(output),
                        PodReport::Failed { .. } => None,
                    })
                    .unwrap_or_else(|| {
                        warn!(job = %job_name, "no pod report: the output has no checksum");
                        OutputArtifact { uri: output_uri.clone(), ..Default::default() }
                    });
                ctx.lineage.execution_succeeded(&execution, &output).await?;
                stage_input = ResolvedInput { uri: output.uri.clone(), sha256: output.sha256.clone(), from_job: None };
                st.stages.push(StageStatus { name: stage.name.into(), job_name: job_name.clone(), output });
            }
            JobPhase::Failed { reason, message } => {
                let reports = pod_reports(&ctx.client, ns, &job_name).await?;
                let (reason, message) = reports
                    .into_iter()
                    .find_map(|r| match r {
                        PodReport::Failed { reason, message } => Some((reason, message)),
                        PodReport::Succeeded { .. } => None,
                    })
                    .unwrap_or((reason, message));
                let message = format!("stage {} (Job {job_name}): {message}", stage.name);
                ctx.lineage.execution_failed(&execution, &reason, &message).await?;
                fail(&mut st, &reason, message, generation, &ctx);
                stopped = true;
                break;
            }
            phase => {
                let (p, reason) = match phase {
                    JobPhase::Running => (Phase::Running, conditions::REASON_STAGE_RUNNING),
                    JobPhase::Suspended => (Phase::Pending, conditions::REASON_SUSPENDED),
                    _ => (Phase::Pending, conditions::REASON_STAGE_PENDING),
                };
                st.phase = p;
                let msg = format!("stage {} (Job {job_name})", stage.name);
                set_condition(&mut st.conditions, conditions::READY, false, reason, msg, generation, &now);
                stopped = true;
                break;
            }
        }
    }
    if !stopped {
        st.phase = Phase::Succeeded;
        st.output = st.stages.last().map(|s| s.output.clone());
        st.completion_time.get_or_insert(now.clone());
        let msg = format!("wrote {}", st.output.as_ref().map(|o| o.uri.as_str()).unwrap_or(""));
        set_condition(&mut st.conditions, conditions::READY, true, conditions::REASON_SUCCEEDED, msg, generation, &now);
    }
    if st != old {
        apply_status(&api, obj.as_ref(), &st).await?;
    }
    Ok(if st.phase.is_finished() { Action::await_change() } else { Action::requeue(Duration::from_secs(300)) })
}

//! SparseInferenceService → Deployment + Service (+ HorizontalPodAutoscaler).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use lacuna_api::crd::common::conditions;
use lacuna_api::crd::{Phase, SparseInferenceService};
use tracing::{info, instrument, warn};

use crate::context::{Context, FIELD_MANAGER, FINALIZER};
use crate::error::{Error, Result};
use crate::input::{InputState, resolve};
use crate::lineage::{Execution, ResourceRef};
use crate::resources::{SERVE_COMPONENT, Serving};
use crate::status::{apply_status, set_condition};

pub const KIND: &str = "SparseInferenceService";

#[instrument(skip(obj, ctx), fields(kind = KIND, name = %obj.name_any()))]
pub async fn reconcile(obj: Arc<SparseInferenceService>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    let ns = obj.namespace().ok_or_else(|| Error::MissingNamespace { kind: KIND, name: obj.name_any() })?;
    let api: Api<SparseInferenceService> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(o) => apply(o, ctx.clone(), &ns).await,
            Finalizer::Cleanup(o) => cleanup(o, ctx.clone(), &ns).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(obj: Arc<SparseInferenceService>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(kind = KIND, name = %obj.name_any(), "reconcile failed: {error}");
    ctx.metrics.failure(KIND, error);
    Action::requeue(Duration::from_secs(30))
}

async fn cleanup(obj: Arc<SparseInferenceService>, ctx: Arc<Context>, ns: &str) -> Result<Action> {
    ctx.lineage
        .resource_deleted(&ResourceRef {
            kind: KIND.into(),
            namespace: ns.into(),
            name: obj.name_any(),
            uid: obj.uid().unwrap_or_default(),
        })
        .await?;
    info!(name = %obj.name_any(), "deleted; lineage recorded");
    Ok(Action::await_change())
}

async fn apply(obj: Arc<SparseInferenceService>, ctx: Arc<Context>, ns: &str) -> Result<Action> {
    let name = obj.name_any();
    let generation = obj.meta().generation;
    let old = obj.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = generation;
    let now = ctx.now();
    let api: Api<SparseInferenceService> = Api::namespaced(ctx.client.clone(), ns);

    if let Err(e) = obj.spec.validate() {
        st.phase = Phase::Failed;
        let reason = conditions::REASON_INVALID_SPEC;
        set_condition(&mut st.conditions, conditions::READY, false, reason, e.to_string(), generation, &now);
        if st != old {
            apply_status(&api, obj.as_ref(), &st).await?;
        }
        return Ok(Action::await_change());
    }
    let input = match resolve(&ctx.client, ns, &obj.spec.model).await? {
        InputState::Ready(i) => i,
        InputState::Waiting { reason, message } => {
            st.phase = Phase::WaitingForInput;
            set_condition(&mut st.conditions, conditions::INPUT_AVAILABLE, false, reason, message, generation, &now);
            if st != old {
                apply_status(&api, obj.as_ref(), &st).await?;
            }
            return Ok(Action::requeue(Duration::from_secs(ctx.config.input_poll_seconds)));
        }
    };
    let msg = format!("serving {}", input.uri);
    set_condition(
        &mut st.conditions,
        conditions::INPUT_AVAILABLE,
        true,
        conditions::REASON_INPUT_RESOLVED,
        msg,
        generation,
        &now,
    );

    let owner = obj.controller_owner_ref(&()).ok_or_else(|| Error::MissingUid { kind: KIND, name: name.clone() })?;
    let serving = Serving { svc: obj.as_ref(), name: &name, namespace: ns, owner, input: &input };
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let deployment = deployments.patch(&name, &pp, &Patch::Apply(serving.deployment(&ctx.config))).await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    services.patch(&name, &pp, &Patch::Apply(serving.service())).await?;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    match serving.hpa() {
        Some(hpa) => {
            hpas.patch(&name, &pp, &Patch::Apply(hpa)).await?;
        }
        None => match hpas.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        },
    }

    if old.input.as_ref() != Some(&input) {
        let execution = Execution {
            kind: KIND.into(),
            namespace: ns.into(),
            name: name.clone(),
            uid: obj.uid().unwrap_or_default(),
            stage: SERVE_COMPONENT.into(),
            workload: name.clone(),
            input: Some(input.clone()),
        };
        ctx.lineage.execution_started(&execution).await?;
    }
    st.input = Some(input.clone());
    let ds = deployment.status.unwrap_or_default();
    st.replicas = ds.replicas.unwrap_or(0);
    st.ready_replicas = ds.ready_replicas.unwrap_or(0);
    st.url = Some(serving.url());
    st.selector = Some(serving.selector_string());
    let ready = st.ready_replicas > 0;
    st.phase = if ready { Phase::Running } else { Phase::Pending };
    let (reason, msg) = if ready {
        (conditions::REASON_REPLICAS_READY, format!("{} of {} replicas ready", st.ready_replicas, st.replicas))
    } else {
        (conditions::REASON_REPLICAS_NOT_READY, "no replica is ready yet".to_owned())
    };
    set_condition(&mut st.conditions, conditions::READY, ready, reason, msg, generation, &now);
    if st != old {
        apply_status(&api, obj.as_ref(), &st).await?;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

//! Wires one kube-runtime `Controller` per kind.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use lacuna_api::crd::{FineTuneJob, QuantizeJob, SparseInferenceService, SparsePretrainJob};
use tracing::{info, warn};

use crate::context::Context;
use crate::error::Result;
use crate::inference;
use crate::jobs::{self, LacunaJob};
use crate::resources::{LABEL_KIND, LABEL_MANAGED_BY, LABEL_RESOURCE, MANAGED_BY};

fn children_of(kind: &str) -> watcher::Config {
    watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_KIND}={kind}"))
}

async fn ensure_installed<K>(api: &Api<K>) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default().limit(1)).await?;
    Ok(())
}

async fn run_job_controller<K: LacunaJob>(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let client = ctx.client.clone();
    let api = Api::<K>::all(client.clone());
    ensure_installed(&api).await?;
    Controller::new(api, watcher::Config::default().any_semantic())
        .owns(Api::<Job>::all(client.clone()), children_of(K::KIND))
        // A Job's pods carry its owner's labels: their terminations (and their reports) wake it.
        .watches(Api::<Pod>::all(client), children_of(K::KIND), |pod| {
            let name = pod.labels().get(LABEL_RESOURCE)?.clone();
            Some(ObjectRef::<K>::new(&name).within(&pod.namespace()?))
        })
        .graceful_shutdown_on(shutdown)
        .run(jobs::reconcile::<K>, jobs::error_policy::<K>, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!("{}: {e}", K::KIND);
            }
        })
        .await;
    Ok(())
}

async fn run_inference_controller(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let client = ctx.client.clone();
    let api = Api::<SparseInferenceService>::all(client.clone());
    ensure_installed(&api).await?;
    let cfg = children_of(inference::KIND);
    Controller::new(api, watcher::Config::default().any_semantic())
        .owns(Api::<Deployment>::all(client.clone()), cfg.clone())
        .owns(Api::<Service>::all(client.clone()), cfg.clone())
        .owns(Api::<HorizontalPodAutoscaler>::all(client), cfg)
        .graceful_shutdown_on(shutdown)
        .run(inference::reconcile, inference::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!("{}: {e}", inference::KIND);
            }
        })
        .await;
    Ok(())
}

/// Runs the four controllers until `shutdown` resolves (or one fails to start).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let shutdown = futures::FutureExt::shared(shutdown);
    info!("starting controllers");
    futures::try_join!(
        run_job_controller::<SparsePretrainJob>(ctx.clone(), shutdown.clone()),
        run_job_controller::<FineTuneJob>(ctx.clone(), shutdown.clone()),
        run_job_controller::<QuantizeJob>(ctx.clone(), shutdown.clone()),
        run_inference_controller(ctx, shutdown),
    )?;
    Ok(())
}

//! The `lacuna.dev/v1alpha1` custom resources. Their specs embed the CLI's recipes, so a manifest
//! and a `lacuna` recipe file are checked by the same types.

pub mod common;
// kube's `printcolumn(name = …, type_ = …)` repeats keys across columns; clippy takes them for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
pub mod finetune;
// kube's `printcolumn(name = …, type_ = …)` repeats keys across columns; clippy takes them for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
pub mod inference;
pub mod manifest;
// kube's `printcolumn(name = …, type_ = …)` repeats keys across columns; clippy takes them for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
pub mod quantize;
pub mod schema;
// kube's `printcolumn(name = …, type_ = …)` repeats keys across columns; clippy takes them for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
pub mod sparse_pretrain;
pub mod stages;

#[cfg(test)]
mod tests;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

pub use common::{
    GROUP, JobStatus, ModelInput, ModelOutput, ModelUri, OutputArtifact, Phase, PodReport, ResolvedInput, RunPolicy,
    StageStatus, VERSION, WorkerSpec,
};
pub use finetune::{FineTuneJob, FineTuneJobSpec};
pub use inference::{
    Autoscaling, AutoscalingTarget, Backend, InferenceStatus, SparseInferenceService, SparseInferenceServiceSpec,
};
pub use manifest::Manifest;
pub use quantize::{QuantizeJob, QuantizeJobSpec};
pub use sparse_pretrain::{SparsePretrainJob, SparsePretrainJobSpec};
pub use stages::Stage;

/// The four CustomResourceDefinitions, in a fixed order, with schemas made structural.
pub fn crds() -> Vec<CustomResourceDefinition> {
    [SparsePretrainJob::crd(), FineTuneJob::crd(), QuantizeJob::crd(), SparseInferenceService::crd()]
        .into_iter()
        .map(structural)
        .collect()
}

/// Kubernetes refuses `additionalProperties` next to `properties`; schemars writes `false` there for
/// `deny_unknown_fields`. The apiserver prunes (and `kubectl --validate=strict` refuses) unknown
/// fields anyway, so the closed-object rule is kept by dropping the keyword.
fn structural(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for v in &mut crd.spec.versions {
        if let Some(s) = v.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            strip_closed_objects(s);
        }
    }
    crd
}

fn strip_closed_objects(s: &mut JSONSchemaProps) {
    if matches!(s.additional_properties, Some(JSONSchemaPropsOrBool::Bool(false))) {
        s.additional_properties = None;
    }
    if let Some(JSONSchemaPropsOrBool::Schema(inner)) = s.additional_properties.as_mut() {
        strip_closed_objects(inner);
    }
    for p in s.properties.iter_mut().flat_map(|m| m.values_mut()) {
        strip_closed_objects(p);
    }
    match s.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(inner)) => strip_closed_objects(inner),
        Some(JSONSchemaPropsOrArray::Schemas(v)) => v.iter_mut().for_each(strip_closed_objects),
        None => {}
    }
    for list in [&mut s.all_of, &mut s.any_of, &mut s.one_of].into_iter().flatten() {
        list.iter_mut().for_each(strip_closed_objects);
    }
}

/// The file name `crdgen` writes a CRD to: `<plural>.<group>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

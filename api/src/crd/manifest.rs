//! Reading `lacuna.dev` manifests the way the apiserver would take them: schema validation
//! against the generated CRD (ranges, enums, unknown fields, one-of rules), then the typed parse,
//! then the checks only code can do. Shared by the operator's tests and `lacuna apply`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use super::{FineTuneJob, QuantizeJob, SparseInferenceService, SparsePretrainJob, crds, schema};
use crate::RecipeError;

/// One parsed and validated resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Manifest {
    SparsePretrainJob(SparsePretrainJob),
    FineTuneJob(FineTuneJob),
    QuantizeJob(QuantizeJob),
    SparseInferenceService(SparseInferenceService),
}

impl Manifest {
    fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Manifest::SparsePretrainJob(r) => &r.metadata,
            Manifest::FineTuneJob(r) => &r.metadata,
            Manifest::QuantizeJob(r) => &r.metadata,
            Manifest::SparseInferenceService(r) => &r.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// The namespace its metadata names, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.metadata().namespace.as_deref()
    }

    /// The model it reads.
    pub fn model(&self) -> &super::ModelInput {
        match self {
            Manifest::SparsePretrainJob(r) => &r.spec.model,
            Manifest::FineTuneJob(r) => &r.spec.model,
            Manifest::QuantizeJob(r) => &r.spec.model,
            Manifest::SparseInferenceService(r) => &r.spec.model,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Manifest::SparsePretrainJob(_) => "SparsePretrainJob",
            Manifest::FineTuneJob(_) => "FineTuneJob",
            Manifest::QuantizeJob(_) => "QuantizeJob",
            Manifest::SparseInferenceService(_) => "SparseInferenceService",
        }
    }
}

/// The `openAPIV3Schema` of `kind`'s CRD, as JSON.
pub fn schema_of(crds: &[CustomResourceDefinition], kind: &str) -> Option<Value> {
    let crd = crds.iter().find(|c| c.spec.names.kind == kind)?;
    let v = crd.spec.versions.iter().find(|v| v.name == super::VERSION)?;
    serde_json::to_value(v.schema.as_ref()?.open_api_v3_schema.as_ref()?).ok()
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<T, RecipeError> {
    serde_json::from_value(doc.clone()).map_err(|e| RecipeError::Parse(e.to_string()))
}

/// Validates one document (already parsed from YAML or JSON).
pub fn from_value(doc: &Value) -> Result<Manifest, RecipeError> {
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    let expected = format!("{}/{}", super::GROUP, super::VERSION);
    if api_version != expected {
        return Err(RecipeError::invalid("apiVersion", format!("{api_version:?} is not {expected}")));
    }
    let crds = crds();
    let schema = schema_of(&crds, kind).ok_or_else(|| {
        RecipeError::invalid(
            "kind",
            format!("{kind:?} is not one of SparsePretrainJob, FineTuneJob, QuantizeJob, SparseInferenceService"),
        )
    })?;
    // The status is the operator's; a manifest's is ignored, as the apiserver ignores it on create.
    let mut doc = doc.clone();
    if let Some(o) = doc.as_object_mut() {
        o.remove("status");
    }
    if let Some(v) = schema::validate(&schema, &doc).into_iter().next() {
        return Err(RecipeError::Invalid { field: v.path, msg: v.message });
    }
    let m = match kind {
        "SparsePretrainJob" => {
            let r: SparsePretrainJob = typed(&doc)?;
            r.spec.validate()?;
            Manifest::SparsePretrainJob(r)
        }
        "FineTuneJob" => {
            let r: FineTuneJob = typed(&doc)?;
            r.spec.validate()?;
            Manifest::FineTuneJob(r)
        }
        "QuantizeJob" => {
            let r: QuantizeJob = typed(&doc)?;
            r.spec.validate()?;
            Manifest::QuantizeJob(r)
        }
        _ => {
            let r: SparseInferenceService = typed(&doc)?;
            r.spec.validate()?;
            Manifest::SparseInferenceService(r)
        }
    };
    if m.name().is_empty() {
        return Err(RecipeError::invalid("metadata.name", "required"));
    }
    Ok(m)
}

/// Validates every document of a YAML stream (`---`-separated).
pub fn from_yaml(text: &str) -> Result<Vec<Manifest>, RecipeError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| RecipeError::Parse(e.to_string()))?;
    docs.iter().filter(|d| !d.is_null()).map(from_value).collect()
}

//! Resolving a model input: a URI is ready at once; `fromJob` waits for the named job's success.

use kube::Api;
use lacuna_api::crd::common::conditions;
use lacuna_api::crd::{FineTuneJob, JobStatus, ModelInput, Phase, QuantizeJob, ResolvedInput, SparsePretrainJob};

use crate::error::Result;

/// Whether an input can be read now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputState {
    Ready(ResolvedInput),
    /// Not yet: `reason` is one of the `conditions::REASON_INPUT_*` constants.
    Waiting {
        reason: &'static str,
        message: String,
    },
}

/// The status of the job named `name` in `namespace`, whichever of the three job kinds it is.
async fn find_job(client: &kube::Client, namespace: &str, name: &str) -> Result<Vec<(&'static str, JobStatus)>> {
    let mut found = Vec::new();
    let status = |s: Option<JobStatus>| s.unwrap_or_default();
    if let Some(j) = Api::<SparsePretrainJob>::namespaced(client.clone(), namespace).get_opt(name).await? {
        found.push(("SparsePretrainJob", status(j.status)));
    }
    if let Some(j) = Api::<FineTuneJob>::namespaced(client.clone(), namespace).get_opt(name).await? {
        found.push(("FineTuneJob", status(j.status)));
    }
    if let Some(j) = Api::<QuantizeJob>::namespaced(client.clone(), namespace).get_opt(name).await? {
        found.push(("QuantizeJob", status(j.status)));
    }
    Ok(found)
}

pub async fn resolve(client: &kube::Client, namespace: &str, input: &ModelInput) -> Result<InputState> {
    let name = match (&input.from_job, &input.uri) {
        (None, Some(uri)) => {
            return Ok(InputState::Ready(ResolvedInput { uri: uri.clone(), sha256: None, from_job: None }));
        }
        (Some(name), None) => name,
        // `validate` refuses these before any input is resolved.
        _ => {
            return Ok(InputState::Waiting {
                reason: conditions::REASON_INVALID_SPEC,
                message: "give exactly one of fromJob or uri".into(),
            });
        }
    };
    let found = find_job(client, namespace, name).await?;
    let (kind, status) = match found.as_slice() {
        [] => {
            return Ok(InputState::Waiting {
                reason: conditions::REASON_INPUT_NOT_FOUND,
                message: format!("no SparsePretrainJob, FineTuneJob or QuantizeJob named {name} in {namespace}"),
            });
        }
        [one] => one,
        many => {
            let kinds: Vec<&str> = many.iter().map(|(k, _)| *k).collect();
            return Ok(InputState::Waiting {
                reason: conditions::REASON_INPUT_AMBIGUOUS,
                message: format!("{name} names a {}: rename one", kinds.join(" and a ")),
            });
        }
    };
    match (&status.phase, &status.output) {
        (Phase::Succeeded, Some(out)) => Ok(InputState::Ready(ResolvedInput {
            uri: out.uri.clone(),
            sha256: out.sha256.clone(),
            from_job: Some(name.clone()),
        })),
        (phase, _) => Ok(InputState::Waiting {
            reason: conditions::REASON_INPUT_NOT_READY,
            message: format!("{kind} {name} is {phase}, not Succeeded"),
        }),
    }
}

//! Reconcile tests against the fake API server: every request's method, path, content type and
//! body is asserted, and nothing else may be sent.

use std::sync::Arc;

use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use lacuna_api::crd::common::conditions;
use lacuna_api::crd::{
    FineTuneJob, JobStatus, OutputArtifact, Phase, PodReport, QuantizeJob, ResolvedInput, SparseInferenceService,
    SparsePretrainJob,
};
use serde_json::{Value, json};

use crate::fixtures::{Check, Exchange, Scenario, run_scenario, test_context, test_time};
use crate::lineage::{Execution, LineageEvent};
use crate::resources::stage_job_name;
use crate::{inference, jobs};

const NS: &str = "ml";
const SSA: &str = "?&force=true&fieldManager=lacuna-operator";
const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

const SPJ: &str = r#"
apiVersion: lacuna.dev/v1alpha1
kind: SparsePretrainJob
metadata: {name: prune-50, namespace: ml, uid: uid-spj, generation: 1, finalizers: [lacuna.dev/cleanup]}
spec:
  model: {uri: "pvc://models/smollm2-135m"}
  output: {uri: "pvc://models/smollm2-p50"}
  pruning: {method: sparsegpt, sparsity: 0.5, calibration: {samples: 8, seqLen: 128}}
  pretraining:
    data: {sources: [{name: wiki, weight: 1}], sequenceLength: 128}
    schedule: {steps: 10}
  runPolicy: {backoffLimit: 1, activeDeadlineSeconds: 3600, ttlSecondsAfterFinished: 600, queueName: gpu-queue}
  worker:
    resources: {limits: {cpu: "2", memory: 4Gi, nvidia.com/gpu: "1"}}
"#;

fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_saphyr::from_str(yaml).expect("test manifest")
}

fn path(plural: &str, name: &str) -> String {
    format!("/apis/lacuna.dev/v1alpha1/namespaces/{NS}/{plural}/{name}")
}
fn cm_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/configmaps/{name}{SSA}")
}
fn job_path(name: &str) -> String {
    format!("/apis/batch/v1/namespaces/{NS}/jobs/{name}{SSA}")
}
fn pods_path(job: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods?&labelSelector=batch.kubernetes.io%2Fjob-name%3D{job}")
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("JSON")
}

/// A Job answer: the applied body plus a status.
fn job_with_status(body: &Value, status: Value) -> Value {
    let mut j = body.clone();
    j["status"] = status;
    j
}

fn complete() -> Value {
    json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
}

fn pod_list(job: &str, report: &PodReport) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [{
        "metadata": {"name": format!("{job}-x7k2p"), "namespace": NS, "labels": {"batch.kubernetes.io/job-name": job}},
        "status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "lacuna", "image": "lacuna:test", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": serde_json::to_string(report).expect("report")}}
        }]}
    }]})
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn env_of(job: &Value) -> Vec<(String, String)> {
    job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or("").to_owned(), e["value"].as_str().unwrap_or("").to_owned()))
        .collect()
}

fn assert_restricted(pod_spec: &Value) {
    let c = &pod_spec["containers"][0]["securityContext"];
    assert_eq!(c["allowPrivilegeEscalation"], false, "{c}");
    assert_eq!(c["readOnlyRootFilesystem"], true, "{c}");
    assert_eq!(c["runAsNonRoot"], true, "{c}");
    assert_eq!(c["capabilities"]["drop"], json!(["ALL"]), "{c}");
    assert_eq!(pod_spec["securityContext"]["runAsNonRoot"], true);
}

#[tokio::test]
async fn new_resource_gets_only_the_finalizer() {
    let (ctx, verifier, lineage) = test_context();
    let mut spj: SparsePretrainJob = parse(SPJ);
    spj.metadata.finalizers = None;
    let scenario = Scenario::FinalizerCreation { path: path("sparsepretrainjobs", "prune-50"), object: to_value(&spj) };
    let action = run_scenario(verifier, scenario, jobs::reconcile(Arc::new(spj), ctx)).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert!(lineage.events().is_empty());
}

#[tokio::test]
async fn creation_applies_exactly_one_configmap_and_job_for_the_first_stage() {
    let (ctx, verifier, lineage) = test_context();
    let spj: SparsePretrainJob = parse(SPJ);
    let job = stage_job_name("prune-50", "prune", 1, "pvc://models/smollm2-135m");
    let (cm_job, job_job) = (job.clone(), job.clone());
    let status_job = job.clone();
    let scenario = Scenario::Exchanges(vec![
        Exchange::apply(
            cm_path(&job),
            Check::With(Box::new(move |cm| {
                assert_eq!(cm["apiVersion"], "v1");
                assert_eq!(cm["kind"], "ConfigMap");
                assert_eq!(cm["metadata"]["name"], cm_job.as_str());
                let recipe: lacuna_api::PruneRecipe =
                    lacuna_api::from_yaml(cm["data"]["prune.yaml"].as_str().expect("prune.yaml")).expect("recipe");
                assert_eq!(recipe.sparsity, Some(0.5));
                assert_eq!(recipe.calibration.samples, 8);
                assert_eq!(
                    cm["metadata"]["ownerReferences"],
                    json!([{"apiVersion": "lacuna.dev/v1alpha1", "kind": "SparsePretrainJob", "name": "prune-50",
                            "uid": "uid-spj", "controller": true}])
                );
            })),
            Value::Null,
        ),
        Exchange::apply(
            job_path(&job),
            Check::With(Box::new(move |j| {
                assert_eq!(j["kind"], "Job");
                assert_eq!(j["metadata"]["name"], job_job.as_str());
                assert_eq!(j["metadata"]["ownerReferences"][0]["kind"], "SparsePretrainJob");
                assert_eq!(j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], "gpu-queue");
                let spec = &j["spec"];
                assert_eq!(spec["backoffLimit"], 1);
                assert_eq!(spec["activeDeadlineSeconds"], 3600);
                assert_eq!(spec["ttlSecondsAfterFinished"], 600);
                assert!(spec.get("suspend").is_none(), "Kueue owns suspend: {spec}");
                assert_eq!(spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"], json!([65]));
                let pod = &spec["template"]["spec"];
                assert_eq!(pod["restartPolicy"], "Never");
                let c = &pod["containers"][0];
                assert_eq!(c["image"], "lacuna:test");
                assert_eq!(c["command"], json!(["lacuna"]));
                assert_eq!(
                    c["args"],
                    json!([
                        "prune",
                        "--recipe",
                        "/etc/lacuna/prune.yaml",
                        "--model",
                        "/models/models/smollm2-135m",
                        "--out",
                        "/models/models/smollm2-p50-stages/prune"
                    ])
                );
                assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
                assert_eq!(c["terminationMessagePath"], "/dev/termination-log");
                let env = env_of(j);
                assert!(env.contains(&("LACUNA_REPORT_PATH".into(), "/dev/termination-log".into())), "{env:?}");
                assert!(!env.iter().any(|(k, _)| k == "LACUNA_INPUT_SHA256"), "a URI input has no checksum");
                let vols = pod["volumes"].as_array().expect("volumes");
                assert!(vols.iter().any(|v| v["configMap"]["name"] == job_job.as_str()), "{vols:?}");
                // The claim is read and written: mounted once, writable.
                let claims: Vec<&Value> = vols.iter().filter(|v| v.get("persistentVolumeClaim").is_some()).collect();
                assert_eq!(claims.len(), 1, "{vols:?}");
                assert_eq!(claims[0]["persistentVolumeClaim"], json!({"claimName": "models"}));
                assert_restricted(pod);
            })),
            Value::Null,
        ),
        Exchange::apply(
            format!("{}/status{SSA}", path("sparsepretrainjobs", "prune-50")),
            Check::With(Box::new(move |b| {
                assert_eq!(b["apiVersion"], "lacuna.dev/v1alpha1");
                assert_eq!(b["kind"], "SparsePretrainJob");
                let s = &b["status"];
                assert_eq!(s["phase"], "Pending");
                assert_eq!(s["stage"], "prune");
                assert_eq!(s["jobName"], status_job.as_str());
                assert_eq!(s["input"]["uri"], "pvc://models/smollm2-135m");
                assert_eq!(s["observedGeneration"], 1);
                let input = condition(s, "InputAvailable");
                assert_eq!(input["status"], "True");
                assert_eq!(input["lastTransitionTime"], to_value(&test_time()));
                let ready = condition(s, "Ready");
                assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("StagePending")));
            })),
            to_value(&spj),
        ),
    ]);
    let action = run_scenario(verifier, scenario, jobs::reconcile(Arc::new(spj), ctx)).await.expect("reconcile");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(300)));
    let events = lineage.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], LineageEvent::Started(Execution { stage, workload, .. }) if stage == "prune" && *workload == job)
    );
}

fn spj_running_prune() -> (SparsePretrainJob, String) {
    let mut spj: SparsePretrainJob = parse(SPJ);
    let job = stage_job_name("prune-50", "prune", 1, "pvc://models/smollm2-135m");
    spj.status = Some(JobStatus {
        phase: Phase::Running,
        stage: Some("prune".into()),
        job_name: Some(job.clone()),
        input: Some(ResolvedInput { uri: "pvc://models/smollm2-135m".into(), sha256: None, from_job: None }),
        observed_generation: Some(1),
        start_time: Some(test_time()),
        ..Default::default()
    });
    (spj, job)
}

#[tokio::test]
async fn succeeded_stages_chain_and_the_job_succeeds_with_its_artifact_recorded() {
    let (ctx, verifier, lineage) = test_context();
    let (spj, job1) = spj_running_prune();
    let pruned = OutputArtifact {
        uri: "pvc://models/smollm2-p50-stages/prune".into(),
        sha256: Some(SHA_A.into()),
        sparsity: Some(0.5),
        ..Default::default()
    };
    let mut final_out = OutputArtifact {
        uri: "pvc://models/smollm2-p50".into(),
        sha256: Some(SHA_B.into()),
        sparsity: Some(0.5),
        ..Default::default()
    };
    final_out.metrics.insert("perplexity".into(), 21.5);
    let job2 = stage_job_name("prune-50", "pretrain", 1, &pruned.uri);
    let job2_c = job2.clone();
    let finished_job = |name: &str| {
        let mut j = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS}});
        j = job_with_status(&j, complete());
        j
    };
    let expected_output = final_out.clone();
    let scenario = Scenario::Exchanges(vec![
        Exchange::apply(cm_path(&job1), Check::With(Box::new(|_| {})), Value::Null),
        Exchange::apply(job_path(&job1), Check::With(Box::new(|_| {})), finished_job(&job1)),
        Exchange::get(pods_path(&job1), pod_list(&job1, &PodReport::Succeeded { output: pruned.clone() })),
        Exchange::apply(
            cm_path(&job2),
            Check::With(Box::new(|cm| assert!(cm["data"]["pretrain.yaml"].is_string(), "{cm}"))),
            Value::Null,
        ),
        Exchange::apply(
            job_path(&job2),
            Check::With(Box::new(move |j| {
                let c = &j["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(
                    c["args"],
                    json!([
                        "train",
                        "pretrain",
                        "--recipe",
                        "/etc/lacuna/pretrain.yaml",
                        "--model",
                        "/models/models/smollm2-p50-stages/prune",
                        "--out",
                        "/models/models/smollm2-p50"
                    ])
                );
                // The pod verifies the pruned model against the checksum its producer reported.
                assert!(env_of(j).contains(&("LACUNA_INPUT_SHA256".into(), SHA_A.into())));
            })),
            finished_job(&job2),
        ),
        Exchange::get(pods_path(&job2), pod_list(&job2, &PodReport::Succeeded { output: final_out.clone() })),
        Exchange::apply(
            format!("{}/status{SSA}", path("sparsepretrainjobs", "prune-50")),
            Check::With(Box::new(move |b| {
                let s: JobStatus = serde_json::from_value(b["status"].clone()).expect("status");
                assert_eq!(s.phase, Phase::Succeeded);
                assert_eq!(s.output.as_ref(), Some(&expected_output));
                assert_eq!(s.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["prune", "pretrain"]);
                assert_eq!(s.job_name.as_deref(), Some(job2_c.as_str()));
                assert_eq!(s.completion_time, Some(test_time()));
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
                assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", conditions::REASON_SUCCEEDED));
            })),
            to_value(&spj),
        ),
    ]);
    let action = run_scenario(verifier, scenario, jobs::reconcile(Arc::new(spj), ctx)).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    let events = lineage.events();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            LineageEvent::Started(x) => format!("started {}", x.stage),
            LineageEvent::Succeeded(x, o) => format!("succeeded {} {}", x.stage, o.uri),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "succeeded prune pvc://models/smollm2-p50-stages/prune",
            "started pretrain",
            "succeeded pretrain pvc://models/smollm2-p50"
        ]
    );
    assert!(matches!(&events[2], LineageEvent::Succeeded(_, o) if o.sha256.as_deref() == Some(SHA_B)));
}

#[tokio::test]
async fn a_checksum_mismatch_fails_the_job_with_that_reason() {
    let (ctx, verifier, lineage) = test_context();
    let mut qj: QuantizeJob = parse(
        r#"
apiVersion: lacuna.dev/v1alpha1
kind: QuantizeJob
metadata: {name: q8, namespace: ml, uid: uid-q, generation: 3, finalizers: [lacuna.dev/cleanup]}
spec:
  model: {uri: "s3://lacuna-models/smollm2-ft"}
  output: {uri: "s3://lacuna-models/smollm2-q8"}
  quantization: {scheme: w8a8}
"#,
    );
    let job = stage_job_name("q8", "quantize", 3, "s3://lacuna-models/smollm2-ft");
    qj.status = Some(JobStatus {
        phase: Phase::Running,
        stage: Some("quantize".into()),
        job_name: Some(job.clone()),
        observed_generation: Some(3),
        ..Default::default()
    });
    let failed = json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
        "message": "Container lacuna for pod ml/q8 failed with exit code 65"}]});
    let report = PodReport::Failed {
        reason: conditions::REASON_CHECKSUM_MISMATCH.into(),
        message: format!("input sha256 {SHA_B} is not the expected {SHA_A}"),
    };
    let scenario = Scenario::Exchanges(vec![
        Exchange::apply(cm_path(&job), Check::With(Box::new(|_| {})), Value::Null),
        Exchange::apply(
            job_path(&job),
            Check::With(Box::new(|j| {
                let c = &j["spec"]["template"]["spec"]["containers"][0];
                // Object-store URIs go to the pod as they are; no claim is mounted.
                assert_eq!(c["args"][4], "s3://lacuna-models/smollm2-ft");
                assert_eq!(j["spec"]["suspend"], false);
            })),
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job.clone()}, "status": failed}),
        ),
        Exchange::get(pods_path(&job), pod_list(&job, &report)),
        Exchange::apply(
            format!("{}/status{SSA}", path("quantizejobs", "q8")),
            Check::With(Box::new(|b| {
                let s = &b["status"];
                assert_eq!(s["phase"], "Failed");
                let f = condition(s, "Failed");
                assert_eq!(f["status"], "True");
                assert_eq!(f["reason"], "ChecksumMismatch");
                assert!(f["message"].as_str().unwrap_or("").contains("is not the expected"), "{f}");
                assert_eq!(condition(s, "Ready")["status"], "False");
            })),
            to_value(&qj),
        ),
    ]);
    let action = run_scenario(verifier, scenario, jobs::reconcile(Arc::new(qj), ctx)).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    let events = lineage.events();
    assert!(
        matches!(events.as_slice(), [LineageEvent::Failed(x, reason, _)] if reason == "ChecksumMismatch" && x.kind == "QuantizeJob"),
        "{events:?}"
    );
}

const FTJ: &str = r#"
apiVersion: lacuna.dev/v1alpha1
kind: FineTuneJob
metadata: {name: ft, namespace: ml, uid: uid-ft, generation: 1, finalizers: [lacuna.dev/cleanup]}
spec:
  model: {fromJob: pretrain-70}
  output: {uri: "pvc://models/smollm2-ft"}
  finetuning:
    pathway: fromSparsePretrained
    data: {source: humaneval, maxLength: 256}
    schedule: {steps: 5}
"#;

fn upstream(phase: Phase, output: Option<OutputArtifact>) -> Value {
    let mut spj: SparsePretrainJob = parse(SPJ);
    spj.metadata.name = Some("pretrain-70".into());
    spj.status = Some(JobStatus { phase, output, ..Default::default() });
    to_value(&spj)
}

fn lookups(upstream: Value) -> Vec<Exchange> {
    vec![
        Exchange::get(path("sparsepretrainjobs", "pretrain-70").to_string(), upstream),
        Exchange::not_found(Method::GET, path("finetunejobs", "pretrain-70").to_string()),
        Exchange::not_found(Method::GET, path("quantizejobs", "pretrain-70").to_string()),
    ]
}

#[tokio::test]
async fn from_job_waits_for_the_producer_then_runs_on_its_verified_output() {
    // 1: the producer is still running → WaitingForInput, no Job.
    let (ctx, verifier, lineage) = test_context();
    let ftj: FineTuneJob = parse(FTJ);
    let mut ex = lookups(upstream(Phase::Running, None));
    ex.push(Exchange::apply(
        format!("{}/status{SSA}", path("finetunejobs", "ft")),
        Check::With(Box::new(|b| {
            let s = &b["status"];
            assert_eq!(s["phase"], "WaitingForInput");
            let c = condition(s, "InputAvailable");
            assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("False"), Some("InputNotReady")));
            assert!(c["message"].as_str().unwrap_or("").contains("SparsePretrainJob pretrain-70 is Running"), "{c}");
        })),
        to_value(&ftj),
    ));
    let action = run_scenario(verifier, Scenario::Exchanges(ex), jobs::reconcile(Arc::new(ftj.clone()), ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(15)));
    assert!(lineage.events().is_empty());

    // 2: the producer has succeeded → the Job runs on its output, with its checksum to verify.
    let (ctx, verifier, lineage) = test_context();
    let out = OutputArtifact {
        uri: "pvc://models/smollm2-p70".into(),
        sha256: Some(SHA_A.into()),
        sparsity: Some(0.7),
        ..Default::default()
    };
    let job = stage_job_name("ft", "finetune", 1, &out.uri);
    let mut ex = lookups(upstream(Phase::Succeeded, Some(out)));
    ex.push(Exchange::apply(cm_path(&job), Check::With(Box::new(|_| {})), Value::Null));
    ex.push(Exchange::apply(
        job_path(&job),
        Check::With(Box::new(|j| {
            let c = &j["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(
                c["args"],
                json!([
                    "train",
                    "finetune",
                    "--recipe",
                    "/etc/lacuna/finetune.yaml",
                    "--model",
                    "/models/models/smollm2-p70",
                    "--out",
                    "/models/models/smollm2-ft"
                ])
            );
            let env = env_of(j);
            assert!(env.contains(&("LACUNA_INPUT_SHA256".into(), SHA_A.into())), "{env:?}");
            assert!(env.contains(&("LACUNA_INPUT_URI".into(), "pvc://models/smollm2-p70".into())), "{env:?}");
        })),
        Value::Null,
    ));
    ex.push(Exchange::apply(
        format!("{}/status{SSA}", path("finetunejobs", "ft")),
        Check::With(Box::new(|b| {
            let s = &b["status"];
            assert_eq!(s["phase"], "Pending");
            assert_eq!(
                s["input"],
                json!({"uri": "pvc://models/smollm2-p70", "sha256": SHA_A, "fromJob": "pretrain-70"})
            );
            assert_eq!(condition(s, "InputAvailable")["status"], "True");
        })),
        to_value(&ftj),
    ));
    run_scenario(verifier, Scenario::Exchanges(ex), jobs::reconcile(Arc::new(ftj), ctx)).await.expect("reconcile");
    assert!(
        matches!(lineage.events().as_slice(), [LineageEvent::Started(x)] if x.input.as_ref().and_then(|i| i.from_job.as_deref()) == Some("pretrain-70"))
    );
}

#[tokio::test]
async fn a_restarted_operator_reapplies_the_same_children_and_creates_nothing() {
    let (spj, job) = spj_running_prune();
    // Twice, as two operator processes would: each time the same two applies (PATCH, never POST),
    // the status moves from Running to Running (no write), and lineage records no second start.
    for _ in 0..2 {
        let (ctx, verifier, lineage) = test_context();
        let running = json!({"active": 1});
        let scenario = Scenario::Exchanges(vec![
            Exchange::apply(cm_path(&job), Check::With(Box::new(|_| {})), Value::Null),
            Exchange::apply(
                job_path(&job),
                Check::With(Box::new(|_| {})),
                json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job.clone()}, "status": running}),
            ),
        ]);
        let mut spj = spj.clone();
        // The status a previous reconcile wrote for a running stage.
        let st = spj.status.as_mut().expect("status");
        let now = test_time();
        crate::status::set_condition(
            &mut st.conditions,
            "InputAvailable",
            true,
            "InputResolved",
            "reading pvc://models/smollm2-135m",
            Some(1),
            &now,
        );
        crate::status::set_condition(
            &mut st.conditions,
            "Ready",
            false,
            "StageRunning",
            format!("stage prune (Job {job})"),
            Some(1),
            &now,
        );
        run_scenario(verifier, scenario, jobs::reconcile(Arc::new(spj), ctx)).await.expect("reconcile");
        assert!(lineage.events().is_empty(), "{:?}", lineage.events());
    }
}

#[tokio::test]
async fn an_invalid_spec_fails_naming_the_field_and_creates_nothing() {
    let (ctx, verifier, _) = test_context();
    let spj: SparsePretrainJob = parse(&SPJ.replace("sparsity: 0.5", "sparsity: 1.5"));
    let scenario = Scenario::Exchanges(vec![Exchange::apply(
        format!("{}/status{SSA}", path("sparsepretrainjobs", "prune-50")),
        Check::With(Box::new(|b| {
            let f = condition(&b["status"], "Failed");
            assert_eq!(f["reason"], "InvalidSpec");
            assert!(f["message"].as_str().unwrap_or("").contains("spec.pruning.sparsity"), "{f}");
        })),
        to_value(&spj),
    )]);
    run_scenario(verifier, scenario, jobs::reconcile(Arc::new(spj), ctx)).await.expect("reconcile");
}

#[tokio::test]
async fn deletion_records_lineage_and_removes_the_finalizer() {
    let (ctx, verifier, lineage) = test_context();
    let mut spj: SparsePretrainJob = parse(SPJ);
    spj.metadata.deletion_timestamp = Some(test_time());
    let scenario = Scenario::FinalizerRemoval { path: path("sparsepretrainjobs", "prune-50"), object: to_value(&spj) };
    run_scenario(verifier, scenario, jobs::reconcile(Arc::new(spj), ctx)).await.expect("reconcile");
    assert!(
        matches!(lineage.events().as_slice(), [LineageEvent::Deleted(r)] if r.uid == "uid-spj" && r.kind == "SparsePretrainJob")
    );
}

#[tokio::test]
async fn a_lineage_outage_fails_the_reconcile_before_the_status_moves() {
    let (ctx, verifier, lineage) = test_context();
    lineage.set_failing(true);
    let spj: SparsePretrainJob = parse(SPJ);
    let job = stage_job_name("prune-50", "prune", 1, "pvc://models/smollm2-135m");
    // The children are applied, but no status is written: the retry sees the same transition
    // and records it then.
    let scenario = Scenario::Exchanges(vec![
        Exchange::apply(cm_path(&job), Check::With(Box::new(|_| {})), Value::Null),
        Exchange::apply(job_path(&job), Check::With(Box::new(|_| {})), Value::Null),
    ]);
    let err = run_scenario(verifier, scenario, jobs::reconcile(Arc::new(spj), ctx.clone())).await.expect_err("outage");
    assert_eq!(err.metric_label(), "lineage");
    let action = jobs::error_policy(Arc::new(parse::<SparsePretrainJob>(SPJ)), &err, ctx.clone());
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(30)));
}

const SIS: &str = r#"
apiVersion: lacuna.dev/v1alpha1
kind: SparseInferenceService
metadata: {name: chat, namespace: ml, uid: uid-sis, generation: 1, finalizers: [lacuna.dev/cleanup]}
spec:
  model: {fromJob: q8}
  autoscaling: {minReplicas: 1, maxReplicas: 4, target: {waitingRequests: 4}}
  resources: {requests: {cpu: "2", memory: 2Gi}}
"#;

fn sis_path(kind_path: &str, name: &str) -> String {
    format!("{kind_path}/namespaces/{NS}/{name}")
}

#[tokio::test]
async fn inference_service_creates_deployment_service_and_autoscaler() {
    let (ctx, verifier, lineage) = test_context();
    let sis: SparseInferenceService = parse(SIS);
    let mut producer: QuantizeJob = parse(
        "apiVersion: lacuna.dev/v1alpha1\nkind: QuantizeJob\nmetadata: {name: q8, namespace: ml}\nspec:\n  model: {uri: 'pvc://models/a'}\n  output: {uri: 'pvc://models/q8'}\n  quantization: {}\n",
    );
    producer.status = Some(JobStatus {
        phase: Phase::Succeeded,
        output: Some(OutputArtifact {
            uri: "pvc://models/q8".into(),
            sha256: Some(SHA_B.into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let scenario = Scenario::Exchanges(vec![
        Exchange::not_found(Method::GET, path("sparsepretrainjobs", "q8").to_string()),
        Exchange::not_found(Method::GET, path("finetunejobs", "q8").to_string()),
        Exchange::get(path("quantizejobs", "q8").to_string(), to_value(&producer)),
        Exchange::apply(
            format!("{}{SSA}", sis_path("/apis/apps/v1", "deployments/chat")),
            Check::With(Box::new(|d| {
                assert_eq!(d["kind"], "Deployment");
                assert!(d["spec"].get("replicas").is_none(), "the HPA owns replicas: {d}");
                let pod = &d["spec"]["template"]["spec"];
                let c = &pod["containers"][0];
                assert_eq!(
                    c["args"],
                    json!([
                        "serve",
                        "--model",
                        "/models/models/q8",
                        "--host",
                        "0.0.0.0",
                        "--port",
                        "8080",
                        "--backend",
                        "cpu"
                    ])
                );
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
                assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health");
                assert_eq!(c["resources"]["requests"]["cpu"], "2");
                assert!(env_of(d).contains(&("LACUNA_INPUT_SHA256".into(), SHA_B.into())));
                assert_eq!(
                    pod["volumes"][2]["persistentVolumeClaim"],
                    json!({"claimName": "models", "readOnly": true})
                );
                assert_restricted(pod);
                assert_eq!(
                    d["spec"]["selector"]["matchLabels"],
                    json!({"app.kubernetes.io/instance": "chat", "lacuna.dev/kind": "SparseInferenceService"})
                );
            })),
            Value::Null,
        ),
        Exchange::apply(
            format!("{}{SSA}", sis_path("/api/v1", "services/chat")),
            Check::With(Box::new(|s| {
                assert_eq!(
                    s["spec"]["ports"],
                    json!([{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}])
                );
            })),
            Value::Null,
        ),
        Exchange::apply(
            format!("{}{SSA}", sis_path("/apis/autoscaling/v2", "horizontalpodautoscalers/chat")),
            Check::With(Box::new(|h| {
                assert_eq!(h["apiVersion"], "autoscaling/v2");
                assert_eq!(h["spec"]["minReplicas"], 1);
                assert_eq!(h["spec"]["maxReplicas"], 4);
                assert_eq!(
                    h["spec"]["scaleTargetRef"],
                    json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"})
                );
                assert_eq!(
                    h["spec"]["metrics"],
                    json!([{"type": "Pods", "pods": {"metric": {"name": "lacuna:num_requests_waiting"},
                            "target": {"type": "AverageValue", "averageValue": "4"}}}])
                );
            })),
            Value::Null,
        ),
        Exchange::apply(
            format!("{}/status{SSA}", path("sparseinferenceservices", "chat")),
            Check::With(Box::new(|b| {
                let s = &b["status"];
                assert_eq!(s["phase"], "Pending");
                assert_eq!(s["url"], "http://chat.ml.svc:8080");
                assert_eq!(s["selector"], "app.kubernetes.io/instance=chat,lacuna.dev/kind=SparseInferenceService");
                assert_eq!(s["readyReplicas"], 0);
                assert_eq!(condition(s, "Ready")["reason"], "ReplicasNotReady");
            })),
            to_value(&sis),
        ),
    ]);
    run_scenario(verifier, scenario, inference::reconcile(Arc::new(sis), ctx)).await.expect("reconcile");
    assert!(matches!(lineage.events().as_slice(), [LineageEvent::Started(x)] if x.stage == "serve"));
}

#[tokio::test]
async fn inference_service_without_autoscaler_reports_ready_replicas_on_gpu() {
    let (ctx, verifier, lineage) = test_context();
    let mut sis: SparseInferenceService = parse(
        r#"
apiVersion: lacuna.dev/v1alpha1
kind: SparseInferenceService
metadata: {name: chat, namespace: ml, uid: uid-sis, generation: 2, finalizers: [lacuna.dev/cleanup]}
spec:
  model: {uri: "pvc://models/q8"}
  backend: gpu
  replicas: 2
"#,
    );
    let input = ResolvedInput { uri: "pvc://models/q8".into(), sha256: None, from_job: None };
    sis.status = Some(lacuna_api::crd::InferenceStatus { input: Some(input), ..Default::default() });
    let scenario = Scenario::Exchanges(vec![
        Exchange::apply(
            format!("{}{SSA}", sis_path("/apis/apps/v1", "deployments/chat")),
            Check::With(Box::new(|d| {
                assert_eq!(d["spec"]["replicas"], 2);
                let c = &d["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
                assert_eq!(c["args"][8], "gpu");
            })),
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat"},
                   "spec": {"selector": {}, "template": {}}, "status": {"replicas": 2, "readyReplicas": 2}}),
        ),
        Exchange::apply(
            format!("{}{SSA}", sis_path("/api/v1", "services/chat")),
            Check::With(Box::new(|_| {})),
            Value::Null,
        ),
        Exchange {
            check: Check::With(Box::new(|_| {})),
            ..Exchange::not_found(
                Method::DELETE,
                format!("{}?", sis_path("/apis/autoscaling/v2", "horizontalpodautoscalers/chat")),
            )
        },
        Exchange::apply(
            format!("{}/status{SSA}", path("sparseinferenceservices", "chat")),
            Check::With(Box::new(|b| {
                let s = &b["status"];
                assert_eq!(s["phase"], "Running");
                assert_eq!((s["replicas"].as_i64(), s["readyReplicas"].as_i64()), (Some(2), Some(2)));
                assert_eq!(s["observedGeneration"], 2);
                let r = condition(s, "Ready");
                assert_eq!((r["status"].as_str(), r["reason"].as_str()), (Some("True"), Some("ReplicasReady")));
            })),
            to_value(&sis),
        ),
    ]);
    run_scenario(verifier, scenario, inference::reconcile(Arc::new(sis), ctx)).await.expect("reconcile");
    assert!(lineage.events().is_empty(), "same input: no new execution");
}

#[tokio::test]
async fn inference_service_on_gpus_requests_them_and_schedules_onto_gpu_nodes() {
    let (ctx, verifier, lineage) = test_context();
    let mut sis: SparseInferenceService = parse(
        r#"
apiVersion: lacuna.dev/v1alpha1
kind: SparseInferenceService
metadata: {name: chat, namespace: ml, uid: uid-sis, generation: 2, finalizers: [lacuna.dev/cleanup]}
spec:
  model: {uri: "pvc://models/q8"}
  backend: gpu
  gpus: 4
  resources: {limits: {nvidia.com/gpu: "1", memory: 64Gi}}
  nodeSelector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  replicas: 2
"#,
    );
    let input = ResolvedInput { uri: "pvc://models/q8".into(), sha256: None, from_job: None };
    sis.status = Some(lacuna_api::crd::InferenceStatus { input: Some(input), ..Default::default() });
    let scenario = Scenario::Exchanges(vec![
        Exchange::apply(
            format!("{}{SSA}", sis_path("/apis/apps/v1", "deployments/chat")),
            Check::With(Box::new(|d| {
                assert_eq!(d["spec"]["replicas"], 2);
                let c = &d["spec"]["template"]["spec"]["containers"][0];
                // `gpus` wins over the limit in `resources`; the other limits stay.
                assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "4");
                assert_eq!(c["resources"]["limits"]["memory"], "64Gi");
                assert_eq!(c["args"][8], "gpu");
                let pod = &d["spec"]["template"]["spec"];
                assert_eq!(pod["nodeSelector"], json!({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}));
                assert_eq!(
                    pod["tolerations"],
                    json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
                );
            })),
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat"},
                   "spec": {"selector": {}, "template": {}}, "status": {"replicas": 2, "readyReplicas": 2}}),
        ),
        Exchange::apply(
            format!("{}{SSA}", sis_path("/api/v1", "services/chat")),
            Check::With(Box::new(|_| {})),
            Value::Null,
        ),
        Exchange {
            check: Check::With(Box::new(|_| {})),
            ..Exchange::not_found(
                Method::DELETE,
                format!("{}?", sis_path("/apis/autoscaling/v2", "horizontalpodautoscalers/chat")),
            )
        },
        Exchange::apply(
            format!("{}/status{SSA}", path("sparseinferenceservices", "chat")),
            Check::With(Box::new(|b| {
                let s = &b["status"];
                assert_eq!(s["phase"], "Running");
                assert_eq!((s["replicas"].as_i64(), s["readyReplicas"].as_i64()), (Some(2), Some(2)));
                assert_eq!(s["observedGeneration"], 2);
                let r = condition(s, "Ready");
                assert_eq!((r["status"].as_str(), r["reason"].as_str()), (Some("True"), Some("ReplicasReady")));
            })),
            to_value(&sis),
        ),
    ]);
    run_scenario(verifier, scenario, inference::reconcile(Arc::new(sis), ctx)).await.expect("reconcile");
    assert!(lineage.events().is_empty(), "same input: no new execution");
}

#[tokio::test]
async fn inference_service_deletion_is_recorded() {
    let (ctx, verifier, lineage) = test_context();
    let mut sis: SparseInferenceService = parse(SIS);
    sis.metadata.deletion_timestamp = Some(test_time());
    let scenario = Scenario::FinalizerRemoval { path: path("sparseinferenceservices", "chat"), object: to_value(&sis) };
    run_scenario(verifier, scenario, inference::reconcile(Arc::new(sis), ctx)).await.expect("reconcile");
    assert!(matches!(lineage.events().as_slice(), [LineageEvent::Deleted(r)] if r.kind == "SparseInferenceService"));
}

#[test]
fn transition_time_changes_only_when_the_status_does() {
    let t0 = test_time();
    let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(1_790_000_600).expect("time"));
    let mut c = Vec::new();
    crate::status::set_condition(&mut c, "Ready", false, "StagePending", "a", Some(1), &t0);
    crate::status::set_condition(&mut c, "Ready", false, "StageRunning", "b", Some(1), &t1);
    assert_eq!((c[0].last_transition_time.clone(), c[0].reason.as_str()), (t0.clone(), "StageRunning"));
    crate::status::set_condition(&mut c, "Ready", true, "Succeeded", "c", Some(2), &t1);
    assert_eq!((c[0].last_transition_time.clone(), c[0].observed_generation), (t1, Some(2)));
    assert_eq!(c.len(), 1);
}

#[test]
fn metrics_render_with_fixed_labels() {
    let mut registry = prometheus_client::registry::Registry::default();
    let m = crate::metrics::Metrics::default().register(&mut registry);
    drop(m.reconcile("QuantizeJob"));
    m.failure("QuantizeJob", &crate::Error::MissingNamespace { kind: "QuantizeJob", name: "x".into() });
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains(r#"lacuna_operator_reconciliations_total{kind="QuantizeJob"} 1"#), "{text}");
    assert!(
        text.contains(r#"lacuna_operator_reconcile_failures_total{kind="QuantizeJob",error="missing_namespace"} 1"#),
        "{text}"
    );
    assert!(text.contains("lacuna_operator_reconcile_duration_seconds_count{kind=\"QuantizeJob\"} 1"), "{text}");
}

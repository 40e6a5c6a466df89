//! The operator on a real Kubernetes API server (kube-apiserver 1.36 with etcd, no kubelet or
//! controller-manager): the CRDs and the Helm chart as users install them, the operator binary as
//! the image builds it, run out of cluster with the chart's own ServiceAccount and roles.
//!
//! Needs `LACUNA_ENVTEST_ASSETS` (`export LACUNA_ENVTEST_ASSETS=$(scripts/envtest-assets.sh)`);
//! without it every scenario is reported as ignored, with the reason, and with
//! `LACUNA_E2E_REQUIRED=1` (as in `.ci/run`) the suite fails instead. One server serves every
//! scenario; each scenario works in its own namespace, and they run one at a time in the order
//! below (later ones restart and add operator processes).

mod world;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};
use world::{LEASE, RELEASE, SYSTEM_NS, World, condition, repo};

type Scenario = fn(&World) -> Result<()>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("crds_are_established", crds_are_established),
    ("invalid_manifests_are_refused_with_the_servers_message", invalid_manifests_are_refused),
    ("chart_and_pipeline_examples_are_accepted", chart_and_examples_are_accepted),
    ("operator_service_account_has_least_privilege", least_privilege),
    ("pretrain_job_runs_its_stages_to_succeeded_with_lineage", pretrain_job_succeeds),
    ("finetune_from_job_waits_for_its_producer_then_starts", finetune_waits_for_producer),
    ("failing_stage_job_surfaces_its_reason", failing_job_surfaces_reason),
    ("inference_service_becomes_deployment_service_hpa_and_scales", inference_service),
    ("deleting_a_resource_runs_its_finalizer", deletion_runs_finalizer),
    ("restarting_the_operator_mid_pipeline_creates_no_duplicate_job", restart_creates_no_duplicate),
    ("two_operators_elect_one_leader_through_the_lease", leader_election),
];

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One server, one operator at a time: the scenarios run in order.
    args.test_threads = Some(1);
    let assets = match lacuna_envtest::assets_dir() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("e2e: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let Some(assets) = assets else {
        let why = format!(
            "e2e: SKIPPED, {} is not set (export {}=$(scripts/envtest-assets.sh) to run the operator against a real kube-apiserver)",
            lacuna_envtest::ASSETS_ENV,
            lacuna_envtest::ASSETS_ENV
        );
        eprintln!("{why}");
        if std::env::var_os("LACUNA_E2E_REQUIRED").is_some_and(|v| v != "0") {
            eprintln!("e2e: LACUNA_E2E_REQUIRED is set: failing instead of skipping");
            return ExitCode::FAILURE;
        }
        let trials = SCENARIOS.iter().map(|(name, _)| Trial::test(*name, || Ok(())).with_ignored_flag(true)).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    };
    // Listing tests must not start a server.
    if args.list {
        let trials = SCENARIOS.iter().map(|(name, _)| Trial::test(*name, || Ok(()))).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let world = match World::setup(&assets) {
        Ok(w) => Arc::new(w),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("e2e: setup failed: {msg}");
            let trials = SCENARIOS
                .iter()
                .map(|(name, _)| {
                    let msg = msg.clone();
                    Trial::test(*name, move || Err(Failed::from(format!("setup failed: {msg}"))))
                })
                .collect();
            return libtest_mimic::run(&args, trials).exit_code();
        }
    };
    let trials = SCENARIOS
        .iter()
        .map(|&(name, f)| {
            let world = world.clone();
            Trial::test(name, move || {
                f(&world).and_then(|()| world.check_operator_health()).map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // The trials (and their handles on the world) are gone: this stops the operators and the server.
    drop(world);
    conclusion.exit_code()
}

// ---------------------------------------------------------------------------------------------
// Installation

fn crds_are_established(w: &World) -> Result<()> {
    let crds: Value = serde_json::from_str(&w.kubectl(&["get", "crd", "-o", "json"])?)?;
    let mut names: Vec<String> = Vec::new();
    for crd in crds["items"].as_array().into_iter().flatten() {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        if !name.ends_with(".lacuna.dev") {
            continue;
        }
        let established = condition(crd, "Established").is_some_and(|c| c["status"] == "True");
        ensure!(established, "{name} is not Established: {}", crd["status"]);
        names.push(name);
    }
    names.sort();
    let want = ["finetunejobs", "quantizejobs", "sparseinferenceservices", "sparsepretrainjobs"]
        .map(|k| format!("{k}.lacuna.dev"));
    ensure!(names == want, "CRDs on the server: {names:?}");
    // The category the docs promise.
    w.kubectl(&["get", "lacuna", "--all-namespaces"])?;
    Ok(())
}

fn spj(name: &str, model: Value) -> Value {
    json!({
        "apiVersion": "lacuna.dev/v1alpha1", "kind": "SparsePretrainJob",
        "metadata": {"name": name},
        "spec": {
            "model": model,
            "output": {"uri": format!("pvc://models/e2e/{name}")},
            "pruning": {"method": "sparsegpt", "sparsity": 0.5, "calibration": {"dataset": "wiki", "samples": 8, "seqLen": 64}},
            "pretraining": {"data": {"sources": [{"name": "wiki", "weight": 1}], "sequenceLength": 64},
                            "schedule": {"steps": 2, "batchSize": 1}},
        },
    })
}

fn ftj(name: &str, model: Value) -> Value {
    json!({
        "apiVersion": "lacuna.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": model,
            "output": {"uri": format!("pvc://models/e2e/{name}")},
            "finetuning": {"pathway": "fromSparsePretrained", "data": {"source": "humaneval", "maxLength": 64},
                           "schedule": {"steps": 2, "batchSize": 1}},
        },
    })
}

fn qj(name: &str, model: Value) -> Value {
    json!({
        "apiVersion": "lacuna.dev/v1alpha1", "kind": "QuantizeJob",
        "metadata": {"name": name},
        "spec": {"model": model, "output": {"uri": format!("pvc://models/e2e/{name}")},
                 "quantization": {"scheme": "w8a8", "smoothquantAlpha": 0.8}},
    })
}

fn sis(name: &str, model: Value, autoscaling: Option<Value>) -> Value {
    let mut v = json!({
        "apiVersion": "lacuna.dev/v1alpha1", "kind": "SparseInferenceService",
        "metadata": {"name": name},
        "spec": {"model": model, "backend": "cpu", "port": 8080},
    });
    if let Some(a) = autoscaling {
        v["spec"]["autoscaling"] = a;
    }
    v
}

/// `manifest` is refused by the server and its message contains `needle`.
fn refused(w: &World, ns: &str, manifest: &Value, needle: &str) -> Result<()> {
    let (ok, _, err) = w.kubectl_stdin(&["-n", ns, "apply", "-f", "-"], &manifest.to_string())?;
    ensure!(!ok, "accepted: {manifest}");
    ensure!(err.contains(needle), "refused without {needle:?}: {err}");
    ensure!(err.contains("is invalid"), "not a validation error: {err}");
    Ok(())
}

fn invalid_manifests_are_refused(w: &World) -> Result<()> {
    let ns = "e2e-invalid";
    w.create_namespace(ns)?;
    // The CEL rule on the model input, once per kind: a null `fromJob` is one property (so the
    // schema's min/maxProperties pass) but no input.
    let none = json!({"fromJob": null});
    const CEL: &str = "give exactly one of fromJob or uri";
    refused(w, ns, &spj("bad-spj", none.clone()), CEL)?;
    refused(w, ns, &ftj("bad-ftj", none.clone()), CEL)?;
    refused(w, ns, &qj("bad-qj", none.clone()), CEL)?;
    refused(w, ns, &sis("bad-sis", none, None), CEL)?;
    // Both given: the schema's maxProperties refuses it before CEL runs.
    let both = json!({"uri": "pvc://models/base", "fromJob": "other"});
    refused(w, ns, &spj("bad-both", both), "spec.model: Too many: 2")?;
    // Schema rules: a range, an enum, a CEL rule across fields.
    let mut s = spj("bad-sparsity", json!({"uri": "pvc://models/base"}));
    s["spec"]["pruning"]["sparsity"] = json!(1.5);
    refused(w, ns, &s, "spec.pruning.sparsity")?;
    let mut f = ftj("bad-pathway", json!({"uri": "pvc://models/base"}));
    f["spec"]["finetuning"]["pathway"] = json!("sideways");
    refused(w, ns, &f, "spec.finetuning.pathway")?;
    let scaling = json!({"minReplicas": 3, "maxReplicas": 2, "target": {"cpuUtilization": 70}});
    refused(
        w,
        ns,
        &sis("bad-scaling", json!({"uri": "pvc://models/base"}), Some(scaling)),
        "minReplicas must not exceed maxReplicas",
    )?;
    let mut q = qj("bad-field", json!({"uri": "pvc://models/base"}));
    q["spec"]["model"]["urii"] = json!("typo");
    let (ok, _, err) = w.kubectl_stdin(&["-n", ns, "apply", "--validate=strict", "-f", "-"], &q.to_string())?;
    ensure!(!ok && err.contains("urii"), "an unknown field is refused by name: {err}");
    let left = w.kubectl(&["-n", ns, "get", "lacuna", "-o", "name"])?;
    ensure!(left.trim().is_empty(), "refused objects were stored: {left}");
    Ok(())
}

fn chart_and_examples_are_accepted(w: &World) -> Result<()> {
    let status = w.env.tool("helm").args(["status", RELEASE, "-n", SYSTEM_NS, "-o", "json"]).output()?;
    ensure!(status.status.success(), "helm status: {}", String::from_utf8_lossy(&status.stderr));
    let v: Value = serde_json::from_slice(&status.stdout)?;
    ensure!(v["info"]["status"] == "deployed", "release status {}", v["info"]["status"]);
    for (kind, name) in [
        ("clusterrole", "lacuna-operator"),
        ("clusterrolebinding", "lacuna-operator"),
        ("role", "lacuna-leader-election"),
        ("rolebinding", "lacuna-leader-election"),
        ("deployment", "lacuna-operator"),
    ] {
        let found =
            w.kubectl(&["-n", SYSTEM_NS, "get", kind, "-l", "app.kubernetes.io/instance=lacuna", "-o", "name"])?;
        ensure!(
            found.lines().any(|l| l.ends_with(&format!("/{name}"))),
            "the chart installed no {kind} {name}: {found}"
        );
    }
    // The external-database variant of the chart passes the server's validation too.
    let out = w
        .env
        .tool("helm")
        .args(["template", "lacuna-ext"])
        .arg(repo().join("charts/lacuna"))
        .args(["--namespace", SYSTEM_NS, "--set", "postgresql.mode=external,postgresql.external.existingSecret=pg"])
        .output()?;
    ensure!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let (ok, _, err) = w.kubectl_stdin(
        &["-n", SYSTEM_NS, "apply", "--dry-run=server", "-f", "-"],
        &String::from_utf8_lossy(&out.stdout),
    )?;
    ensure!(ok, "server-side dry run of the external-database chart: {err}");
    // Every example manifest, as `kubectl apply -f examples/pipeline/` sends it.
    let ns = "e2e-examples";
    w.create_namespace(ns)?;
    let dir = repo().join("examples/pipeline");
    let out = w.kubectl(&["-n", ns, "apply", "--dry-run=server", "-f", &dir.display().to_string()])?;
    let files = std::fs::read_dir(&dir)?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "yaml")))
        .count();
    ensure!(
        out.lines().filter(|l| l.contains("(server dry run)")).count() == files,
        "not every example was accepted:\n{out}"
    );
    Ok(())
}

fn least_privilege(w: &World) -> Result<()> {
    let can = |args: &[&str]| -> Result<bool> {
        let out = w
            .env
            .tool("kubectl")
            .env("KUBECONFIG", &w.operator_kubeconfig)
            .args(["auth", "can-i"])
            .args(args)
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match answer.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => bail!("kubectl auth can-i {args:?}: {answer} {}", String::from_utf8_lossy(&out.stderr)),
        }
    };
    let needed: &[&[&str]] = &[
        &["watch", "sparsepretrainjobs.lacuna.dev", "--all-namespaces"],
        &["patch", "finetunejobs.lacuna.dev", "-n", "team-a"],
        &["patch", "quantizejobs.lacuna.dev", "--subresource=status", "-n", "team-a"],
        &["create", "jobs.batch", "-n", "team-a"],
        &["patch", "configmaps", "-n", "team-a"],
        &["list", "pods", "--all-namespaces"],
        &["create", "deployments.apps", "-n", "team-a"],
        &["patch", "horizontalpodautoscalers.autoscaling", "-n", "team-a"],
        &["get", "leases.coordination.k8s.io/lacuna-operator", "-n", SYSTEM_NS],
    ];
    for a in needed {
        ensure!(can(a)?, "the chart's roles do not allow {a:?}");
    }
    let not_needed: &[&[&str]] = &[
        &["get", "secrets", "-n", SYSTEM_NS],
        &["list", "secrets", "--all-namespaces"],
        &["delete", "namespaces"],
        &["create", "pods", "-n", "team-a"],
        &["delete", "jobs.batch", "-n", "team-a"],
        &["get", "configmaps", "-n", "team-a"],
        &["patch", "leases.coordination.k8s.io/someone-else", "-n", SYSTEM_NS],
        &["create", "leases.coordination.k8s.io", "-n", "team-a"],
        &["delete", "customresourcedefinitions.apiextensions.k8s.io"],
        &["create", "clusterrolebindings.rbac.authorization.k8s.io"],
    ];
    for a in not_needed {
        ensure!(!can(a)?, "the chart's roles allow {a:?}, which the operator does not need");
    }
    // The operator itself runs with this token: it holds the Lease and has been refused nothing.
    let lease = w.get(SYSTEM_NS, &format!("lease/{LEASE}"))?.ok_or_else(|| anyhow!("no Lease {LEASE}"))?;
    ensure!(lease["spec"]["holderIdentity"].is_string(), "nobody holds the Lease: {lease}");
    let whoami = w
        .env
        .tool("kubectl")
        .env("KUBECONFIG", &w.operator_kubeconfig)
        .args(["auth", "whoami", "-o", "json"])
        .output()?;
    let who: Value = serde_json::from_slice(&whoami.stdout).context("kubectl auth whoami")?;
    let user = who["status"]["userInfo"]["username"].as_str().unwrap_or_default();
    ensure!(user.starts_with(&format!("system:serviceaccount:{SYSTEM_NS}:")), "the operator runs as {user}");
    let groups = who["status"]["userInfo"]["groups"].to_string();
    ensure!(!groups.contains("system:masters"), "the operator's token is in {groups}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Job resources

fn report(uri: &str, sha: char) -> Value {
    json!({"result": "Succeeded", "output": {"uri": uri, "sha256": sha.to_string().repeat(64), "sparsity": 0.5}})
}

fn phase(w: &World, ns: &str, resource: &str) -> Result<Option<(String, Value)>> {
    Ok(w.get(ns, resource)?.map(|o| (o["status"]["phase"].as_str().unwrap_or_default().to_owned(), o)))
}

fn wait_phase(w: &World, ns: &str, resource: &str, want: &str) -> Result<Value> {
    w.wait_for(&format!("{ns}/{resource} in phase {want}"), Duration::from_secs(60), || {
        Ok(phase(w, ns, resource)?.and_then(|(p, o)| (p == want).then_some(o)))
    })
}

/// Owner reference of `child` names `owner` as its controller.
fn owned_by(child: &Value, owner: &Value) -> Result<()> {
    let refs = child["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
    let uid = &owner["metadata"]["uid"];
    ensure!(
        refs.iter().any(|r| r["uid"] == *uid && r["controller"] == true && r["kind"] == owner["kind"]),
        "{} {} is not controlled by {} (ownerReferences {refs:?})",
        child["kind"],
        child["metadata"]["name"],
        owner["metadata"]["name"]
    );
    Ok(())
}

/// Runs both stages of a SparsePretrainJob to Succeeded; returns the final object.
fn run_pretrain(w: &World, ns: &str, name: &str) -> Result<Value> {
    let prune = w.wait_stage_job(ns, "SparsePretrainJob", name, "prune")?;
    w.finish_job(ns, &prune, &report(&format!("pvc://models/e2e/{name}-pruned"), 'a'), true)?;
    let pretrain = w.wait_stage_job(ns, "SparsePretrainJob", name, "pretrain")?;
    w.finish_job(ns, &pretrain, &report(&format!("pvc://models/e2e/{name}"), 'b'), true)?;
    wait_phase(w, ns, &format!("sparsepretrainjob/{name}"), "Succeeded")
}

fn pretrain_job_succeeds(w: &World) -> Result<()> {
    let ns = "e2e-pretrain";
    w.create_namespace(ns)?;
    w.apply(ns, &spj("sp50", json!({"uri": "pvc://models/base/smollm2"})))?;
    let prune = w.wait_stage_job(ns, "SparsePretrainJob", "sp50", "prune")?;
    let owner = w.get(ns, "sparsepretrainjob/sp50")?.ok_or_else(|| anyhow!("sp50 is gone"))?;
    owned_by(&prune, &owner)?;
    let finalizers = owner["metadata"]["finalizers"].to_string();
    ensure!(finalizers.contains("lacuna.dev"), "no finalizer on the resource: {finalizers}");
    // The recipe ConfigMap the stage mounts, owned the same way.
    let cms = w.list(ns, "configmaps", "lacuna.dev/name=sp50")?;
    ensure!(!cms.is_empty(), "no recipe ConfigMap");
    for cm in &cms {
        owned_by(cm, &owner)?;
    }
    let running = wait_phase(w, ns, "sparsepretrainjob/sp50", "Pending")
        .or_else(|_| wait_phase(w, ns, "sparsepretrainjob/sp50", "Running"))?;
    ensure!(running["status"]["stage"] == "prune", "status.stage {}", running["status"]["stage"]);

    let done = run_pretrain(w, ns, "sp50")?;
    let ready = condition(&done, "Ready").ok_or_else(|| anyhow!("no Ready condition: {}", done["status"]))?;
    ensure!(ready["status"] == "True" && ready["reason"] == "Succeeded", "Ready: {ready}");
    ensure!(done["status"]["output"]["uri"] == "pvc://models/e2e/sp50", "output {}", done["status"]["output"]);
    let stages: Vec<&str> =
        done["status"]["stages"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    ensure!(stages == ["prune", "pretrain"], "stages {stages:?}");
    // The second stage read the first stage's output.
    let jobs = w.stage_jobs(ns, "SparsePretrainJob", "sp50")?;
    ensure!(jobs.len() == 2, "{} stage Jobs", jobs.len());
    let pretrain = jobs
        .iter()
        .find(|j| j["metadata"]["labels"]["lacuna.dev/stage"] == "pretrain")
        .ok_or_else(|| anyhow!("no pretrain Job"))?;
    ensure!(
        pretrain.to_string().contains("pvc://models/e2e/sp50-pruned"),
        "the pretrain Job does not read the pruned model"
    );

    // Lineage: both stages recorded under the resource's identity, with the reported checksums.
    let chain = w.lineage_chain(&format!("{ns}/sp50"))?;
    let runs: Vec<String> = chain
        .iter()
        .filter_map(|l| l.execution.as_ref())
        .map(|e| format!("{:?} {:?} {}", e.kind, e.state, e.resource))
        .collect();
    ensure!(runs.len() == 2, "lineage chain of {ns}/sp50: {runs:?}");
    ensure!(
        runs.iter().all(|r| r.contains("Succeeded") && r.contains(&format!("{ns}/sp50"))),
        "lineage chain: {runs:?}"
    );
    let last =
        chain.last().and_then(|l| l.artifact.as_ref()).ok_or_else(|| anyhow!("the chain ends in no artifact"))?;
    ensure!(last.sha256 == "b".repeat(64), "output checksum in lineage: {}", last.sha256);
    Ok(())
}

fn finetune_waits_for_producer(w: &World) -> Result<()> {
    let ns = "e2e-fromjob";
    w.create_namespace(ns)?;
    w.apply(ns, &ftj("ft", json!({"fromJob": "producer"})))?;
    let waiting = wait_phase(w, ns, "finetunejob/ft", "WaitingForInput")?;
    let input =
        condition(&waiting, "InputAvailable").ok_or_else(|| anyhow!("no InputAvailable: {}", waiting["status"]))?;
    ensure!(input["status"] == "False", "InputAvailable {input}");
    ensure!(w.stage_jobs(ns, "FineTuneJob", "ft")?.is_empty(), "a Job started before its input existed");

    w.apply(ns, &spj("producer", json!({"uri": "pvc://models/base/smollm2"})))?;
    let prune = w.wait_stage_job(ns, "SparsePretrainJob", "producer", "prune")?;
    w.finish_job(ns, &prune, &report("pvc://models/e2e/producer-pruned", 'c'), true)?;
    // Still waiting while the producer runs its second stage.
    let pretrain = w.wait_stage_job(ns, "SparsePretrainJob", "producer", "pretrain")?;
    ensure!(w.stage_jobs(ns, "FineTuneJob", "ft")?.is_empty(), "the FineTuneJob started before its producer finished");
    let ft = w.get(ns, "finetunejob/ft")?.ok_or_else(|| anyhow!("ft is gone"))?;
    ensure!(ft["status"]["phase"] == "WaitingForInput", "phase {} while the producer runs", ft["status"]["phase"]);
    w.finish_job(ns, &pretrain, &report("pvc://models/e2e/producer", 'd'), true)?;
    wait_phase(w, ns, "sparsepretrainjob/producer", "Succeeded")?;

    let job = w.wait_stage_job(ns, "FineTuneJob", "ft", "finetune")?;
    ensure!(
        job.to_string().contains("pvc://models/e2e/producer"),
        "the fine-tune Job does not read the producer's output"
    );
    let ft = w.get(ns, "finetunejob/ft")?.ok_or_else(|| anyhow!("ft is gone"))?;
    ensure!(ft["status"]["input"]["sha256"] == "d".repeat(64), "resolved input {}", ft["status"]["input"]);
    Ok(())
}

fn failing_job_surfaces_reason(w: &World) -> Result<()> {
    let ns = "e2e-failing";
    w.create_namespace(ns)?;
    w.apply(ns, &spj("doomed", json!({"uri": "pvc://models/base/smollm2"})))?;
    let prune = w.wait_stage_job(ns, "SparsePretrainJob", "doomed", "prune")?;
    let why =
        json!({"result": "Failed", "reason": "InputRejected", "message": "model.safetensors: truncated tensor blk.3"});
    w.finish_job(ns, &prune, &why, false)?;
    let failed = wait_phase(w, ns, "sparsepretrainjob/doomed", "Failed")?;
    let c = condition(&failed, "Failed").ok_or_else(|| anyhow!("no Failed condition: {}", failed["status"]))?;
    ensure!(c["status"] == "True" && c["reason"] == "InputRejected", "Failed condition {c}");
    ensure!(c["message"].as_str().unwrap_or_default().contains("truncated tensor blk.3"), "message {}", c["message"]);
    // No second stage after a failure.
    let jobs = w.stage_jobs(ns, "SparsePretrainJob", "doomed")?;
    ensure!(jobs.len() == 1, "{} Jobs after a failed first stage", jobs.len());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Serving

fn inference_service(w: &World) -> Result<()> {
    let ns = "e2e-serve";
    w.create_namespace(ns)?;
    let scaling = json!({"minReplicas": 1, "maxReplicas": 4, "target": {"cpuUtilization": 70}});
    w.apply(ns, &sis("chat", json!({"uri": "pvc://models/e2e/sp50"}), Some(scaling)))?;
    let owner = w.wait_for("SparseInferenceService chat", Duration::from_secs(30), || {
        w.get(ns, "sparseinferenceservice/chat")
    })?;
    for kind in ["deployment", "service", "horizontalpodautoscaler"] {
        let child =
            w.wait_for(&format!("the {kind} of chat"), Duration::from_secs(60), || w.get(ns, &format!("{kind}/chat")))?;
        owned_by(&child, &owner)?;
    }
    let hpa = w.get(ns, "horizontalpodautoscaler/chat")?.ok_or_else(|| anyhow!("no HPA"))?;
    ensure!(hpa["spec"]["maxReplicas"] == 4 && hpa["spec"]["scaleTargetRef"]["name"] == "chat", "HPA {}", hpa["spec"]);

    // Without an autoscaler, `kubectl scale` on the resource sets the Deployment's replicas.
    w.apply(ns, &sis("fixed", json!({"uri": "pvc://models/e2e/sp50"}), None))?;
    w.wait_for("the Deployment of fixed", Duration::from_secs(60), || w.get(ns, "deployment/fixed"))?;
    w.kubectl(&["-n", ns, "scale", "sparseinferenceservice/fixed", "--replicas=3"])?;
    w.wait_for("fixed scaled to 3", Duration::from_secs(60), || {
        Ok(w.get(ns, "deployment/fixed")?.filter(|d| d["spec"]["replicas"] == 3))
    })?;
    let scale: Value = serde_json::from_str(&w.kubectl(&[
        "-n",
        ns,
        "get",
        "--raw",
        &format!("/apis/lacuna.dev/v1alpha1/namespaces/{ns}/sparseinferenceservices/fixed/scale"),
    ])?)?;
    ensure!(scale["kind"] == "Scale" && scale["spec"]["replicas"] == 3, "scale subresource {scale}");
    ensure!(w.get(ns, "horizontalpodautoscaler/fixed")?.is_none(), "an HPA for a service without autoscaling");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Lifecycle

fn deletion_runs_finalizer(w: &World) -> Result<()> {
    let ns = "e2e-delete";
    w.create_namespace(ns)?;
    w.apply(ns, &spj("gone", json!({"uri": "pvc://models/base/smollm2"})))?;
    let job = w.wait_stage_job(ns, "SparsePretrainJob", "gone", "prune")?;
    let owner = w.wait_for("the finalizer on gone", Duration::from_secs(30), || {
        Ok(w.get(ns, "sparsepretrainjob/gone")?
            .filter(|o| o["metadata"]["finalizers"].to_string().contains("lacuna.dev")))
    })?;
    owned_by(&job, &owner)?;
    w.kubectl(&["-n", ns, "delete", "sparsepretrainjob/gone", "--wait=false"])?;
    w.wait_for("gone to be deleted (finalizer removed)", Duration::from_secs(60), || {
        Ok(w.get(ns, "sparsepretrainjob/gone")?.is_none().then_some(()))
    })?;
    // The deletion is in lineage (the record outlives the resource).
    let chain = w.lineage_chain(&format!("{ns}/gone"))?;
    let deleted = chain.iter().filter_map(|l| l.execution.as_ref()).any(|e| e.resource_deleted_at.is_some());
    ensure!(deleted, "lineage does not record the deletion: {chain:?}");
    Ok(())
}

fn restart_creates_no_duplicate(w: &World) -> Result<()> {
    let ns = "e2e-restart";
    w.create_namespace(ns)?;
    w.apply(ns, &spj("resumed", json!({"uri": "pvc://models/base/smollm2"})))?;
    let prune = w.wait_stage_job(ns, "SparsePretrainJob", "resumed", "prune")?;
    // Crash the leader mid-pipeline; a new process takes over once the Lease expires.
    let leader = w.leader().ok_or_else(|| anyhow!("no leader"))?;
    w.kill_operator(&leader)?;
    w.start_operator("operator-restarted")?;
    w.wait_for("the restarted operator to lead", Duration::from_secs(60), || Ok(w.leader().is_some().then_some(())))?;
    // It reconciles every resource it finds on start; once it has finished as many
    // SparsePretrainJob reconciles as there are such resources, the stage Job must be the same one.
    let all: Value =
        serde_json::from_str(&w.kubectl(&["get", "sparsepretrainjobs", "--all-namespaces", "-o", "json"])?)?;
    let count = all["items"].as_array().map_or(0, Vec::len) as u64;
    w.wait_for("the restarted operator to reconcile every SparsePretrainJob", Duration::from_secs(60), || {
        Ok((w.reconciles_done("operator-restarted", "SparsePretrainJob")? >= count).then_some(()))
    })?;
    let jobs = w.stage_jobs(ns, "SparsePretrainJob", "resumed")?;
    ensure!(jobs.len() == 1, "{} Jobs after the restart (want the one prune Job)", jobs.len());
    ensure!(jobs[0]["metadata"]["uid"] == prune["metadata"]["uid"], "the prune Job was replaced");
    let done = run_pretrain(w, ns, "resumed")?;
    let jobs = w.stage_jobs(ns, "SparsePretrainJob", "resumed")?;
    ensure!(jobs.len() == 2, "{} Jobs for two stages", jobs.len());
    ensure!(done["status"]["stages"].as_array().map(Vec::len) == Some(2), "stages {}", done["status"]["stages"]);
    Ok(())
}

fn leader_election(w: &World) -> Result<()> {
    let first = w.leader().ok_or_else(|| anyhow!("no leader"))?;
    let lease_renewed = |after: &str| -> Result<Option<()>> {
        let l = w.get(SYSTEM_NS, &format!("lease/{LEASE}"))?.ok_or_else(|| anyhow!("no Lease"))?;
        let renew = l["spec"]["renewTime"].as_str().unwrap_or_default();
        Ok((l["spec"]["holderIdentity"] == first && renew > after).then_some(()))
    };
    w.start_operator("operator-b")?;
    // The second one stands by while the first keeps renewing the Lease (a full lease period).
    w.wait_for("operator-b to stand by", Duration::from_secs(30), || {
        let ops = w.operators.lock().map_err(|_| anyhow!("poisoned"))?;
        Ok(ops
            .iter()
            .any(|o| o.identity == "operator-b" && o.log().contains("waiting to become the leader"))
            .then_some(()))
    })?;
    let since = w.get(SYSTEM_NS, &format!("lease/{LEASE}"))?.ok_or_else(|| anyhow!("no Lease"))?;
    let since = since["spec"]["renewTime"].as_str().unwrap_or_default().to_owned();
    w.wait_for("the leader to renew the Lease", Duration::from_secs(30), || lease_renewed(&since))?;
    let mid = w.get(SYSTEM_NS, &format!("lease/{LEASE}"))?.ok_or_else(|| anyhow!("no Lease"))?;
    let mid = mid["spec"]["renewTime"].as_str().unwrap_or_default().to_owned();
    w.wait_for("the leader to renew the Lease again", Duration::from_secs(30), || lease_renewed(&mid))?;
    let leading: Vec<String> = {
        let ops = w.operators.lock().map_err(|_| anyhow!("poisoned"))?;
        ops.iter().filter(|o| o.leads()).map(|o| o.identity.clone()).collect()
    };
    ensure!(leading == [first.clone()], "leading: {leading:?}");
    let lease = w.get(SYSTEM_NS, &format!("lease/{LEASE}"))?.ok_or_else(|| anyhow!("no Lease"))?;
    ensure!(lease["spec"]["holderIdentity"] == first, "Lease held by {}", lease["spec"]["holderIdentity"]);
    // The leader goes away; the standby takes over, and reconciles.
    w.kill_operator(&first)?;
    w.wait_for("operator-b to take the Lease", Duration::from_secs(60), || {
        Ok(w.get(SYSTEM_NS, &format!("lease/{LEASE}"))?.filter(|l| l["spec"]["holderIdentity"] == "operator-b"))
    })?;
    w.wait_for("operator-b to lead", Duration::from_secs(30), || {
        Ok((w.leader().as_deref() == Some("operator-b")).then_some(()))
    })?;
    let ns = "e2e-leader";
    w.create_namespace(ns)?;
    w.apply(ns, &spj("after-failover", json!({"uri": "pvc://models/base/smollm2"})))?;
    w.wait_stage_job(ns, "SparsePretrainJob", "after-failover", "prune")?;
    Ok(())
}

//! `lacuna apply -f manifest.yaml`: runs `lacuna.dev` manifests on one machine, as the operator
//! runs them in a cluster.
//!
//! The manifests are validated as the apiserver would (the generated CRD schemas, then the recipe
//! checks), ordered by their `fromJob` edges, and each job resource's stages (the same plan the
//! operator turns into `batch/v1` Jobs: `lacuna_api::crd::Stage`) run as child processes of this
//! binary with the pod's arguments and environment: `--recipe <stage>.yaml --model <input> --out
//! <output>`, the input's SHA-256 in `LACUNA_INPUT_SHA256` (a mismatch fails the stage with
//! `ChecksumMismatch` before it reads a weight), and the report written to `LACUNA_REPORT_PATH`.
//! `pvc://claim/path` is `<pvc-root>/claim/path` here. Each resource's status (phase, stage
//! outputs with their checksums) is kept in the state directory, so a later `apply` resolves
//! `fromJob` against it and skips a job whose spec and input are unchanged. The stages record
//! their runs in lineage (SQLite by default); the chain that led to the last resource is printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use lacuna_api::crd::common::{INPUT_SHA256_ENV, REPORT_PATH_ENV, conditions};
use lacuna_api::crd::manifest::{self, Manifest};
use lacuna_api::crd::stages::{recipe_file, stage_output};
use lacuna_api::crd::{ModelInput, ModelUri, OutputArtifact, PodReport, ResolvedInput, RunPolicy, Stage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::resolve::sibling;
use crate::stage::{EXIT_CHECKSUM_MISMATCH, OUTPUT_URI_ENV};

#[derive(Args)]
pub struct ApplyArgs {
    /// Manifest files, or directories whose `.yaml`/`.yml` files are applied in name order.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Where `pvc://<claim>/<path>` lives on this machine: `<pvc-root>/<claim>/<path>`
    /// (default: `pvc` in the cache, `$LACUNA_CACHE`).
    #[arg(long)]
    pub pvc_root: Option<PathBuf>,
    /// Where each resource's status is kept between runs (default: `apply` in the cache).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Namespace of resources whose metadata names none.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Start `lacuna serve` for a SparseInferenceService (in the foreground, after the jobs);
    /// without it, the command that serves the model is printed.
    #[arg(long)]
    pub serve: bool,
    /// Validate and print the plan; run nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// One manifest, with where it came from.
struct Item {
    file: PathBuf,
    namespace: String,
    manifest: Manifest,
}

impl Item {
    fn label(&self) -> String {
        format!("{} {}/{}", self.manifest.kind(), self.namespace, self.manifest.name())
    }

    fn model(&self) -> &ModelInput {
        self.manifest.model()
    }

    /// The job's stages, output URI and run policy; `None` for a service.
    fn job(&self) -> Result<Option<(Vec<Stage>, &str, &RunPolicy)>> {
        let r = match &self.manifest {
            Manifest::SparsePretrainJob(r) => (r.spec.stages()?, r.spec.output.uri.as_str(), &r.spec.run_policy),
            Manifest::FineTuneJob(r) => (r.spec.stages()?, r.spec.output.uri.as_str(), &r.spec.run_policy),
            Manifest::QuantizeJob(r) => (r.spec.stages()?, r.spec.output.uri.as_str(), &r.spec.run_policy),
            Manifest::SparseInferenceService(_) => return Ok(None),
        };
        Ok(Some(r))
    }

    /// Digest of the spec: a job whose spec and input are unchanged is not run again.
    fn spec_hash(&self, input: &ResolvedInput) -> Result<String> {
        let spec = match &self.manifest {
            Manifest::SparsePretrainJob(r) => serde_json::to_value(&r.spec)?,
            Manifest::FineTuneJob(r) => serde_json::to_value(&r.spec)?,
            Manifest::QuantizeJob(r) => serde_json::to_value(&r.spec)?,
            Manifest::SparseInferenceService(r) => serde_json::to_value(&r.spec)?,
        };
        let key = serde_json::json!({"kind": self.manifest.kind(), "spec": spec, "input": input});
        Ok(hex::encode(Sha256::digest(serde_json::to_vec(&key)?)))
    }
}

/// A job's status between runs (the local counterpart of `status` in the cluster).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalStatus {
    kind: String,
    phase: String,
    spec_hash: String,
    input: Option<ResolvedInput>,
    /// Finished stages: name → output.
    stages: BTreeMap<String, OutputArtifact>,
    output: Option<OutputArtifact>,
    reason: Option<String>,
    message: Option<String>,
}

struct Runner {
    pvc_root: PathBuf,
    state_dir: PathBuf,
    exe: PathBuf,
}

pub fn run(a: ApplyArgs) -> Result<()> {
    let items = load(&a.files, &a.namespace)?;
    let order = order(&items)?;
    let cache = lacuna_data::Cache::from_env()?;
    let runner = Runner {
        pvc_root: a.pvc_root.clone().unwrap_or_else(|| cache.root().join("pvc")),
        state_dir: a.state_dir.clone().unwrap_or_else(|| cache.root().join("apply")),
        exe: std::env::current_exe().context("locating the lacuna binary")?,
    };
    if a.dry_run {
        for &i in &order {
            let item = &items[i];
            println!("{} ({})", item.label(), item.file.display());
            if let Some((stages, out, _)) = item.job()? {
                for (k, s) in stages.iter().enumerate() {
                    let to = stage_output(out, s, k, stages.len())?;
                    println!("  {}: lacuna {} → {to}", s.name, s.command.join(" "));
                }
            }
        }
        return Ok(());
    }
    // A resource that fails does not stop the others; its consumers report what they wait for.
    let mut last = None;
    let mut failures = Vec::new();
    for &i in &order {
        let item = &items[i];
        let result = match item.job()? {
            Some((stages, out, policy)) => runner
                .run_job(item, &stages, out, policy)
                .and_then(|output| Ok(runner.local_path(&output.uri)?.display().to_string())),
            None => runner.serve(item, a.serve),
        };
        match result {
            Ok(target) => last = Some(target),
            Err(e) => {
                eprintln!("error: {e:#}");
                failures.push(item.label());
            }
        }
    }
    if let Some(target) = last {
        println!("\nlineage of {target}:");
        let show = crate::lineage::ShowArgs { target, db: std::env::var("LACUNA_LINEAGE_URL").ok(), json: false };
        crate::lineage::run(crate::lineage::LineageCmd::Show(show))?;
    }
    if !failures.is_empty() {
        bail!("{} of {} resources did not finish: {}", failures.len(), items.len(), failures.join(", "));
    }
    Ok(())
}

/// Every manifest of the given files and directories, validated; names unique per namespace.
fn load(paths: &[PathBuf], namespace: &str) -> Result<Vec<Item>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{}: no .yaml or .yml files", p.display());
            }
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    let mut items: Vec<Item> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let manifests = manifest::from_yaml(&text).with_context(|| format!("{}: invalid manifest", f.display()))?;
        for m in manifests {
            let ns = m.namespace().unwrap_or(namespace).to_owned();
            let item = Item { file: f.clone(), namespace: ns, manifest: m };
            if let Some(other) = items.iter().find(|o| {
                o.namespace == item.namespace && o.manifest.name() == item.manifest.name() && is_job(o) == is_job(&item)
            }) {
                bail!("{}: {} is also defined in {}", item.file.display(), item.label(), other.file.display());
            }
            items.push(item);
        }
    }
    Ok(items)
}

fn is_job(item: &Item) -> bool {
    !matches!(item.manifest, Manifest::SparseInferenceService(_))
}

/// Resources in an order where each `fromJob` producer of this batch runs before its consumer.
fn order(items: &[Item]) -> Result<Vec<usize>> {
    let producer = |i: usize| -> Option<usize> {
        let from = items[i].model().from_job.as_deref()?;
        items.iter().position(|p| is_job(p) && p.namespace == items[i].namespace && p.manifest.name() == from)
    };
    let mut done = vec![false; items.len()];
    let mut order = Vec::new();
    while order.len() < items.len() {
        let before = order.len();
        for i in 0..items.len() {
            if !done[i] && producer(i).is_none_or(|p| done[p]) {
                done[i] = true;
                order.push(i);
            }
        }
        if order.len() == before {
            let stuck: Vec<String> = (0..items.len()).filter(|&i| !done[i]).map(|i| items[i].label()).collect();
            bail!("fromJob inputs form a cycle: {}", stuck.join(", "));
        }
    }
    Ok(order)
}

impl Runner {
    /// The local path of a model URI.
    fn local_path(&self, uri: &str) -> Result<PathBuf> {
        match ModelUri::parse("model.uri", uri)? {
            ModelUri::Pvc { claim, path } => Ok(self.pvc_root.join(claim).join(path)),
            ModelUri::File { path } => Ok(PathBuf::from(path)),
            ModelUri::S3 { .. } => {
                bail!(
                    "{uri}: `lacuna apply` keeps its models on this machine (pvc://, file://); s3:// models are for \
                     stages in a cluster, or a stage run directly (lacuna prune --model s3://… --out s3://…)"
                )
            }
        }
    }

    fn status_path(&self, item: &Item) -> PathBuf {
        self.state_dir.join(&item.namespace).join(format!("{}.json", item.manifest.name()))
    }

    fn load_status(&self, namespace: &str, name: &str) -> Result<Option<LocalStatus>> {
        let path = self.state_dir.join(namespace).join(format!("{name}.json"));
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the status atomically (temporary file, fsync, rename).
    fn save_status(&self, item: &Item, status: &LocalStatus) -> Result<()> {
        let path = self.status_path(item);
        let dir = path.parent().context("status path")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&serde_json::to_vec_pretty(status)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The input of `item`: its URI, or the output of the job it names (which must have succeeded).
    fn resolve(&self, item: &Item) -> Result<ResolvedInput> {
        let model = item.model();
        match (&model.from_job, &model.uri) {
            (None, Some(uri)) => Ok(ResolvedInput { uri: uri.clone(), sha256: None, from_job: None }),
            (Some(job), None) => {
                let status = self.load_status(&item.namespace, job)?;
                match status {
                    Some(LocalStatus { output: Some(out), ref phase, .. }) if phase == "Succeeded" => {
                        Ok(ResolvedInput { uri: out.uri, sha256: out.sha256, from_job: Some(job.clone()) })
                    }
                    Some(s) => bail!(
                        "{}: waits for {job}, which is {}{} ({})",
                        item.label(),
                        s.phase,
                        s.message.map(|m| format!(": {m}")).unwrap_or_default(),
                        conditions::REASON_INPUT_NOT_READY
                    ),
                    None => bail!(
                        "{}: waits for {job}, which has not been applied here ({})",
                        item.label(),
                        conditions::REASON_INPUT_NOT_FOUND
                    ),
                }
            }
            _ => bail!("{}: spec.model: give exactly one of fromJob or uri", item.label()),
        }
    }

    fn run_job(&self, item: &Item, stages: &[Stage], output_uri: &str, policy: &RunPolicy) -> Result<OutputArtifact> {
        let input = self.resolve(item)?;
        let spec_hash = item.spec_hash(&input)?;
        let previous = self.load_status(&item.namespace, item.manifest.name())?.filter(|s| s.spec_hash == spec_hash);
        if let Some(LocalStatus { output: Some(out), phase, .. }) = &previous
            && phase == "Succeeded"
            && out.sha256.as_deref() == Some(sha256_or_empty(&self.local_path(&out.uri)?).as_str())
        {
            println!("{}: unchanged (Succeeded, output {})", item.label(), out.uri);
            return Ok(out.clone());
        }
        if policy.suspend {
            bail!("{}: spec.runPolicy.suspend is set; nothing run", item.label());
        }
        let mut status = LocalStatus {
            kind: item.manifest.kind().to_owned(),
            phase: "Running".into(),
            spec_hash,
            input: Some(input.clone()),
            // Stages finished by an earlier attempt at the same spec are not run again.
            stages: previous.map(|p| p.stages).unwrap_or_default(),
            ..Default::default()
        };
        self.save_status(item, &status)?;
        let mut stage_input = input;
        for (k, stage) in stages.iter().enumerate() {
            let out_uri = stage_output(output_uri, stage, k, stages.len())?;
            if let Some(done) = status.stages.get(stage.name).filter(|d| d.uri == out_uri)
                && let Ok(path) = self.local_path(&done.uri)
                && done.sha256.as_deref() == Some(sha256_or_empty(&path).as_str())
            {
                println!("{}: stage {} already done → {}", item.label(), stage.name, done.uri);
                stage_input = ResolvedInput { uri: done.uri.clone(), sha256: done.sha256.clone(), from_job: None };
                continue;
            }
            println!("{}: stage {} (lacuna {}) → {out_uri}", item.label(), stage.name, stage.command.join(" "));
            match self.run_stage(item, stage, &stage_input, &out_uri, policy) {
                Ok(out) => {
                    stage_input = ResolvedInput { uri: out.uri.clone(), sha256: out.sha256.clone(), from_job: None };
                    status.stages.insert(stage.name.to_owned(), out);
                    self.save_status(item, &status)?;
                }
                Err(StageFailure { reason, message }) => {
                    status.phase = "Failed".into();
                    status.reason = Some(reason.clone());
                    status.message = Some(format!("stage {}: {message}", stage.name));
                    self.save_status(item, &status)?;
                    bail!("{}: Failed ({reason}): stage {}: {message}", item.label(), stage.name);
                }
            }
        }
        let last = stages.last().context("a job without stages")?;
        let output = status.stages.get(last.name).cloned().context("the last stage's output")?;
        status.phase = "Succeeded".into();
        status.output = Some(output.clone());
        self.save_status(item, &status)?;
        println!("{}: Succeeded → {} (sha256 {})", item.label(), output.uri, short(output.sha256.as_deref()));
        Ok(output)
    }

    /// Runs one stage as the pod would, with `backoffLimit` retries (none for a checksum
    /// mismatch) and `activeDeadlineSeconds` as a time limit.
    fn run_stage(
        &self,
        item: &Item,
        stage: &Stage,
        input: &ResolvedInput,
        out_uri: &str,
        policy: &RunPolicy,
    ) -> Result<OutputArtifact, StageFailure> {
        let fail = |reason: &str, message: String| StageFailure { reason: reason.to_owned(), message };
        let stage_failed = |e: anyhow::Error| fail(conditions::REASON_STAGE_FAILED, format!("{e:#}"));
        let model = self.local_path(&input.uri).map_err(stage_failed)?;
        let out = self.local_path(out_uri).map_err(stage_failed)?;
        let dir = self.state_dir.join(&item.namespace).join(item.manifest.name());
        std::fs::create_dir_all(&dir).map_err(|e| stage_failed(e.into()))?;
        let recipe = dir.join(recipe_file(stage));
        std::fs::write(&recipe, &stage.recipe_yaml).map_err(|e| stage_failed(e.into()))?;
        let report = dir.join(format!("{}.report.json", stage.name));
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| stage_failed(e.into()))?;
        }
        let attempts = 1 + policy.backoff_limit.unwrap_or(0).max(0) as u32;
        let deadline = policy.active_deadline_seconds.map(|s| Instant::now() + Duration::from_secs(s.max(0) as u64));
        let mut last = None;
        for attempt in 1..=attempts {
            let _ = std::fs::remove_file(&report);
            let mut cmd = Command::new(&self.exe);
            cmd.args(stage.command)
                .arg("--recipe")
                .arg(&recipe)
                .arg("--model")
                .arg(&model)
                .arg("--out")
                .arg(&out)
                .env(REPORT_PATH_ENV, &report)
                .env("LACUNA_INPUT_URI", &input.uri)
                .env(OUTPUT_URI_ENV, out_uri)
                .env(
                    lacuna_lineage::RESOURCE_ENV,
                    lacuna_lineage::kubernetes_resource(
                        &item.namespace,
                        item.manifest.name(),
                        lacuna_lineage::LOCAL_UID,
                    ),
                )
                .env_remove(INPUT_SHA256_ENV);
            if let Some(sha) = &input.sha256 {
                cmd.env(INPUT_SHA256_ENV, sha);
            }
            // A retry replaces what a failed attempt left; a training stage resumes its checkpoint.
            if attempt > 1 || out.exists() {
                cmd.arg("--overwrite");
            }
            if stage.command.first() == Some(&"train") && sibling(&out, ".checkpoint").exists() {
                cmd.arg("--resume");
            }
            let code = wait(cmd, deadline).map_err(stage_failed)?;
            let reported = std::fs::read(&report).ok().and_then(|b| serde_json::from_slice::<PodReport>(&b).ok());
            match (code, reported) {
                (Some(0), Some(PodReport::Succeeded { output })) => return Ok(output),
                (Some(0), _) => {
                    last = Some(fail(conditions::REASON_STAGE_FAILED, "the stage wrote no report".into()));
                }
                (None, _) => {
                    return Err(fail(
                        conditions::REASON_DEADLINE_EXCEEDED,
                        format!(
                            "stopped after spec.runPolicy.activeDeadlineSeconds={:?}",
                            policy.active_deadline_seconds
                        ),
                    ));
                }
                (Some(c), Some(PodReport::Failed { reason, message })) => {
                    if c == i32::from(EXIT_CHECKSUM_MISMATCH) || reason == conditions::REASON_CHECKSUM_MISMATCH {
                        return Err(fail(&reason, message));
                    }
                    last = Some(fail(&reason, message));
                }
                (Some(c), _) => last = Some(fail(conditions::REASON_STAGE_FAILED, format!("exit code {c}"))),
            }
            if attempt < attempts {
                eprintln!("{}: stage {} failed (attempt {attempt} of {attempts}); retrying", item.label(), stage.name);
            }
        }
        let last = last.unwrap_or_else(|| fail(conditions::REASON_STAGE_FAILED, "no attempt ran".into()));
        Err(if attempts > 1 {
            StageFailure {
                reason: conditions::REASON_BACKOFF_LIMIT_EXCEEDED.to_owned(),
                message: format!("{} attempts; last: {}: {}", attempts, last.reason, last.message),
            }
        } else {
            last
        })
    }

    /// A service: its model is resolved and checked, its serving recorded in lineage, and
    /// `lacuna serve` started (with `serve`) or printed. Returns what the lineage chain is shown for.
    fn serve(&self, item: &Item, start: bool) -> Result<String> {
        let Manifest::SparseInferenceService(svc) = &item.manifest else { bail!("not a service") };
        let input = self.resolve(item)?;
        let model = self.local_path(&input.uri)?;
        if let Some(expected) = &input.sha256 {
            let actual = sha256_or_empty(&model);
            if &actual != expected {
                bail!(
                    "{}: Failed ({}): {} has SHA-256 {} but {} recorded {expected}",
                    item.label(),
                    conditions::REASON_CHECKSUM_MISMATCH,
                    model.display(),
                    short(Some(&actual)),
                    input.from_job.as_deref().unwrap_or("its producer")
                );
            }
        }
        let name = item.manifest.name().to_owned();
        crate::lineage::report_serving(&model, &item.namespace, &name, &item.spec_hash(&input)?);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--model".into(),
            model.display().to_string(),
            "--port".into(),
            svc.spec.port.to_string(),
        ];
        args.extend(svc.spec.args.iter().cloned());
        if start {
            println!("{}: serving {} on port {}", item.label(), input.uri, svc.spec.port);
            let status = Command::new(&self.exe).args(&args).status().context("starting lacuna serve")?;
            if !status.success() {
                bail!("{}: lacuna serve exited with {status}", item.label());
            }
        } else {
            println!("{}: ready; serve it with: lacuna {}", item.label(), args.join(" "));
        }
        Ok(format!("{}/{name}", item.namespace))
    }
}

struct StageFailure {
    reason: String,
    message: String,
}

/// Waits for the child; kills it at the deadline (`None`: killed).
fn wait(mut cmd: Command, deadline: Option<Instant>) -> Result<Option<i32>> {
    let mut child = cmd.spawn().context("starting the stage")?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status.code().unwrap_or(1)));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sha256_or_empty(path: &Path) -> String {
    lacuna_lineage::sha256_of_path(path).unwrap_or_default()
}

fn short(sha: Option<&str>) -> String {
    sha.map(|s| s.chars().take(12).collect()).unwrap_or_else(|| "-".into())
}

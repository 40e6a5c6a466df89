//! The world the scenarios share: one real API server with the CRDs and the Helm chart installed,
//! the operator binary run out of cluster under the chart's own ServiceAccount, and helpers that
//! play the parts no process plays here (the Job controller, the kubelet).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use lacuna_envtest::{Envtest, free_port};
use serde_json::{Value, json};

/// The chart's release and namespace, and the Lease name its Role allows.
pub const RELEASE: &str = "lacuna";
pub const SYSTEM_NS: &str = "lacuna-system";
pub const LEASE: &str = "lacuna-operator";
/// Lease validity given to the operators here, so that a takeover happens within seconds.
const LEASE_SECONDS: &str = "6";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The operator binary under test: `LACUNA_OPERATOR_BIN` (the image's build, as `.ci/run` makes
/// it) or this build's.
pub fn operator_bin() -> PathBuf {
    lacuna_envtest::binary_under_test("LACUNA_OPERATOR_BIN", env!("CARGO_BIN_EXE_lacuna-operator"))
}

/// One operator process, killed on drop.
pub struct Operator {
    pub identity: String,
    /// Port of its `/metrics` and `/health` server.
    pub port: u16,
    child: Child,
    log: PathBuf,
}

impl Operator {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn leads(&self) -> bool {
        self.log().contains("leading: reconciling")
    }

    /// SIGKILL: no lease release, no graceful shutdown (a crash or a node loss).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct World {
    pub env: Envtest,
    /// The chart's ServiceAccount token, as a kubeconfig.
    pub operator_kubeconfig: PathBuf,
    pub lineage_url: String,
    /// The operators running now (scenarios start, kill and restart them).
    pub operators: Mutex<Vec<Operator>>,
    started: Mutex<usize>,
}

impl World {
    pub fn setup(assets: &Path) -> Result<World> {
        let env = Envtest::start(assets).context("starting etcd and kube-apiserver")?;
        let repo = repo();
        // The CRDs as users install them, then Established.
        env.kubectl(&["apply", "-f", &repo.join("crds").display().to_string()])?;
        env.kubectl(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"])?;
        // The chart: its ServiceAccount, roles and bindings are what the operator runs with.
        let out = env
            .tool("helm")
            .args(["install", RELEASE])
            .arg(repo.join("charts/lacuna"))
            .args(["--namespace", SYSTEM_NS, "--create-namespace"])
            .output()
            .context("running helm")?;
        if !out.status.success() {
            bail!("helm install: {}", String::from_utf8_lossy(&out.stderr));
        }
        let sa = env.kubectl(&[
            "-n",
            SYSTEM_NS,
            "get",
            "serviceaccount",
            "-l",
            "app.kubernetes.io/instance=lacuna",
            "-o",
            "name",
        ])?;
        let sa = sa
            .trim()
            .strip_prefix("serviceaccount/")
            .ok_or_else(|| anyhow!("the chart made no ServiceAccount: {sa}"))?;
        let token = env.kubectl(&["-n", SYSTEM_NS, "create", "token", sa, "--duration=4h"])?;
        let operator_kubeconfig = env.dir().join("operator.kubeconfig");
        env.write_kubeconfig(&operator_kubeconfig, token.trim())?;
        let lineage_url = format!("sqlite://{}?mode=rwc", env.dir().join("lineage.db").display());
        let world =
            World { env, operator_kubeconfig, lineage_url, operators: Mutex::new(Vec::new()), started: Mutex::new(0) };
        world.start_operator("operator-a")?;
        world.wait_for("operator-a to lead", Duration::from_secs(60), || Ok(world.leader().is_some().then_some(())))?;
        Ok(world)
    }

    /// Starts one more operator process (it leads once it holds the Lease).
    pub fn start_operator(&self, identity: &str) -> Result<()> {
        let mut n = self.started.lock().map_err(|_| anyhow!("poisoned"))?;
        *n += 1;
        let log = self.env.dir().join(format!("{identity}-{n}.log"));
        let out = File::create(&log)?;
        let port = free_port()?;
        let child = Command::new(operator_bin())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--lease-name", LEASE, "--lease-namespace", SYSTEM_NS, "--lease-seconds", LEASE_SECONDS])
            .args(["--identity", identity, "--lineage-url", &self.lineage_url])
            .env("KUBECONFIG", &self.operator_kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", operator_bin().display()))?;
        self.operators.lock().map_err(|_| anyhow!("poisoned"))?.push(Operator {
            identity: identity.into(),
            port,
            child,
            log,
        });
        Ok(())
    }

    /// The identity of the operator process that says it leads, if one does.
    pub fn leader(&self) -> Option<String> {
        let ops = self.operators.lock().ok()?;
        ops.iter().find(|o| o.leads()).map(|o| o.identity.clone())
    }

    /// Reconciliations of `kind` that operator `identity` has finished (its `/metrics`).
    pub fn reconciles_done(&self, identity: &str, kind: &str) -> Result<u64> {
        use std::io::{Read as _, Write as _};
        let port = {
            let ops = self.operators.lock().map_err(|_| anyhow!("poisoned"))?;
            ops.iter()
                .find(|o| o.identity == identity)
                .map(|o| o.port)
                .ok_or_else(|| anyhow!("no operator {identity}"))?
        };
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(sock, "GET /metrics HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n")?;
        let mut text = String::new();
        sock.read_to_string(&mut text)?;
        let series = format!("lacuna_operator_reconcile_duration_seconds_count{{kind=\"{kind}\"}}");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64))
    }

    /// Kills the operator `identity` (SIGKILL) and forgets it.
    pub fn kill_operator(&self, identity: &str) -> Result<()> {
        let mut ops = self.operators.lock().map_err(|_| anyhow!("poisoned"))?;
        let i = ops.iter().position(|o| o.identity == identity).ok_or_else(|| anyhow!("no operator {identity}"))?;
        ops.remove(i).kill();
        Ok(())
    }

    /// Every operator log so far, for failure messages and the forbidden-call check.
    pub fn operator_logs(&self) -> String {
        let ops = self
            .operators
            .lock()
            .map(|o| o.iter().map(|o| format!("--- {}\n{}", o.identity, o.log())).collect::<Vec<_>>());
        ops.unwrap_or_default().join("\n")
    }

    /// Fails when an operator was refused a call (the chart's roles miss a verb) or panicked.
    pub fn check_operator_health(&self) -> Result<()> {
        let mut ops = self.operators.lock().map_err(|_| anyhow!("poisoned"))?;
        for o in ops.iter_mut() {
            let log = o.log();
            for needle in ["forbidden", "Forbidden", "panicked"] {
                if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                    bail!("operator {}: {line}", o.identity);
                }
            }
            if !o.is_running() {
                bail!("operator {} exited:\n{}", o.identity, log);
            }
        }
        Ok(())
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.env.kubectl(args)
    }

    /// `kubectl args…` with `input` on stdin: its status, stdout and stderr.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<(bool, String, String)> {
        use std::io::Write as _;
        let mut child = self
            .env
            .tool("kubectl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?.write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        ))
    }

    /// Creates (or updates) objects from a JSON or YAML document.
    pub fn apply(&self, ns: &str, manifest: &Value) -> Result<()> {
        let (ok, _, err) = self.kubectl_stdin(&["-n", ns, "apply", "-f", "-"], &manifest.to_string())?;
        if !ok {
            bail!("kubectl apply: {err}");
        }
        Ok(())
    }

    pub fn create_namespace(&self, ns: &str) -> Result<()> {
        self.kubectl(&["create", "namespace", ns]).map(|_| ())
    }

    /// One object as JSON, `None` when it does not exist.
    pub fn get(&self, ns: &str, resource: &str) -> Result<Option<Value>> {
        let out = self.env.tool("kubectl").args(["-n", ns, "get", resource, "-o", "json"]).output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("NotFound") || err.contains("not found") {
                return Ok(None);
            }
            bail!("kubectl get {resource}: {err}");
        }
        Ok(Some(serde_json::from_slice(&out.stdout)?))
    }

    /// The items of a list (`kubectl get jobs -l …`).
    pub fn list(&self, ns: &str, resource: &str, selector: &str) -> Result<Vec<Value>> {
        let out = self.kubectl(&["-n", ns, "get", resource, "-l", selector, "-o", "json"])?;
        let v: Value = serde_json::from_str(&out)?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `f` every 200 ms until it yields a value; an error names what was awaited, with the
    /// operators' logs.
    pub fn wait_for<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
        let t0 = Instant::now();
        let mut last_err = None;
        while t0.elapsed() < limit {
            match f() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let last = last_err.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
        bail!("timed out after {limit:?} waiting for {what}{last}\n{}", self.operator_logs())
    }

    /// The stage Jobs the operator made for one resource.
    pub fn stage_jobs(&self, ns: &str, kind: &str, name: &str) -> Result<Vec<Value>> {
        self.list(ns, "jobs", &format!("lacuna.dev/kind={kind},lacuna.dev/name={name}"))
    }

    /// Waits for the Job of `stage` and returns it.
    pub fn wait_stage_job(&self, ns: &str, kind: &str, name: &str, stage: &str) -> Result<Value> {
        self.wait_for(&format!("the {stage} Job of {kind} {ns}/{name}"), Duration::from_secs(60), || {
            let jobs = self.stage_jobs(ns, kind, name)?;
            Ok(jobs.into_iter().find(|j| j["metadata"]["labels"]["lacuna.dev/stage"] == stage))
        })
    }

    /// Plays the kubelet and the Job controller for a stage Job that ended: a pod of the Job whose
    /// container terminated with `report` as its termination message, then the Job's terminal
    /// conditions through the status subresource.
    pub fn finish_job(&self, ns: &str, job: &Value, report: &Value, succeeded: bool) -> Result<()> {
        let job_name = job["metadata"]["name"].as_str().ok_or_else(|| anyhow!("Job without a name"))?;
        let pod_name = format!("{job_name}-pod");
        let mut labels = job["spec"]["template"]["metadata"]["labels"].clone();
        labels["batch.kubernetes.io/job-name"] = json!(job_name);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "lacuna", "image": "lacuna:e2e"}]},
        });
        self.apply(ns, &pod)?;
        let now = "2026-01-01T00:00:00Z";
        let exit = if succeeded { 0 } else { 1 };
        let pod_status = json!({"status": {
            "phase": if succeeded { "Succeeded" } else { "Failed" },
            "containerStatuses": [{
                "name": "lacuna", "image": "lacuna:e2e", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit, "reason": if succeeded { "Completed" } else { "Error" },
                    "message": report.to_string(), "startedAt": now, "finishedAt": now}},
            }],
        }});
        self.kubectl(&[
            "-n",
            ns,
            "patch",
            "pod",
            &pod_name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &pod_status.to_string(),
        ])?;
        let cond = |t: &str, reason: &str| {
            json!({"type": t, "status": "True", "reason": reason, "message": "set by the e2e suite",
                   "lastProbeTime": now, "lastTransitionTime": now})
        };
        let status = if succeeded {
            json!({"status": {"startTime": now, "completionTime": now, "active": 0, "ready": 0, "succeeded": 1,
                "terminating": 0, "uncountedTerminatedPods": {},
                "conditions": [cond("SuccessCriteriaMet", "CompletionsReached"), cond("Complete", "CompletionsReached")]}})
        } else {
            json!({"status": {"startTime": now, "active": 0, "ready": 0, "failed": 1, "terminating": 0,
                "uncountedTerminatedPods": {},
                "conditions": [cond("FailureTarget", "BackoffLimitExceeded"), cond("Failed", "BackoffLimitExceeded")]}})
        };
        self.kubectl(&[
            "-n",
            ns,
            "patch",
            "job",
            job_name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])?;
        Ok(())
    }

    /// The lineage chain the operators recorded for `query` (`namespace/name`, a uri, …).
    pub fn lineage_chain(&self, query: &str) -> Result<Vec<lacuna_lineage::ChainLink>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let store = lacuna_lineage::LineageStore::connect(&self.lineage_url).await?;
            Ok(store.chain(query).await?)
        })
    }
}

/// A condition of a resource's status by type.
pub fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

//! etcd and kube-apiserver on free loopback ports, stopped (and their files removed) on drop.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tempfile::TempDir;

use crate::{Pki, https_get};

/// The environment variable naming the directory with `kube-apiserver`, `etcd`, `kubectl`, `helm`.
pub const ASSETS_ENV: &str = "LACUNA_ENVTEST_ASSETS";

/// The assets directory, `Ok(None)` when the variable is unset (tests then say they skipped),
/// an error when it is set but incomplete.
pub fn assets_dir() -> Result<Option<PathBuf>> {
    let Some(dir) = std::env::var_os(ASSETS_ENV) else { return Ok(None) };
    let dir = PathBuf::from(dir);
    for bin in ["kube-apiserver", "etcd", "kubectl", "helm"] {
        if !dir.join(bin).is_file() {
            bail!("{ASSETS_ENV}={}: no {bin} there (scripts/envtest-assets.sh prepares the directory)", dir.display());
        }
    }
    Ok(Some(dir))
}

/// A binary under test: the path in `env` when set (`.ci/run` points it at the build the
/// Dockerfile makes), else `default` (this build's, from `env!("CARGO_BIN_EXE_…")`).
pub fn binary_under_test(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| default.into())
}

/// Writes a kubeconfig for the API server at `server` (trusting the CA in `ca`) that authenticates
/// with a bearer `token`.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> Result<()> {
    let cfg = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "user", "user": {"token": token}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "user", "namespace": "default"}}],
        "current-context": "envtest",
    });
    std::fs::write(path, serde_json::to_vec_pretty(&cfg)?).with_context(|| format!("writing {}", path.display()))
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running API server. Users: `admin` (token [`Envtest::admin_token`], group `system:masters`);
/// service accounts through `kubectl create token`.
pub struct Envtest {
    dir: TempDir,
    assets: PathBuf,
    etcd: Child,
    apiserver: Child,
    pub port: u16,
    pub ca_pem: String,
    pub admin_token: String,
    admin_kubeconfig: PathBuf,
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Envtest {
    /// Starts etcd and the API server and waits (up to two minutes) for `/readyz`.
    pub fn start(assets: &Path) -> Result<Envtest> {
        // etcd's fsyncs are the slow part of every write: keep its data in memory where possible.
        let base = Path::new("/dev/shm");
        let dir =
            if base.is_dir() { tempfile::Builder::new().prefix("envtest").tempdir_in(base) } else { TempDir::new() }
                .context("creating the envtest directory")?;
        let d = dir.path();
        let pki = Pki::generate()?;
        pki.write_to(d)?;
        let admin_token = format!("admin-{}", std::process::id());
        std::fs::write(d.join("tokens.csv"), format!("{admin_token},admin,admin,system:masters\n"))?;

        let (client, peer) = (free_port()?, free_port()?);
        let etcd_args: Vec<String> = vec![
            "--name=envtest".into(),
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=envtest=http://127.0.0.1:{peer}"),
            "--listen-metrics-urls=".into(),
        ];
        let mut etcd = spawn(&assets.join("etcd"), &etcd_args, &d.join("etcd.log"))?;

        let port = free_port()?;
        let f = |name: &str| d.join(name).display().to_string();
        let api_args: Vec<String> = vec![
            format!("--etcd-servers=http://127.0.0.1:{client}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--advertise-address=127.0.0.1".into(),
            format!("--tls-cert-file={}", f("serving.crt")),
            format!("--tls-private-key-file={}", f("serving.key")),
            format!("--client-ca-file={}", f("ca.crt")),
            format!("--token-auth-file={}", f("tokens.csv")),
            format!("--service-account-key-file={}", f("sa.pub")),
            format!("--service-account-signing-key-file={}", f("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--authorization-mode=RBAC".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--endpoint-reconciler-type=none".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            format!("--cert-dir={}", f("certs")),
        ];
        let apiserver = match spawn(&assets.join("kube-apiserver"), &api_args, &d.join("apiserver.log")) {
            Ok(c) => c,
            Err(e) => {
                let _ = etcd.kill();
                return Err(e);
            }
        };
        let admin_kubeconfig = d.join("admin.kubeconfig");
        // From here on, dropping `env` on an error stops both processes.
        let mut env = Envtest {
            dir,
            assets: assets.to_owned(),
            etcd,
            apiserver,
            port,
            ca_pem: pki.ca_pem,
            admin_token,
            admin_kubeconfig,
        };
        env.write_kubeconfig(&env.admin_kubeconfig, &env.admin_token)?;
        env.wait_ready(Duration::from_secs(120))?;
        Ok(env)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < limit {
            let exited = match (self.apiserver.try_wait()?, self.etcd.try_wait()?) {
                (Some(status), _) => Some(format!("kube-apiserver exited with {status}")),
                (_, Some(status)) => Some(format!("etcd exited with {status}")),
                _ => None,
            };
            if let Some(what) = exited {
                return Err(self.startup_error(&what));
            }
            match https_get(self.port, &self.ca_pem, &self.admin_token, "/readyz") {
                Ok((200, body)) if body.trim() == "ok" => return Ok(()),
                Ok((code, body)) => last = format!("{code} {}", body.lines().last().unwrap_or_default()),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(self.startup_error(&format!("not ready after {limit:?} (last answer: {last})")))
    }

    fn startup_error(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "kube-apiserver: {what}\n--- apiserver.log\n{}\n--- etcd.log\n{}",
            tail(&self.dir.path().join("apiserver.log")),
            tail(&self.dir.path().join("etcd.log"))
        )
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A scratch directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Writes a kubeconfig for this server authenticating with `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        write_kubeconfig(path, &self.url(), &self.dir.path().join("ca.crt"), token)
    }

    /// `kubectl` (or `helm`) from the assets, as the admin.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(self.assets.join(name));
        c.env("KUBECONFIG", &self.admin_kubeconfig).env("HOME", self.dir.path());
        c
    }

    /// Runs `kubectl args…` as the admin; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.tool("kubectl").args(args).output().context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The API server's log so far (for failure messages).
    pub fn apiserver_log_tail(&self) -> String {
        tail(&self.dir.path().join("apiserver.log"))
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

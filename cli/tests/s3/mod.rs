//! `s3://` models: a stage reads its input from an S3 bucket and writes its output there, against
//! a real S3 API (moto's server, with boto3 as the independent client that uploads the input and
//! downloads the result).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{lacuna, tiny_model};

/// moto's S3 server on a free port, stopped on drop.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    fn start() -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/test-deps.sh installs moto)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(60), "moto's S3 server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server { child, endpoint }
    }

    fn env(&self, c: &mut Command) {
        c.env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_DEFAULT_REGION", "us-east-1");
    }

    /// boto3: `op` is `put DIR BUCKET PREFIX`, `get BUCKET PREFIX DIR` or `mb BUCKET`.
    fn boto(&self, args: &[&str]) {
        const SCRIPT: &str = r#"
import os, sys, boto3
s3 = boto3.client("s3")
op = sys.argv[1]
if op == "mb":
    s3.create_bucket(Bucket=sys.argv[2])
elif op == "put":
    src, bucket, prefix = sys.argv[2:5]
    for root, _, files in os.walk(src):
        for f in files:
            p = os.path.join(root, f)
            s3.upload_file(p, bucket, prefix + "/" + os.path.relpath(p, src))
    s3.put_object(Bucket=bucket, Key=prefix + "/lacuna.complete", Body=b"complete\n")
elif op == "get":
    bucket, prefix, dst = sys.argv[2:5]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix) + 1:]
            p = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            s3.download_file(bucket, o["Key"], p)
"#;
        let mut c = Command::new("python3");
        c.arg("-c").arg(SCRIPT).args(args);
        self.env(&mut c);
        let out = c.output().unwrap();
        assert!(out.status.success(), "boto3 {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

fn prune(model: &str, out: &str, cache: &Path, report: &Path, s3: Option<&S3Server>) -> std::process::Output {
    let mut c = lacuna();
    c.args(["prune", "--model", model, "--method", "magnitude", "--sparsity", "0.5", "--out", out])
        .env("LACUNA_CACHE", cache)
        .env("LACUNA_LINEAGE_URL", "off")
        .env("LACUNA_REPORT_PATH", report);
    if let Some(s) = s3 {
        s.env(&mut c);
    }
    c.output().unwrap()
}

#[test]
fn a_stage_reads_and_writes_s3_models() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_model(root, 21);
    let s3 = S3Server::start();
    s3.boto(&["mb", "models"]);
    s3.boto(&["put", model.to_str().unwrap(), "models", "base/tiny"]);

    // A half-uploaded prefix (no completion marker) is refused, not read.
    s3.boto(&["mb", "partial"]);
    let mut c = Command::new("python3");
    c.args(["-c", "import boto3; boto3.client('s3').put_object(Bucket='partial', Key='m/config.json', Body=b'{}')"]);
    s3.env(&mut c);
    assert!(c.output().unwrap().status.success());
    let o = prune(
        "s3://partial/m",
        &root.join("never").display().to_string(),
        &root.join("c0"),
        &root.join("r0.json"),
        Some(&s3),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("lacuna.complete"), "{err}");

    // The same prune from S3 to S3 and locally: the same model files.
    let report = root.join("report.json");
    let o = prune("s3://models/base/tiny", "s3://models/pruned", &root.join("cache"), &report, Some(&s3));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let local_out = root.join("local-pruned");
    let o =
        prune(model.to_str().unwrap(), local_out.to_str().unwrap(), &root.join("cache2"), &root.join("r2.json"), None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let fetched = root.join("fetched");
    s3.boto(&["get", "models", "pruned", fetched.to_str().unwrap()]);
    assert!(fetched.join("lacuna.complete").exists(), "the marker is written");
    std::fs::remove_file(fetched.join("lacuna.complete")).unwrap();
    let names = |d: &Path| files(d).iter().map(|p| p.file_name().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(&fetched), names(&local_out));
    for f in files(&local_out) {
        let name = f.file_name().unwrap();
        if name == "lacuna_prune.json" {
            continue; // holds the input's path and the run's memory peak
        }
        assert!(std::fs::read(&f).unwrap() == std::fs::read(fetched.join(name)).unwrap(), "{name:?} differs");
    }
    // The report names the S3 output and the checksum of exactly what was uploaded.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["result"], "Succeeded");
    assert_eq!(r["output"]["uri"], "s3://models/pruned");
    assert_eq!(r["output"]["sha256"], lacuna_lineage::sha256_of_path(&fetched).unwrap().as_str());
    let bitmask = root.join("fetched-bitmask");
    s3.boto(&["get", "models", "pruned-bitmask", bitmask.to_str().unwrap()]);
    assert!(bitmask.join("config.json").exists(), "the bitmask form is uploaded beside it");
}

//! The operator binary opens a real TLS connection (to a local HTTPS server with a generated CA)
//! without panicking: with two rustls crypto providers compiled in (Cargo unifies features across
//! the packages of one build), its first HTTPS connection used to panic before any reconcile.
//! `LACUNA_OPERATOR_BIN` (set by `.ci/run`) makes it test the binary built as the image builds it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lacuna_envtest::{HttpsResponder, Pki, binary_under_test, write_kubeconfig};

#[test]
fn operator_completes_a_tls_handshake_without_panicking() {
    let pki = Pki::generate().unwrap();
    // What an API server says to a caller it does not authorise: the operator must exit with an error.
    let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"forbidden by the test","reason":"Forbidden","code":403}"#;
    let server = HttpsResponder::start(&pki, 403, status).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &pki.ca_pem).unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &server.url(), &dir.path().join("ca.crt"), "t").unwrap();

    let mut child = Command::new(binary_under_test("LACUNA_OPERATOR_BIN", env!("CARGO_BIN_EXE_lacuna-operator")))
        .args(["--listen", "127.0.0.1:0", "--lease-namespace", "default", "--identity", "tls-test"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!log.contains("panicked"), "the operator panicked:\n{log}");
    assert_ne!(out.status.code(), Some(101), "exit code 101 is a Rust panic:\n{log}");
    assert!(server.handshakes() >= 1, "no TLS handshake completed with the test server:\n{log}");
    assert!(!server.requests().is_empty(), "no HTTP request arrived over TLS:\n{log}");
    assert!(!out.status.success(), "a 403 from the API server is an error:\n{log}");
    assert!(log.contains("forbidden by the test"), "the server's answer is reported:\n{log}");
}

//! The `lacuna` binary opens a real TLS connection without panicking: an `s3://` model behind an
//! HTTPS endpoint (a local server with a generated CA, trusted through `SSL_CERT_FILE`). With two
//! rustls crypto providers compiled in, the first HTTPS connection of a process used to panic.
//! `LACUNA_BIN` (set by `.ci/run`) makes it test the binary built as the image builds it.

use std::process::Command;

use lacuna_envtest::{HttpsResponder, Pki, binary_under_test};

#[test]
fn s3_over_https_completes_a_tls_handshake_without_panicking() {
    let pki = Pki::generate().unwrap();
    let body =
        r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>not here</Message></Error>"#;
    let server = HttpsResponder::start(&pki, 404, body).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca.crt");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let out = Command::new(binary_under_test("LACUNA_BIN", env!("CARGO_BIN_EXE_lacuna")))
        .env("LACUNA_THREADS", "2")
        .args(["prune", "--model", "s3://models/base/tiny", "--method", "magnitude", "--sparsity", "0.5"])
        .arg("--out")
        .arg(tmp.path().join("out"))
        .env("LACUNA_CACHE", tmp.path().join("cache"))
        .env("LACUNA_LINEAGE_URL", "off")
        .env("AWS_ENDPOINT", server.url())
        .env("AWS_ENDPOINT_URL", server.url())
        .env_remove("AWS_ALLOW_HTTP")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("SSL_CERT_FILE", &ca)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "lacuna panicked:\n{err}");
    assert_ne!(out.status.code(), Some(101), "exit code 101 is a Rust panic:\n{err}");
    assert!(!out.status.success(), "a missing model is an error:\n{err}");
    assert!(server.handshakes() >= 1, "no TLS handshake completed with the test server:\n{err}");
    assert!(
        server.requests().iter().any(|r| r.starts_with("GET /models")),
        "no S3 request arrived over TLS: {:?}\n{err}",
        server.requests()
    );
    assert!(!tmp.path().join("out").exists(), "nothing written for a failed input");
}

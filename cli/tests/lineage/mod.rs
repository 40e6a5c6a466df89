//! `lacuna lineage show` through the built binary, on a SQLite database the test fills, and the
//! lineage `lacuna prune` reports (through an outage: spooled, then replayed by the next reader).

use std::path::Path;
use std::process::{Command, Output};

use lacuna_lineage::{
    ArtifactKind, ExecutionKind, ExecutionState, LineageOptions, LineageStore, NewArtifact, NewExecution,
    kubernetes_resource, sha256_of_path, sqlite_url,
};
use lacuna_tests::smollm2_gguf;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// `lacuna` with the lineage environment of this test only.
fn lacuna(args: &[&str], db: &str, spool: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lacuna"))
        .args(args)
        .env("LACUNA_THREADS", "2")
        .env("LACUNA_LINEAGE_URL", db)
        .env("LACUNA_LINEAGE_SPOOL", spool)
        .output()
        .expect("run lacuna")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

/// base → prune 50% → sparse pretrain → prune 70% → serve.
async fn populate(db: &str, spool: &Path) {
    let options = LineageOptions { spool_dir: Some(spool.to_path_buf()), ..Default::default() };
    let store = LineageStore::connect_with(db, options).await.unwrap();
    let mut input = store
        .record_artifact(&NewArtifact::new(ArtifactKind::Model, "file:///m/base.gguf", sha("base")))
        .await
        .unwrap();
    let stages = [
        (ExecutionKind::Prune, "prune-50", 0.5, 21.5),
        (ExecutionKind::Pretrain, "pretrain-50", 0.5, 14.25),
        (ExecutionKind::Prune, "prune-70", 0.7, 17.0),
    ];
    for (i, (kind, name, sparsity, ppl)) in stages.into_iter().enumerate() {
        let resource = kubernetes_resource("ml", name, &format!("uid-{i}"));
        let exec = store.start_execution(&NewExecution::new(kind, sha(name), resource), &[input]).await.unwrap();
        let mut out =
            NewArtifact::new(ArtifactKind::Model, format!("pvc://models/{name}"), sha(&format!("out-{name}")));
        out.sparsity = Some(sparsity);
        out.metrics.insert("perplexity".into(), ppl.into());
        input = store.record_artifact(&out).await.unwrap();
        store.finish_execution(&exec, ExecutionState::Succeeded, &[input.clone()], None).await.unwrap();
    }
    let serve = NewExecution::new(ExecutionKind::Serve, sha("svc"), kubernetes_resource("ml", "served-llama", "uid-s"));
    store.start_execution(&serve, &[input]).await.unwrap();
}

#[test]
fn lineage_show_prints_the_chain_for_people_and_machines() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_url(&dir.path().join("lineage.db"));
    let spool = dir.path().join("spool");
    tokio::runtime::Runtime::new().unwrap().block_on(populate(&db, &spool));

    let out = lacuna(&["lineage", "show", "served-llama", "--json"], &db, &spool);
    let v: Value = serde_json::from_str(&ok(&out, "lineage show --json")).expect("JSON on stdout");
    let chain = v["chain"].as_array().expect("a chain");
    let kinds: Vec<&Value> = chain.iter().map(|l| &l["execution"]["kind"]).collect();
    assert_eq!(kinds, [&Value::Null, &"prune".into(), &"pretrain".into(), &"prune".into(), &"serve".into()]);
    let sparsity: Vec<Option<f64>> = chain.iter().map(|l| l["artifact"]["sparsity"].as_f64()).collect();
    assert_eq!(sparsity, [None, Some(0.5), Some(0.5), Some(0.7), None]);
    assert_eq!(chain[0]["artifact"]["uri"], "file:///m/base.gguf");
    assert_eq!(chain[2]["artifact"]["metrics"]["perplexity"], 14.25);
    assert_eq!(chain[4]["execution"]["state"], "running");
    assert!(chain[4]["artifact"].is_null());

    // People: one line per link, arrows from the root on, sparsity and metrics on each model.
    let text = ok(&lacuna(&["lineage", "show", "served-llama"], &db, &spool), "lineage show");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[0].starts_with("file:///m/base.gguf [model sha256:") && !lines[0].contains('→'), "{text}");
    for l in &lines[1..] {
        assert!(l.starts_with("  → "), "{text}");
    }
    assert!(lines[1].contains("prune succeeded (ml/prune-50/uid-0") && lines[1].contains("sparsity 50.0%"), "{text}");
    assert!(lines[2].contains("pretrain succeeded") && lines[2].contains("perplexity 14.2500"), "{text}");
    assert!(lines[3].contains("→ pvc://models/prune-70 [model") && lines[3].contains("sparsity 70.0%"), "{text}");
    assert!(lines[4].contains("serve running (ml/served-llama/uid-s, since "), "{text}");

    // A sha256 prefix of the 50% model and a uri of the 70% one.
    let prefix = &sha("out-prune-50")[..10];
    let v: Value =
        serde_json::from_str(&ok(&lacuna(&["lineage", "show", prefix, "--json"], &db, &spool), "by sha")).unwrap();
    assert_eq!(v["chain"].as_array().unwrap().len(), 2);
    let text = ok(&lacuna(&["lineage", "show", "pvc://models/prune-70"], &db, &spool), "by uri");
    assert_eq!(text.lines().count(), 4, "{text}");

    // Unknown targets fail with the query named, not a panic.
    let out = lacuna(&["lineage", "show", "no-such-model"], &db, &spool);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-model") && !err.contains("panicked"), "{err}");
}

/// `lacuna prune` with the lineage database down still succeeds, warns and spools its records;
/// the next `lineage show` against a reachable database replays them and prints the chain.
#[test]
fn prune_reports_lineage_through_an_outage() {
    let gguf = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let out_dir = dir.path().join("pruned");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("postgres://lacuna@127.0.0.1:{closed}/lineage");
    let args = ["prune", "--model", gguf.to_str().unwrap(), "--method", "magnitude", "--sparsity", "0.5"];
    let out = lacuna(&[&args[..], &["--out", out_dir.to_str().unwrap()]].concat(), &dead, &spool);
    ok(&out, "prune with the lineage database down");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lineage database unreachable") && err.contains("spooled"), "{err}");

    let db = sqlite_url(&dir.path().join("lineage.db"));
    let show = lacuna(&["lineage", "show", out_dir.to_str().unwrap(), "--json"], &db, &spool);
    let v: Value = serde_json::from_str(&ok(&show, "lineage show after the outage")).unwrap();
    let chain = v["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{v}");
    let root = &chain[0]["artifact"];
    assert_eq!(root["sha256"], sha256_of_path(&gguf).unwrap(), "the input model is recorded by content");
    let pruned = &chain[1];
    assert_eq!(pruned["execution"]["kind"], "prune");
    assert_eq!(pruned["execution"]["state"], "succeeded");
    assert_eq!(pruned["artifact"]["sha256"], sha256_of_path(&out_dir).unwrap());
    let s = pruned["artifact"]["sparsity"].as_f64().unwrap();
    assert!((s - 0.5).abs() < 0.01, "sparsity {s}");
    let also = pruned["other_outputs"].as_array().unwrap();
    assert_eq!(also.len(), 1);
    assert!(also[0]["uri"].as_str().unwrap().ends_with("pruned-bitmask"), "{also:?}");
    assert!(!spool.join("outbox.jsonl").exists(), "the spool is drained");
}

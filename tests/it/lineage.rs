//! The lineage store: one suite, run against SQLite (a temporary file) and against the real
//! PostgreSQL (`LACUNA_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`, in a
//! fresh database created for the run and dropped afterwards). PostgreSQL being unreachable fails
//! the test; `.ci/run` starts it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lacuna_lineage::{
    ArtifactId, ArtifactKind, ExecutionId, ExecutionKind, ExecutionState, LineageError, LineageOptions, LineageStore,
    NewArtifact, NewExecution, kubernetes_resource,
};
use sha2::{Digest, Sha256};
use sqlx::any::AnyPoolOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = lacuna_lineage::sqlite_url(&dir.path().join("db/lineage.db"));
    suite("sqlite", url, dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_postgres() {
    let admin = std::env::var("LACUNA_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {admin} is unreachable ({e}): the lineage suite must run against it. \
                 Start it (.ci/run does) or point LACUNA_TEST_POSTGRES_URL at a server that may create databases."
            )
        });
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let name = format!("lacuna_lineage_{}_{nanos}", std::process::id());
    sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&pool).await.expect("create the test database");
    let mut url = url::Url::parse(&admin).expect("LACUNA_TEST_POSTGRES_URL is a URL");
    url.set_path(&format!("/{name}"));
    let dir = tempfile::tempdir().unwrap();
    // The suite runs as its own task so the database is dropped whether it passes or panics.
    let result = tokio::spawn(suite("postgres", url.to_string(), dir.path().to_path_buf())).await;
    let dropped = sqlx::raw_sql(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&pool).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
    dropped.expect("drop the test database");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn options(spool: &Path) -> LineageOptions {
    LineageOptions {
        spool_dir: Some(spool.to_path_buf()),
        connect_timeout: Duration::from_millis(500),
        retry_after: Duration::from_secs(60),
    }
}

/// Counts rows straight from the database, behind the store's back.
async fn count(url: &str, sql: &str, bind: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new().max_connections(1).connect(url).await.expect("test connection");
    let n: i64 = sqlx::query_scalar(sql).bind(bind).fetch_one(&pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    pool.close().await;
    n
}

fn model(uri: &str, content: &str, sparsity: Option<f64>) -> NewArtifact {
    let mut a = NewArtifact::new(ArtifactKind::Model, uri, sha(content));
    a.sparsity = sparsity;
    a
}

/// The whole suite against one database. `backend` only labels failures.
async fn suite(backend: &str, url: String, scratch: PathBuf) {
    let spool = scratch.join("spool");
    migrations_are_idempotent(&url, &spool).await;
    let store = LineageStore::connect_with(&url, options(&spool)).await.expect("connect");
    artifacts_dedupe(&store, &url).await;
    execution_and_events_are_one_transaction(&store, &url).await;
    chain_walks_a_pipeline(&store).await;
    deletion_is_recorded(&store, &url).await;
    a_run_reported_at_its_end_keeps_its_start(&store).await;
    outbox_replays_exactly_once(&url, &scratch).await;
    eprintln!("lineage suite passed on {backend}");
}

async fn migrations_are_idempotent(url: &str, spool: &Path) {
    for _ in 0..3 {
        LineageStore::connect_with(url, options(spool)).await.expect("connecting (and migrating) again");
    }
    let applied = count(url, "SELECT COUNT(*) FROM _sqlx_migrations WHERE description = $1", "lineage").await;
    assert_eq!(applied, 1, "the one migration is recorded once however often the store connects");
}

async fn artifacts_dedupe(store: &LineageStore, url: &str) {
    let a = model("file:///dedupe/base", "dedupe-base", None);
    let id = store.record_artifact(&a).await.unwrap();
    assert_eq!(store.record_artifact(&a).await.unwrap(), id, "a retried report returns the same id");
    // The same content elsewhere is another artifact; other content at the same place too.
    let moved = model("pvc://models/dedupe/base", "dedupe-base", None);
    let edited = model("file:///dedupe/base", "dedupe-base-2", None);
    assert_ne!(store.record_artifact(&moved).await.unwrap(), id);
    assert_ne!(store.record_artifact(&edited).await.unwrap(), id);
    assert_eq!(count(url, "SELECT COUNT(*) FROM artifacts WHERE uri LIKE $1", "%/dedupe/base").await, 3);

    // Re-recording merges metrics (new values win) and fills an unset sparsity, still one row.
    let mut again = a.clone();
    again.sparsity = Some(0.25);
    again.metrics.insert("perplexity".into(), 12.5.into());
    store.record_artifact(&again).await.unwrap();
    let mut later = a.clone();
    later.sparsity = Some(0.9);
    later.metrics.insert("accuracy".into(), 0.5.into());
    store.record_artifact(&later).await.unwrap();
    let got = store.artifact(&id).await.unwrap().expect("recorded");
    assert_eq!(got.sparsity, Some(0.25), "a recorded sparsity is never overwritten");
    assert_eq!(got.metrics.get("perplexity"), Some(&12.5.into()));
    assert_eq!(got.metrics.get("accuracy"), Some(&0.5.into()));
    assert_eq!(count(url, "SELECT COUNT(*) FROM artifacts WHERE id = $1", id.as_str()).await, 1);

    // Bad input is refused with the field named.
    let err = store.record_artifact(&NewArtifact::new(ArtifactKind::Model, "file:///x", "abc")).await.unwrap_err();
    assert!(matches!(err, LineageError::InvalidInput { field: "sha256", .. }), "{err}");
    let err = store.record_artifact(&model("file:///x", "x", Some(1.5))).await.unwrap_err();
    assert!(err.to_string().contains("sparsity"), "{err}");
}

async fn execution_and_events_are_one_transaction(store: &LineageStore, url: &str) {
    let known = store.record_artifact(&model("file:///tx/in", "tx-in", None)).await.unwrap();
    let unknown = ArtifactId::for_key("file:///tx/never-recorded", &sha("nothing"));
    let exec = NewExecution::new(ExecutionKind::Prune, sha("tx-spec"), "local:/tx/out");
    // The first input's event and the execution row are written before the unknown input fails.
    let err = store.start_execution(&exec, &[known.clone(), unknown.clone()]).await.unwrap_err();
    assert!(matches!(&err, LineageError::UnknownArtifact(id) if id == unknown.as_str()), "{err}");
    assert_eq!(count(url, "SELECT COUNT(*) FROM executions WHERE resource = $1", "local:/tx/out").await, 0);
    assert_eq!(count(url, "SELECT COUNT(*) FROM events WHERE execution_id = $1", exec.id().as_str()).await, 0);
    assert_eq!(store.pending().await.unwrap(), 0, "a refused record is an error, not spooled");

    // Started properly, then a finish naming an unknown output rolls back the state change too.
    let id = store.start_execution(&exec, std::slice::from_ref(&known)).await.unwrap();
    assert_eq!(id, exec.id());
    let out = store.record_artifact(&model("file:///tx/out", "tx-out", Some(0.5))).await.unwrap();
    let err = store.finish_execution(&id, ExecutionState::Succeeded, &[out.clone(), unknown], None).await.unwrap_err();
    assert!(matches!(err, LineageError::UnknownArtifact(_)), "{err}");
    let e = store.execution(&id).await.unwrap().expect("recorded");
    assert_eq!((e.state, e.finished_at), (ExecutionState::Running, None));
    assert_eq!(count(url, "SELECT COUNT(*) FROM events WHERE execution_id = $1", id.as_str()).await, 1);

    store.finish_execution(&id, ExecutionState::Succeeded, std::slice::from_ref(&out), Some("done")).await.unwrap();
    // Retried reports change nothing: one execution, one input and one output edge.
    store.start_execution(&exec, &[known]).await.unwrap();
    store.finish_execution(&id, ExecutionState::Succeeded, &[out], Some("done")).await.unwrap();
    let e = store.execution(&id).await.unwrap().unwrap();
    assert_eq!(e.state, ExecutionState::Succeeded, "a repeated start does not reopen a finished execution");
    assert_eq!(e.message.as_deref(), Some("done"));
    assert_eq!(count(url, "SELECT COUNT(*) FROM executions WHERE resource = $1", "local:/tx/out").await, 1);
    assert_eq!(count(url, "SELECT COUNT(*) FROM events WHERE execution_id = $1", id.as_str()).await, 2);

    let never_started = ExecutionId::for_key("local:/nowhere", "x");
    let err = store.finish_execution(&never_started, ExecutionState::Failed, &[], None).await.unwrap_err();
    assert!(matches!(err, LineageError::UnknownExecution(_)), "{err}");
    let err = store.finish_execution(&id, ExecutionState::Running, &[], None).await.unwrap_err();
    assert!(err.to_string().contains("state"), "{err}");
}

/// base → prune 50% → sparse pretrain → prune 70% → fine-tune → quantize → serve, each stage a
/// Kubernetes job with a recipe; the pretraining reads the pruned model from another uri (same
/// content) and lists its dataset before the model.
async fn chain_walks_a_pipeline(store: &LineageStore) {
    let base = store.record_artifact(&model("file:///chain/base.gguf", "chain-base", None)).await.unwrap();
    let stages: [(ExecutionKind, &str, Option<f64>, Option<&str>); 5] = [
        (ExecutionKind::Prune, "prune-50", Some(0.5), None),
        (ExecutionKind::Pretrain, "pretrain-50", Some(0.5), None),
        (ExecutionKind::Prune, "prune-70", Some(0.7), None),
        (ExecutionKind::Finetune, "finetune-70", Some(0.7), None),
        (ExecutionKind::Quantize, "quantize-70", Some(0.7), Some("int8")),
    ];
    let mut input = base.clone();
    for (i, (kind, name, sparsity, quant)) in stages.iter().enumerate() {
        let recipe = store
            .record_artifact(&NewArtifact::new(ArtifactKind::Recipe, format!("file:///chain/{name}.yaml"), sha(name)))
            .await
            .unwrap();
        let mut inputs = vec![input.clone(), recipe];
        if *kind == ExecutionKind::Pretrain {
            let data = store
                .record_artifact(&NewArtifact::new(ArtifactKind::Dataset, "s3://corpora/wiki", sha("wiki")))
                .await
                .unwrap();
            inputs.insert(0, data);
        }
        let resource = kubernetes_resource("chain", name, &format!("uid-{i}"));
        let exec = store.start_execution(&NewExecution::new(*kind, sha(name), resource), &inputs).await.unwrap();
        let content = format!("chain-{name}");
        let mut out = model(&format!("pvc://models/chain/{name}"), &content, *sparsity);
        out.quantization = quant.map(str::to_owned);
        out.metrics.insert("perplexity".into(), (10.0 + i as f64).into());
        let mut outputs = vec![store.record_artifact(&out).await.unwrap()];
        if *kind == ExecutionKind::Prune {
            let bitmask =
                model(&format!("pvc://models/chain/{name}-bitmask"), &format!("{content}-bitmask"), *sparsity);
            outputs.push(store.record_artifact(&bitmask).await.unwrap());
        }
        store.finish_execution(&exec, ExecutionState::Succeeded, &outputs, None).await.unwrap();
        // The next stage reads the same content through another uri when it is the pretraining.
        input = if stages.get(i + 1).is_some_and(|s| s.0 == ExecutionKind::Pretrain) {
            let copy = model(&format!("s3://handoff/{name}"), &content, *sparsity);
            store.record_artifact(&copy).await.unwrap()
        } else {
            outputs[0].clone()
        };
    }
    let serve =
        NewExecution::new(ExecutionKind::Serve, sha("serve"), kubernetes_resource("chain", "sparse-llama", "uid-s"));
    store.start_execution(&serve, &[input]).await.unwrap();

    let chain = store.chain("sparse-llama").await.unwrap();
    let kinds: Vec<Option<ExecutionKind>> = chain.iter().map(|l| l.execution.as_ref().map(|e| e.kind)).collect();
    use ExecutionKind::*;
    assert_eq!(
        kinds,
        vec![None, Some(Prune), Some(Pretrain), Some(Prune), Some(Finetune), Some(Quantize), Some(Serve)]
    );
    assert_eq!(chain[0].artifact.as_ref().unwrap().id, base, "the root is the base model");
    let sparsities: Vec<Option<f64>> = chain.iter().map(|l| l.artifact.as_ref().and_then(|a| a.sparsity)).collect();
    assert_eq!(sparsities, vec![None, Some(0.5), Some(0.5), Some(0.7), Some(0.7), Some(0.7), None]);
    let serve_link = chain.last().unwrap();
    assert!(serve_link.artifact.is_none(), "serving produces no model");
    assert_eq!(serve_link.execution.as_ref().unwrap().state, ExecutionState::Running);
    // Side inputs and other outputs are kept beside the followed path.
    let pretrain = &chain[2];
    let side: Vec<ArtifactKind> = pretrain.side_inputs.iter().map(|a| a.kind).collect();
    assert_eq!(side, vec![ArtifactKind::Dataset, ArtifactKind::Recipe], "the dataset is listed, the model followed");
    assert_eq!(chain[1].other_outputs.len(), 1);
    assert!(chain[1].other_outputs[0].uri.ends_with("prune-50-bitmask"));
    assert_eq!(chain[5].artifact.as_ref().unwrap().quantization.as_deref(), Some("int8"));

    // From an artifact: the quantized model's chain stops at the quantization.
    let from_uri = store.chain("pvc://models/chain/quantize-70").await.unwrap();
    assert_eq!(from_uri.len(), 6);
    assert_eq!(from_uri[..], chain[..6]);
    // From a sha256 prefix of the handed-over copy: found by content, its producer is prune-50.
    let prefix = &sha("chain-prune-50")[..12];
    let from_sha = store.chain(&format!("sha256:{prefix}")).await.unwrap();
    assert_eq!(from_sha.len(), 2);
    assert_eq!(from_sha[1].execution.as_ref().unwrap().resource, "chain/prune-50/uid-0");
    // Job names: bare, namespace/name, and the full resource string.
    assert_eq!(store.chain("chain/prune-70").await.unwrap().len(), 4);
    assert_eq!(store.chain("chain/finetune-70/uid-3").await.unwrap().len(), 5);

    // A name in two namespaces is ambiguous; unknown targets are errors naming the query.
    let other = NewExecution::new(Prune, sha("x"), kubernetes_resource("elsewhere", "prune-50", "uid-9"));
    store.start_execution(&other, &[base]).await.unwrap();
    let err = store.chain("prune-50").await.unwrap_err();
    assert!(
        matches!(&err, LineageError::Ambiguous { candidates, .. } if candidates.contains("elsewhere/prune-50")),
        "{err}"
    );
    let err = store.chain("no-such-job").await.unwrap_err();
    assert!(matches!(&err, LineageError::NotFound { query, .. } if query == "no-such-job"), "{err}");
}

/// A local stage reports its run when it has finished: the execution still spans the run.
async fn a_run_reported_at_its_end_keeps_its_start(store: &LineageStore) {
    let input = store.record_artifact(&model("file:///span/base", "span-base", None)).await.unwrap();
    let began =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 - 15 * 60 * 1000;
    let exec = NewExecution::new(ExecutionKind::Prune, sha("span"), "local:/runs/span");
    let id = store.start_execution_at(&exec, &[input], began).await.unwrap();
    store.finish_execution(&id, ExecutionState::Succeeded, &[], None).await.unwrap();
    let e = store.execution(&id).await.unwrap().expect("the execution is recorded");
    assert_eq!(e.started_at, began);
    let finished = e.finished_at.expect("finished");
    assert!(finished - e.started_at >= 15 * 60 * 1000, "span {} ms", finished - e.started_at);
}

async fn deletion_is_recorded(store: &LineageStore, url: &str) {
    let input = store.record_artifact(&model("file:///del/in", "del-in", None)).await.unwrap();
    let svc = kubernetes_resource("del", "svc", "uid-d");
    let serve = NewExecution::new(ExecutionKind::Serve, sha("svc"), svc.clone());
    let serve = store.start_execution(&serve, std::slice::from_ref(&input)).await.unwrap();
    let job = kubernetes_resource("del", "job", "uid-j");
    let prune = NewExecution::new(ExecutionKind::Prune, sha("job"), job.clone());
    let prune = store.start_execution(&prune, &[input]).await.unwrap();

    let first = store.record_deletion(&svc).await.unwrap();
    assert_eq!(store.record_deletion(&svc).await.unwrap(), first, "a retried deletion is one record");
    store.record_deletion(&job).await.unwrap();
    assert_eq!(count(url, "SELECT COUNT(*) FROM executions WHERE resource = $1 AND kind = 'delete'", &svc).await, 1);
    let d = store.execution(&first).await.unwrap().expect("deletion recorded");
    assert_eq!((d.kind, d.state), (ExecutionKind::Delete, ExecutionState::Succeeded));

    let s = store.execution(&serve).await.unwrap().unwrap();
    assert_eq!(s.state, ExecutionState::Succeeded, "serving ends when its service is deleted");
    assert_eq!(s.resource_deleted_at, d.finished_at);
    let p = store.execution(&prune).await.unwrap().unwrap();
    assert_eq!(p.state, ExecutionState::Cancelled, "a job deleted while running was cancelled");
    assert_eq!(p.message.as_deref(), Some("resource deleted"));
    let chain = store.chain("del/svc").await.unwrap();
    assert!(chain.last().unwrap().execution.as_ref().unwrap().resource_deleted_at.is_some());
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn outbox_replays_exactly_once(url: &str, scratch: &Path) {
    let spool = scratch.join("outbox-spool");
    let dead = format!("postgres://lacuna@127.0.0.1:{}/lineage", closed_port());
    let offline =
        LineageStore::connect_with(&dead, options(&spool)).await.expect("an unreachable database is not an error");
    let before = now_ms();

    let base = model("file:///outbox/base", "outbox-base", None);
    let base_id = offline.record_artifact(&base).await.expect("spooled");
    offline.record_artifact(&base).await.expect("spooled again (a retry)");
    let resource = kubernetes_resource("outbox", "prune", "uid-o");
    let exec = NewExecution::new(ExecutionKind::Prune, sha("o"), resource.clone());
    let exec = offline.start_execution(&exec, &[base_id]).await.unwrap();
    let out = offline.record_artifact(&model("file:///outbox/out", "outbox-out", Some(0.5))).await.unwrap();
    offline.finish_execution(&exec, ExecutionState::Succeeded, &[out], Some("spooled")).await.unwrap();
    offline.record_deletion(&resource).await.unwrap();
    assert_eq!(offline.pending().await.unwrap(), 6, "every record waits in the spool");
    assert!(matches!(offline.flush().await, Err(LineageError::Unavailable { .. })));
    assert!(matches!(offline.chain("outbox/prune").await, Err(LineageError::Unavailable { .. })));
    // A copy of the spool stands for a crash after replaying but before the spool was cleared.
    let copy = scratch.join("outbox-spool-copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(spool.join("outbox.jsonl"), copy.join("outbox.jsonl")).unwrap();

    // Connecting to a reachable database replays in order (the start names the artifact spooled
    // before it: out of order, the database would refuse it).
    let live = LineageStore::connect_with(url, options(&spool)).await.unwrap();
    assert_eq!(live.pending().await.unwrap(), 0);
    assert!(!spool.join("outbox.rejected.jsonl").exists(), "nothing refused");
    let replayed_again = LineageStore::connect_with(url, options(&copy)).await.unwrap();
    assert_eq!(replayed_again.pending().await.unwrap(), 0);
    assert!(!copy.join("outbox.rejected.jsonl").exists(), "a second replay is refused nowhere either");

    assert_eq!(count(url, "SELECT COUNT(*) FROM artifacts WHERE uri LIKE $1", "file:///outbox/%").await, 2);
    assert_eq!(count(url, "SELECT COUNT(*) FROM executions WHERE resource = $1", &resource).await, 2);
    assert_eq!(count(url, "SELECT COUNT(*) FROM events WHERE execution_id = $1", exec.as_str()).await, 2);
    let e = live.execution(&exec).await.unwrap().expect("arrived");
    assert_eq!(e.state, ExecutionState::Succeeded, "the deletion came after the finish: nothing was running");
    assert_eq!(e.message.as_deref(), Some("spooled"));
    assert!(e.started_at >= before && e.started_at <= e.finished_at.unwrap(), "replay keeps the original times");
    let chain = live.chain("outbox/prune").await.unwrap();
    assert_eq!(chain.len(), 2);
    assert!(chain[1].execution.as_ref().unwrap().resource_deleted_at.is_some());
}

//! [`LineageStore`]: the database side (PostgreSQL or SQLite through sqlx's `Any` driver, with
//! runtime-checked queries) and the outbox in front of it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row};
use tokio::sync::Mutex;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

use crate::LineageError;
use crate::model::{
    Artifact, ArtifactId, ArtifactKind, ChainLink, Execution, ExecutionId, ExecutionKind, ExecutionState, FlushReport,
    NewArtifact, NewExecution, file_uri, invalid, validate_resource,
};
use crate::outbox::{Record, Spool};
use crate::time::now_ms;

/// The migrations, embedded in the binary (the same SQL for both backends). Version and
/// description follow sqlx's file naming (`<version>_<description>.sql`), so `sqlx migrate` and
/// `sqlx::migrate!` would see the same history and checksums.
#[derive(Debug)]
struct EmbeddedMigrations;

impl<'s> MigrationSource<'s> for EmbeddedMigrations {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async {
            let sql = include_str!("../migrations/0001_lineage.sql");
            Ok::<_, BoxDynError>(vec![Migration::new(1, "lineage".into(), MigrationType::Simple, sql.into(), false)])
        })
    }
}

async fn migrator() -> Result<Migrator, MigrateError> {
    Migrator::new(EmbeddedMigrations).await
}

/// The spec hash of the execution that records a resource's deletion.
const DELETION_SPEC: &str = "deleted";

/// Longest chain walked (a guard against a corrupted, cyclic graph).
const MAX_CHAIN: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Postgres,
    Sqlite,
}

/// How a store connects and where it spools.
#[derive(Clone, Debug)]
pub struct LineageOptions {
    /// Spool directory (default: `$LACUNA_LINEAGE_SPOOL`, else `lineage-spool` in the Lacuna cache:
    /// `$LACUNA_CACHE`, `$XDG_CACHE_HOME/lacuna` or `~/.cache/lacuna`). One spool per lineage database: a flush replays everything
    /// in it into the database of the store that flushes.
    pub spool_dir: Option<PathBuf>,
    /// How long one attempt to reach the database may take before the record is spooled.
    pub connect_timeout: Duration,
    /// After a failed attempt, writes go straight to the spool for this long (a flush always tries).
    pub retry_after: Duration,
}

impl Default for LineageOptions {
    fn default() -> Self {
        LineageOptions {
            spool_dir: None,
            connect_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(30),
        }
    }
}

fn default_spool_dir() -> PathBuf {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = nonempty(crate::SPOOL_DIR_ENV) {
        return d;
    }
    // The cache root as `lacuna_data::Cache` finds it.
    let cache = nonempty("LACUNA_CACHE")
        .or_else(|| nonempty("XDG_CACHE_HOME").map(|c| c.join("lacuna")))
        .or_else(|| nonempty("HOME").map(|h| h.join(".cache/lacuna")))
        .unwrap_or_else(|| PathBuf::from(".lacuna-cache"));
    cache.join("lineage-spool")
}

/// Connection state shared by the writes; the mutex also keeps one store's writes in order.
struct ConnState {
    migrated: bool,
    offline_until: Option<Instant>,
    last_error: Option<String>,
}

/// Why a database operation did not happen.
enum Failure {
    /// The database could not be reached (or went away): spool and retry later.
    Unavailable(String),
    /// The database answered and refused, or the request is wrong: report it.
    Refused(LineageError),
}

/// Lineage in PostgreSQL or SQLite, with a durable outbox. See the crate documentation.
pub struct LineageStore {
    pool: AnyPool,
    backend: Backend,
    /// The URL with any password replaced, for messages.
    url: String,
    spool: Spool,
    retry_after: Duration,
    state: Mutex<ConnState>,
}

/// The URL with its password (if any) replaced, fit for logs and errors.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// The file of a `sqlite:` URL (None for an in-memory database).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8().ok()?;
    Some(PathBuf::from(decoded.into_owned()))
}

/// A `sqlite://` URL for the database file at `path` (created, with its directory, if missing).
pub fn sqlite_url(path: &Path) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::CONTROLS.add(b' ').add(b'%').add(b'?').add(b'#').add(b'"').add(b'<').add(b'>');
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("sqlite://{}?mode=rwc", percent_encoding::utf8_percent_encode(&abs.to_string_lossy(), SET))
}

impl LineageStore {
    /// Opens the lineage database at `url` (`postgres://…`, `postgresql://…`, or
    /// `sqlite://path?mode=rwc`), applies the migrations and replays the spool.
    ///
    /// An unreachable database is not an error: the store spools writes until it comes back. A URL
    /// it cannot parse, a database that refuses the migrations, or a spool it cannot create is.
    pub async fn connect(url: &str) -> Result<LineageStore, LineageError> {
        LineageStore::connect_with(url, LineageOptions::default()).await
    }

    /// [`LineageStore::connect`] with explicit options.
    pub async fn connect_with(url: &str, options: LineageOptions) -> Result<LineageStore, LineageError> {
        sqlx::any::install_default_drivers();
        let shown = redact(url);
        let bad = |reason: String| LineageError::InvalidUrl { url: shown.clone(), reason };
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            sqlx::postgres::PgConnectOptions::from_str(url).map_err(|e| bad(e.to_string()))?;
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(|e| bad(e.to_string()))?;
            if let Some(parent) = sqlite_file(url).as_deref().and_then(Path::parent)
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent)
                    .map_err(|e| LineageError::CreateDir { path: parent.to_path_buf(), source: e })?;
            }
            Backend::Sqlite
        } else {
            return Err(bad("expected postgres://, postgresql:// or sqlite:".to_owned()));
        };
        let connect = AnyConnectOptions::from_str(url).map_err(|e| bad(e.to_string()))?;
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(options.connect_timeout)
            .connect_lazy_with(connect);
        let spool = Spool::new(options.spool_dir.unwrap_or_else(default_spool_dir));
        let store = LineageStore {
            pool,
            backend,
            url: shown,
            spool,
            retry_after: options.retry_after,
            state: Mutex::new(ConnState { migrated: false, offline_until: None, last_error: None }),
        };
        match store.flush().await {
            // Unreachable is logged by `mark_offline`; writes will be spooled.
            Ok(_) | Err(LineageError::Unavailable { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    /// The database URL, password replaced.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where records wait while the database is unreachable.
    pub fn spool_dir(&self) -> &Path {
        self.spool.dir()
    }

    /// Records an artifact and returns its id; a known uri + sha256 returns the existing id (its
    /// metrics are merged, new values winning; sparsity and quantization fill in only if unset).
    pub async fn record_artifact(&self, artifact: &NewArtifact) -> Result<ArtifactId, LineageError> {
        artifact.validate()?;
        self.write(Record::Artifact { artifact: artifact.clone(), at: now_ms() }).await?;
        Ok(artifact.id())
    }

    /// Records that `execution` started, consuming `inputs` (recorded artifacts; the first model
    /// among them is the one a chain follows). Starting a known execution again is a no-op unless it
    /// had failed or been cancelled, when it is running again (a retry).
    pub async fn start_execution(
        &self,
        execution: &NewExecution,
        inputs: &[ArtifactId],
    ) -> Result<ExecutionId, LineageError> {
        self.start_execution_at(execution, inputs, now_ms()).await
    }

    /// [`start_execution`](Self::start_execution) for a run that began earlier (`started_at`, Unix
    /// milliseconds): a local stage reports its whole run when it has finished.
    pub async fn start_execution_at(
        &self,
        execution: &NewExecution,
        inputs: &[ArtifactId],
        started_at: i64,
    ) -> Result<ExecutionId, LineageError> {
        execution.validate()?;
        if execution.kind == ExecutionKind::Delete {
            return Err(invalid("kind", "delete is recorded by record_deletion".to_owned()));
        }
        let record = Record::StartExecution { execution: execution.clone(), inputs: inputs.to_vec(), at: started_at };
        self.write(record).await?;
        Ok(execution.id())
    }

    /// Records how an execution ended (`state` is succeeded, failed or cancelled) and what it
    /// produced, in one transaction.
    pub async fn finish_execution(
        &self,
        id: &ExecutionId,
        state: ExecutionState,
        outputs: &[ArtifactId],
        message: Option<&str>,
    ) -> Result<(), LineageError> {
        if !state.is_terminal() {
            return Err(invalid("state", "running is not an end state".to_owned()));
        }
        let record = Record::FinishExecution {
            id: id.clone(),
            state,
            outputs: outputs.to_vec(),
            message: message.map(str::to_owned),
            at: now_ms(),
        };
        self.write(record).await
    }

    /// Records that `resource` was deleted (an execution of kind delete); its executions still
    /// running end there: a service's serving as succeeded, anything else as cancelled.
    pub async fn record_deletion(&self, resource: &str) -> Result<ExecutionId, LineageError> {
        validate_resource(resource)?;
        self.write(Record::Deletion { resource: resource.to_owned(), at: now_ms() }).await?;
        Ok(ExecutionId::for_key(resource, DELETION_SPEC))
    }

    /// Replays the spool into the database now. Errors with [`LineageError::Unavailable`] when the
    /// database cannot be reached (the records stay spooled).
    pub async fn flush(&self) -> Result<FlushReport, LineageError> {
        let mut st = self.state.lock().await;
        let report = self.try_ready(&mut st, true).await?;
        if report.pending > 0 || !st.migrated {
            return Err(self.unavailable(&st));
        }
        Ok(report)
    }

    /// Records waiting in the spool.
    pub async fn pending(&self) -> Result<usize, LineageError> {
        let _st = self.state.lock().await;
        let lock = self.spool.lock()?;
        self.spool.pending(&lock)
    }

    /// The artifact with this id, if recorded.
    pub async fn artifact(&self, id: &ArtifactId) -> Result<Option<Artifact>, LineageError> {
        self.ready_for_read().await?;
        let sql = format!("SELECT {ARTIFACT_COLS} FROM artifacts WHERE id = $1");
        let row = sqlx::query(&sql).bind(id.as_str()).fetch_optional(&self.pool).await.map_err(|e| self.read_err(e))?;
        row.map(|r| artifact_from_row(&r)).transpose()
    }

    /// The execution with this id, if recorded.
    pub async fn execution(&self, id: &ExecutionId) -> Result<Option<Execution>, LineageError> {
        self.ready_for_read().await?;
        let sql = format!("SELECT {EXECUTION_COLS} FROM executions e WHERE e.id = $1");
        let row = sqlx::query(&sql).bind(id.as_str()).fetch_optional(&self.pool).await.map_err(|e| self.read_err(e))?;
        row.map(|r| execution_from_row(&r)).transpose()
    }

    /// The chain that led to an artifact or a job, root first.
    ///
    /// `query` is an artifact id, an artifact uri (or a local path, as its `file://` uri), a job (a
    /// resource string, `namespace/name`, a bare `name`, or a local run's output path: its latest
    /// execution), or a prefix of at least 8 hex digits of a sha256 (`sha256:` optional).
    /// Producers are found by content, so an artifact copied elsewhere keeps its history.
    pub async fn chain(&self, query: &str) -> Result<Vec<ChainLink>, LineageError> {
        self.ready_for_read().await?;
        let (mut exec, mut art) = match self.resolve(query).await? {
            Target::Artifact(a) => {
                let producer = self.producer_of(&a, &HashSet::new()).await?;
                (producer, Some(a))
            }
            Target::Execution(e) => {
                let outputs = self.edges(&e.id, "output").await?;
                let main = outputs.iter().find(|a| a.kind == ArtifactKind::Model).or(outputs.first()).cloned();
                (Some(e), main)
            }
        };
        let mut links = Vec::new();
        let mut visited = HashSet::new();
        while links.len() < MAX_CHAIN {
            let Some(e) = exec.take() else {
                links.push(ChainLink {
                    execution: None,
                    artifact: art.take(),
                    side_inputs: vec![],
                    other_outputs: vec![],
                });
                break;
            };
            visited.insert(e.id.clone());
            let mut inputs = self.edges(&e.id, "input").await?;
            let outputs = self.edges(&e.id, "output").await?;
            let followed =
                inputs.iter().position(|a| a.kind == ArtifactKind::Model).or((!inputs.is_empty()).then_some(0));
            let next = followed.map(|i| inputs.remove(i));
            // The link's artifact may be a copy (same content, another uri) of one of the outputs.
            let here = art.as_ref().map(|a| a.sha256.clone());
            let other_outputs = outputs.into_iter().filter(|o| Some(&o.sha256) != here.as_ref()).collect();
            links.push(ChainLink { execution: Some(e), artifact: art.take(), side_inputs: inputs, other_outputs });
            let Some(next) = next else { break };
            exec = self.producer_of(&next, &visited).await?;
            art = Some(next);
        }
        links.reverse();
        Ok(links)
    }

    // ---- writes ----

    async fn write(&self, record: Record) -> Result<(), LineageError> {
        let mut st = self.state.lock().await;
        let ready = self.try_ready(&mut st, false).await?;
        if ready.pending == 0 && st.migrated && st.offline_until.is_none() {
            match self.apply(&record).await {
                Ok(()) => return Ok(()),
                Err(Failure::Refused(e)) => return Err(e),
                Err(Failure::Unavailable(reason)) => self.mark_offline(&mut st, reason),
            }
        }
        let lock = self.spool.lock()?;
        self.spool.append(&record, &lock)?;
        tracing::debug!(spool = %self.spool.path().display(), "lineage record spooled");
        Ok(())
    }

    /// Migrates (once) and drains the spool if the database can be reached; otherwise marks the
    /// store offline. `force` tries even within the back-off after a failure.
    async fn try_ready(&self, st: &mut ConnState, force: bool) -> Result<FlushReport, LineageError> {
        if !force && st.offline_until.is_some_and(|t| Instant::now() < t) {
            return Ok(FlushReport::default());
        }
        st.offline_until = None;
        if !st.migrated {
            let migrated = match migrator().await {
                Ok(m) => m.run(&self.pool).await,
                Err(e) => Err(e),
            };
            match migrated {
                Ok(()) => st.migrated = true,
                Err(e) => match self.classify_migrate(e) {
                    Failure::Unavailable(reason) => {
                        self.mark_offline(st, reason);
                        return Ok(FlushReport::default());
                    }
                    Failure::Refused(e) => return Err(e),
                },
            }
        }
        if !self.spool.has_pending() {
            return Ok(FlushReport::default());
        }
        self.replay(st).await
    }

    /// Applies the spooled records in order. A record the database refuses is set aside in the
    /// rejected file (and counted); an outage stops the replay and keeps the rest spooled.
    async fn replay(&self, st: &mut ConnState) -> Result<FlushReport, LineageError> {
        let lock = self.spool.lock()?;
        let lines = self.spool.read(&lock)?;
        let mut report = FlushReport::default();
        for (i, line) in lines.iter().enumerate() {
            let record: Record = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable spooled lineage record set aside");
                    self.spool.reject(line, &format!("unreadable: {e}"), &lock)?;
                    report.rejected += 1;
                    continue;
                }
            };
            match self.apply(&record).await {
                Ok(()) => report.replayed += 1,
                Err(Failure::Refused(e)) => {
                    tracing::error!(error = %e, rejected = %self.spool.rejected_path().display(), "spooled lineage record refused");
                    self.spool.reject(line, &e.to_string(), &lock)?;
                    report.rejected += 1;
                }
                Err(Failure::Unavailable(reason)) => {
                    self.spool.replace(&lines[i..], &lock)?;
                    report.pending = lines.len() - i;
                    self.mark_offline(st, reason);
                    return Ok(report);
                }
            }
        }
        self.spool.replace(&[], &lock)?;
        if report.replayed + report.rejected > 0 {
            tracing::info!(replayed = report.replayed, rejected = report.rejected, "lineage spool replayed");
        }
        Ok(report)
    }

    fn mark_offline(&self, st: &mut ConnState, reason: String) {
        tracing::warn!(url = %self.url, %reason, spool = %self.spool.dir().display(),
            "lineage database unreachable; records are spooled until it is back");
        st.offline_until = Some(Instant::now() + self.retry_after);
        st.last_error = Some(reason);
    }

    fn unavailable(&self, st: &ConnState) -> LineageError {
        LineageError::Unavailable {
            url: self.url.clone(),
            reason: st.last_error.clone().unwrap_or_else(|| "not reachable".to_owned()),
        }
    }

    /// One record, one transaction.
    async fn apply(&self, record: &Record) -> Result<(), Failure> {
        let mut tx = self.pool.begin().await.map_err(|e| self.classify(e))?;
        match record {
            Record::Artifact { artifact: a, at } => {
                let id = a.id();
                let metrics = serde_json::Value::Object(a.metrics.clone()).to_string();
                let inserted = sqlx::query(
                    "INSERT INTO artifacts (id, uri, sha256, kind, sparsity, quantization, metrics, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                )
                // Not cached: sqlx 0.8.6's `Any` sends a NULL f64 as a float4 parameter, and a statement
                // prepared that way then refuses a float8 (PostgreSQL "incorrect binary data format").
                .persistent(false)
                .bind(id.as_str())
                .bind(&a.uri)
                .bind(&a.sha256)
                .bind(a.kind.as_str())
                .bind(a.sparsity)
                .bind(a.quantization.clone())
                .bind(&metrics)
                .bind(*at)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.classify(e))?
                .rows_affected();
                if inserted == 0 {
                    let row = sqlx::query("SELECT sparsity, quantization, metrics FROM artifacts WHERE id = $1")
                        .bind(id.as_str())
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|e| self.classify(e))?;
                    let (sparsity, quantization, old): (Option<f64>, Option<String>, String) =
                        (get(&row, "sparsity")?, get(&row, "quantization")?, get(&row, "metrics")?);
                    let mut merged = parse_metrics(&old).map_err(Failure::Refused)?;
                    let before = merged.clone();
                    merged.extend(a.metrics.clone());
                    let new_sparsity = sparsity.or(a.sparsity);
                    let new_quant = quantization.clone().or(a.quantization.clone());
                    if merged != before || new_sparsity != sparsity || new_quant != quantization {
                        sqlx::query(
                            "UPDATE artifacts SET sparsity = $2, quantization = $3, metrics = $4 WHERE id = $1",
                        )
                        .persistent(false)
                        .bind(id.as_str())
                        .bind(new_sparsity)
                        .bind(new_quant)
                        .bind(serde_json::Value::Object(merged).to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.classify(e))?;
                    }
                }
            }
            Record::StartExecution { execution: e, inputs, at } => {
                let id = e.id();
                sqlx::query(
                    "INSERT INTO executions (id, kind, spec_hash, state, started_at, finished_at, resource, message) \
                     VALUES ($1, $2, $3, 'running', $4, NULL, $5, NULL) \
                     ON CONFLICT (id) DO UPDATE SET state = 'running', started_at = excluded.started_at, \
                     finished_at = NULL, message = NULL \
                     WHERE executions.state IN ('failed', 'cancelled')",
                )
                .bind(id.as_str())
                .bind(e.kind.as_str())
                .bind(&e.spec_hash)
                .bind(*at)
                .bind(&e.resource)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.classify(e))?;
                self.insert_edges(&mut tx, &id, "input", inputs).await?;
            }
            Record::FinishExecution { id, state, outputs, message, at } => {
                let updated = sqlx::query(
                    "UPDATE executions SET state = $2, finished_at = $3, message = $4 WHERE id = $1 AND kind <> 'delete'",
                )
                .bind(id.as_str())
                .bind(state.as_str())
                .bind(*at)
                .bind(message.clone())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.classify(e))?
                .rows_affected();
                if updated == 0 {
                    return Err(Failure::Refused(LineageError::UnknownExecution(id.clone())));
                }
                self.insert_edges(&mut tx, id, "output", outputs).await?;
            }
            Record::Deletion { resource, at } => {
                let id = ExecutionId::for_key(resource, DELETION_SPEC);
                let inserted = sqlx::query(
                    "INSERT INTO executions (id, kind, spec_hash, state, started_at, finished_at, resource, message) \
                     VALUES ($1, 'delete', $2, 'succeeded', $3, $3, $4, NULL) ON CONFLICT (id) DO NOTHING",
                )
                .bind(id.as_str())
                .bind(DELETION_SPEC)
                .bind(*at)
                .bind(resource)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.classify(e))?
                .rows_affected();
                if inserted > 0 {
                    sqlx::query(
                        "UPDATE executions SET \
                         state = CASE WHEN kind = 'serve' THEN 'succeeded' ELSE 'cancelled' END, \
                         finished_at = $2, message = 'resource deleted' \
                         WHERE resource = $1 AND state = 'running' AND kind <> 'delete'",
                    )
                    .bind(resource)
                    .bind(*at)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.classify(e))?;
                }
            }
        }
        tx.commit().await.map_err(|e| self.classify(e))
    }

    async fn insert_edges(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        execution: &ExecutionId,
        kind: &str,
        artifacts: &[ArtifactId],
    ) -> Result<(), Failure> {
        for (ordinal, a) in artifacts.iter().enumerate() {
            sqlx::query(
                "INSERT INTO events (execution_id, artifact_id, type, ordinal) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(execution.as_str())
            .bind(a.as_str())
            .bind(kind)
            .bind(ordinal as i64)
            .execute(&mut **tx)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::ForeignKeyViolation => {
                    Failure::Refused(LineageError::UnknownArtifact(a.to_string()))
                }
                _ => self.classify(e),
            })?;
        }
        Ok(())
    }

    /// Outages become [`Failure::Unavailable`]; everything else is the database refusing.
    fn classify(&self, e: sqlx::Error) -> Failure {
        use sqlx::Error as E;
        let unavailable = match &e {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => true,
            E::Database(db) => {
                let code = db.code().unwrap_or_default();
                match self.backend {
                    // Connection exceptions, shutdowns and restarts, too many connections.
                    Backend::Postgres => code.starts_with("08") || code.starts_with("57P") || code == "53300",
                    // Busy or locked past the busy timeout (primary codes 5 and 6, any extended form).
                    Backend::Sqlite => code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)),
                }
            }
            _ => false,
        };
        if unavailable {
            Failure::Unavailable(e.to_string())
        } else {
            Failure::Refused(LineageError::Database { url: self.url.clone(), source: e })
        }
    }

    fn classify_migrate(&self, e: MigrateError) -> Failure {
        match e {
            MigrateError::Execute(inner) | MigrateError::ExecuteMigration(inner, _) => match self.classify(inner) {
                Failure::Unavailable(r) => Failure::Unavailable(r),
                Failure::Refused(LineageError::Database { source, .. }) => Failure::Refused(LineageError::Migrate {
                    url: self.url.clone(),
                    source: MigrateError::Execute(source),
                }),
                Failure::Refused(other) => Failure::Refused(other),
            },
            other => Failure::Refused(LineageError::Migrate { url: self.url.clone(), source: other }),
        }
    }

    // ---- reads ----

    /// Reads need the database: migrate and drain the spool first so they see every record.
    async fn ready_for_read(&self) -> Result<(), LineageError> {
        let mut st = self.state.lock().await;
        let report = self.try_ready(&mut st, true).await?;
        if report.pending > 0 || !st.migrated || st.offline_until.is_some() {
            return Err(self.unavailable(&st));
        }
        Ok(())
    }

    fn read_err(&self, e: sqlx::Error) -> LineageError {
        match self.classify(e) {
            Failure::Unavailable(reason) => LineageError::Unavailable { url: self.url.clone(), reason },
            Failure::Refused(e) => e,
        }
    }

    async fn artifacts_where(
        &self,
        condition: &str,
        binds: &[&str],
        order: &str,
    ) -> Result<Vec<Artifact>, LineageError> {
        let sql = format!("SELECT {ARTIFACT_COLS} FROM artifacts WHERE {condition} ORDER BY {order} LIMIT 50");
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(*b);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(|e| self.read_err(e))?;
        rows.iter().map(artifact_from_row).collect()
    }

    async fn resolve(&self, query: &str) -> Result<Target, LineageError> {
        let query = query.trim();
        let not_found = || LineageError::NotFound { url: self.url.clone(), query: query.to_owned() };
        if query.is_empty() {
            return Err(not_found());
        }
        let path = Path::new(query);
        let mut uris = vec![query.to_owned()];
        let mut resources = vec![query.to_owned(), format!("local:{query}")];
        if let Ok(abs) = std::path::absolute(path) {
            uris.push(file_uri(&abs));
            resources.push(format!("local:{}", abs.display()));
        }
        if let Ok(canon) = path.canonicalize() {
            uris.push(file_uri(&canon));
            resources.push(format!("local:{}", canon.display()));
        }
        // 1. An artifact id or uri (the newest content at that uri).
        for u in &uris {
            let found = self.artifacts_where("id = $1 OR uri = $1", &[u.as_str()], "created_at DESC, id").await?;
            if let Some(a) = found.into_iter().next() {
                return Ok(Target::Artifact(a));
            }
        }
        // 2. A job: its latest execution.
        let mut execs = Vec::new();
        for r in &resources {
            execs.extend(self.executions_where("e.resource = $1", r).await?);
        }
        if execs.is_empty() && !query.contains(':') {
            let pattern = match query.split('/').count() {
                1 => format!("%/{}/%", like_escape(query)),
                2 => format!("{}/%", like_escape(query)),
                _ => String::new(),
            };
            if !pattern.is_empty() {
                execs = self.executions_where("e.resource LIKE $1 ESCAPE '\\'", &pattern).await?;
            }
        }
        if !execs.is_empty() {
            let mut jobs: Vec<String> = execs.iter().map(|e| job_of(&e.resource)).collect();
            jobs.sort();
            jobs.dedup();
            if jobs.len() > 1 {
                return Err(LineageError::Ambiguous { query: query.to_owned(), candidates: jobs.join(", ") });
            }
            execs.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| a.id.cmp(&b.id)));
            return Ok(Target::Execution(execs.swap_remove(0)));
        }
        // 3. A sha256 prefix.
        let hex = query.strip_prefix("sha256:").unwrap_or(query).to_ascii_lowercase();
        if (8..=64).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found = self.artifacts_where("sha256 LIKE $1", &[format!("{hex}%").as_str()], "created_at, id").await?;
            let mut shas: Vec<&str> = found.iter().map(|a| a.sha256.as_str()).collect();
            shas.sort();
            shas.dedup();
            if shas.len() > 1 {
                let candidates = shas.iter().map(|s| &s[..16]).collect::<Vec<_>>().join(", ");
                return Err(LineageError::Ambiguous { query: query.to_owned(), candidates });
            }
            if let Some(a) = found.into_iter().next() {
                return Ok(Target::Artifact(a));
            }
        }
        Err(not_found())
    }

    async fn executions_where(&self, condition: &str, bind: &str) -> Result<Vec<Execution>, LineageError> {
        let sql = format!(
            "SELECT {EXECUTION_COLS} FROM executions e WHERE {condition} AND e.kind <> 'delete' \
             ORDER BY e.started_at DESC, e.id LIMIT 50"
        );
        let rows = sqlx::query(&sql).bind(bind).fetch_all(&self.pool).await.map_err(|e| self.read_err(e))?;
        rows.iter().map(execution_from_row).collect()
    }

    /// The execution that produced this content (this very artifact first, then any with the same
    /// sha256; the earliest start wins), skipping `visited`.
    async fn producer_of(
        &self,
        a: &Artifact,
        visited: &HashSet<ExecutionId>,
    ) -> Result<Option<Execution>, LineageError> {
        let sql = format!(
            "SELECT {EXECUTION_COLS} FROM events ev \
             JOIN executions e ON e.id = ev.execution_id \
             JOIN artifacts a ON a.id = ev.artifact_id \
             WHERE ev.type = 'output' AND a.sha256 = $1 AND e.kind <> 'delete' \
             ORDER BY CASE WHEN a.id = $2 THEN 0 ELSE 1 END, e.started_at, e.id LIMIT 50"
        );
        let rows = sqlx::query(&sql)
            .bind(&a.sha256)
            .bind(a.id.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.read_err(e))?;
        for r in &rows {
            let e = execution_from_row(r)?;
            if !visited.contains(&e.id) {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// An execution's inputs or outputs, in reported order.
    async fn edges(&self, execution: &ExecutionId, kind: &str) -> Result<Vec<Artifact>, LineageError> {
        let cols = ARTIFACT_COLS.split(", ").map(|c| format!("a.{c}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT {cols} FROM events ev JOIN artifacts a ON a.id = ev.artifact_id \
             WHERE ev.execution_id = $1 AND ev.type = $2 ORDER BY ev.ordinal, a.id"
        );
        let rows = sqlx::query(&sql)
            .bind(execution.as_str())
            .bind(kind)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.read_err(e))?;
        rows.iter().map(artifact_from_row).collect()
    }
}

enum Target {
    Artifact(Artifact),
    Execution(Execution),
}

/// The job a resource names: `namespace/name` of `namespace/name/uid`, or the whole string.
fn job_of(resource: &str) -> String {
    match resource.rsplit_once('/') {
        Some((job, _uid)) if !resource.starts_with("local:") && resource.matches('/').count() == 2 => job.to_owned(),
        _ => resource.to_owned(),
    }
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

const ARTIFACT_COLS: &str = "id, uri, sha256, kind, sparsity, quantization, metrics, created_at";

const EXECUTION_COLS: &str = "e.id, e.kind, e.spec_hash, e.state, e.started_at, e.finished_at, e.resource, e.message, \
     (SELECT d.finished_at FROM executions d WHERE d.resource = e.resource AND d.kind = 'delete') AS deleted_at";

fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T, Failure>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col).map_err(|e| Failure::Refused(LineageError::Corrupt(format!("column {col}: {e}"))))
}

fn col<'r, T>(row: &'r AnyRow, col: &str) -> Result<T, LineageError>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col).map_err(|e| LineageError::Corrupt(format!("column {col}: {e}")))
}

fn parse_metrics(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, LineageError> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(other) => Err(LineageError::Corrupt(format!("metrics {other} is not a JSON object"))),
        Err(e) => Err(LineageError::Corrupt(format!("metrics {text:?}: {e}"))),
    }
}

fn artifact_from_row(r: &AnyRow) -> Result<Artifact, LineageError> {
    Ok(Artifact {
        id: ArtifactId::from_db(col(r, "id")?),
        uri: col(r, "uri")?,
        sha256: col(r, "sha256")?,
        kind: col::<String>(r, "kind")?.parse()?,
        sparsity: col(r, "sparsity")?,
        quantization: col(r, "quantization")?,
        metrics: parse_metrics(&col::<String>(r, "metrics")?)?,
        created_at: col(r, "created_at")?,
    })
}

fn execution_from_row(r: &AnyRow) -> Result<Execution, LineageError> {
    Ok(Execution {
        id: ExecutionId::from_db(col(r, "id")?),
        kind: col::<String>(r, "kind")?.parse()?,
        spec_hash: col(r, "spec_hash")?,
        state: col::<String>(r, "state")?.parse()?,
        started_at: col(r, "started_at")?,
        finished_at: col(r, "finished_at")?,
        resource: col(r, "resource")?,
        message: col(r, "message")?,
        resource_deleted_at: col(r, "deleted_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        let shown = redact("postgres://lacuna:s3cret@db.example:5432/lineage");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("lacuna") && shown.contains("db.example"), "{shown}");
        assert_eq!(redact("sqlite:///tmp/l.db?mode=rwc"), "sqlite:///tmp/l.db?mode=rwc");
    }

    #[test]
    fn sqlite_urls_round_trip_odd_paths() {
        let p = Path::new("/tmp/a dir/lin?eage#1%.db");
        let url = sqlite_url(p);
        assert!(url.ends_with("?mode=rwc"), "{url}");
        assert_eq!(sqlite_file(&url).as_deref(), Some(p));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
    }

    #[test]
    fn jobs_group_uids_of_one_object() {
        assert_eq!(job_of("ml/prune-50/0b1c"), "ml/prune-50");
        assert_eq!(job_of("local:/tmp/out"), "local:/tmp/out");
        assert_eq!(like_escape("a_b%c"), "a\\_b\\%c");
    }
}

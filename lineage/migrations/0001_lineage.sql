-- Lineage in the ML-Metadata shape: artifacts, executions, and the input/output events between them.
--
-- The same SQL runs on PostgreSQL and SQLite. Identifiers are text digests of each row's idempotency
-- key (see `lacuna_lineage::ArtifactId` / `ExecutionId`), so a client knows a row's id before the
-- database does (the outbox replays records that name each other). Times are milliseconds since the
-- Unix epoch (UTC) and metrics are JSON text, so one set of runtime-checked queries reads both backends.

CREATE TABLE artifacts (
    id TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
    kind TEXT NOT NULL CHECK (kind IN ('model', 'dataset', 'recipe')),
    sparsity DOUBLE PRECISION CHECK (sparsity >= 0 AND sparsity <= 1),
    quantization TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    -- Idempotency key: a retried report of the same content at the same place is the same artifact.
    UNIQUE (uri, sha256)
);

-- Chains follow content: an artifact copied elsewhere keeps its producer.
CREATE INDEX artifacts_sha256 ON artifacts (sha256);

CREATE TABLE executions (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('prune', 'pretrain', 'finetune', 'quantize', 'serve', 'delete')),
    spec_hash TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    started_at BIGINT NOT NULL,
    finished_at BIGINT,
    -- `namespace/name/uid` of the Kubernetes object that ran it, or `local:<path>`.
    resource TEXT NOT NULL,
    message TEXT,
    -- Idempotency key: the same spec run by the same object is one execution, however often reported.
    UNIQUE (resource, spec_hash)
);

CREATE TABLE events (
    execution_id TEXT NOT NULL REFERENCES executions (id),
    artifact_id TEXT NOT NULL REFERENCES artifacts (id),
    type TEXT NOT NULL CHECK (type IN ('input', 'output')),
    -- Position in the reported list: the first model input is the one a chain follows.
    ordinal BIGINT NOT NULL,
    PRIMARY KEY (execution_id, artifact_id, type)
);

CREATE INDEX events_artifact ON events (artifact_id, type);

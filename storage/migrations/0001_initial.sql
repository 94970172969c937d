-- cairn schema 1: deployment records, events, per-node results, accounts, membership,
-- the change log and local state.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Replicated. Single writer: the origin node.
CREATE TABLE deployments (
    deployment_id             TEXT PRIMARY KEY,
    project                   TEXT NOT NULL,
    kind                      TEXT NOT NULL DEFAULT 'deploy',
    package_identifier        TEXT,
    payload_hash              TEXT,
    payload_size              INTEGER,
    status                    TEXT NOT NULL,
    phase                     TEXT,
    expected_nodes            TEXT NOT NULL DEFAULT '[]',
    activate_nodes            TEXT NOT NULL DEFAULT '[]',
    origin_node               TEXT NOT NULL,
    restart_mode              TEXT,
    replicated                INTEGER NOT NULL DEFAULT 1,
    ignore_replication_errors INTEGER NOT NULL DEFAULT 0,
    timeout_ms                INTEGER NOT NULL,
    deadline_at               INTEGER,
    started_at                INTEGER NOT NULL,
    completed_at              INTEGER,
    user                      TEXT,
    rollback_of               TEXT,
    error                     TEXT,
    version                   INTEGER NOT NULL,
    origin                    TEXT NOT NULL
);
CREATE INDEX deployments_by_start ON deployments (started_at DESC, deployment_id DESC);
CREATE INDEX deployments_by_project ON deployments (project, started_at DESC);
CREATE INDEX deployments_by_status ON deployments (status, started_at DESC);
CREATE INDEX deployments_by_user ON deployments (user, started_at DESC);

-- Replicated. Single writer: the origin node. Retention: first 20, a marker, newest 179.
CREATE TABLE deployment_events (
    deployment_id TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    t             INTEGER NOT NULL,
    event         TEXT NOT NULL,
    data          TEXT NOT NULL,
    PRIMARY KEY (deployment_id, seq)
) WITHOUT ROWID;

-- Replicated. Single writer: the node the result is about.
CREATE TABLE node_results (
    deployment_id  TEXT NOT NULL,
    node           TEXT NOT NULL,
    status         TEXT NOT NULL,
    phase          TEXT,
    error          TEXT,
    started_at     INTEGER,
    completed_at   INTEGER,
    late           INTEGER NOT NULL DEFAULT 0,
    install_output TEXT,
    version        INTEGER NOT NULL,
    origin         TEXT NOT NULL,
    PRIMARY KEY (deployment_id, node)
) WITHOUT ROWID;

-- Replicated. A dropped payload is a one-way fact; any node may write it.
CREATE TABLE payload_drops (
    deployment_id TEXT PRIMARY KEY,
    dropped_by    TEXT NOT NULL,
    dropped_at    INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    origin        TEXT NOT NULL
);

-- Replicated, last writer wins by (version, origin); deletes are tombstones.
CREATE TABLE users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    active        INTEGER NOT NULL DEFAULT 1,
    deleted       INTEGER NOT NULL DEFAULT 0,
    version       INTEGER NOT NULL,
    origin        TEXT NOT NULL
);

CREATE TABLE roles (
    role       TEXT PRIMARY KEY,
    permission TEXT NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0,
    version    INTEGER NOT NULL,
    origin     TEXT NOT NULL
);

CREATE TABLE members (
    name    TEXT PRIMARY KEY,
    url     TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL,
    origin  TEXT NOT NULL
);

-- The change log: every write to a replicated table, local or applied from a peer.
CREATE TABLE changelog (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl     TEXT NOT NULL,
    key     TEXT NOT NULL,
    version INTEGER NOT NULL,
    origin  TEXT NOT NULL,
    op      TEXT NOT NULL,
    data    BLOB NOT NULL,
    user    TEXT,
    t       INTEGER NOT NULL
);

-- Local: how far this node has applied each peer's change log.
CREATE TABLE peer_cursors (
    peer       TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- Local: which release is active on this node.
CREATE TABLE active_releases (
    project       TEXT PRIMARY KEY,
    deployment_id TEXT NOT NULL,
    payload_hash  TEXT,
    activated_at  INTEGER NOT NULL
);

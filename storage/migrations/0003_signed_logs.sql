-- cairn schema 3: signed single-writer change logs with identities (SPEC 9).
--
-- * Every replicated row keeps the signed entry that wrote its current version
--   (log_id, oseq, entry body, signature, key id), so it can be relayed or served as
--   part of a compacted catch-up and verified by any node.
-- * The change log is a transport: entries keyed by (log_id, oseq), trimmed once every
--   member has them. Who changed what is kept in a bounded audit log of its own.
-- * Facts any node may record get keys that include the writer: pins and payload drops
--   are keyed by (deployment_id, node); deployment rows stay single-writer.
-- * Deployment events travel as signed batches (event_batches); the events table stays
--   the readable form.

ALTER TABLE deployments ADD COLUMN created_version INTEGER;
UPDATE deployments SET created_version = started_at * 65536;

CREATE TABLE pins (
    deployment_id TEXT NOT NULL,
    node          TEXT NOT NULL,
    pinned        INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    origin        TEXT NOT NULL,
    PRIMARY KEY (deployment_id, node)
) WITHOUT ROWID;
INSERT INTO pins (deployment_id, node, pinned, version, origin)
    SELECT deployment_id, origin, 1, version, origin FROM deployments WHERE pinned = 1;
ALTER TABLE deployments DROP COLUMN pinned;

CREATE TABLE payload_drops_v3 (
    deployment_id TEXT NOT NULL,
    node          TEXT NOT NULL,
    dropped_at    INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    origin        TEXT NOT NULL,
    PRIMARY KEY (deployment_id, node)
) WITHOUT ROWID;
INSERT INTO payload_drops_v3 (deployment_id, node, dropped_at, version, origin)
    SELECT deployment_id, origin, dropped_at, version, origin FROM payload_drops;
DROP TABLE payload_drops;
ALTER TABLE payload_drops_v3 RENAME TO payload_drops;

CREATE TABLE event_batches (
    deployment_id TEXT NOT NULL,
    first_seq     INTEGER NOT NULL,
    last_seq      INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    origin        TEXT NOT NULL,
    PRIMARY KEY (deployment_id, first_seq)
) WITHOUT ROWID;

-- The signed entry behind each row's current version (NULL for rows written before
-- schema 3: their writer re-signs them at its next start).
ALTER TABLE deployments ADD COLUMN log_id TEXT;
ALTER TABLE deployments ADD COLUMN oseq INTEGER;
ALTER TABLE deployments ADD COLUMN entry BLOB;
ALTER TABLE deployments ADD COLUMN sig BLOB;
ALTER TABLE deployments ADD COLUMN key_id TEXT;
ALTER TABLE node_results ADD COLUMN log_id TEXT;
ALTER TABLE node_results ADD COLUMN oseq INTEGER;
ALTER TABLE node_results ADD COLUMN entry BLOB;
ALTER TABLE node_results ADD COLUMN sig BLOB;
ALTER TABLE node_results ADD COLUMN key_id TEXT;
ALTER TABLE users ADD COLUMN log_id TEXT;
ALTER TABLE users ADD COLUMN oseq INTEGER;
ALTER TABLE users ADD COLUMN entry BLOB;
ALTER TABLE users ADD COLUMN sig BLOB;
ALTER TABLE users ADD COLUMN key_id TEXT;
ALTER TABLE roles ADD COLUMN log_id TEXT;
ALTER TABLE roles ADD COLUMN oseq INTEGER;
ALTER TABLE roles ADD COLUMN entry BLOB;
ALTER TABLE roles ADD COLUMN sig BLOB;
ALTER TABLE roles ADD COLUMN key_id TEXT;
ALTER TABLE members ADD COLUMN log_id TEXT;
ALTER TABLE members ADD COLUMN oseq INTEGER;
ALTER TABLE members ADD COLUMN entry BLOB;
ALTER TABLE members ADD COLUMN sig BLOB;
ALTER TABLE members ADD COLUMN key_id TEXT;
ALTER TABLE pins ADD COLUMN log_id TEXT;
ALTER TABLE pins ADD COLUMN oseq INTEGER;
ALTER TABLE pins ADD COLUMN entry BLOB;
ALTER TABLE pins ADD COLUMN sig BLOB;
ALTER TABLE pins ADD COLUMN key_id TEXT;
ALTER TABLE payload_drops ADD COLUMN log_id TEXT;
ALTER TABLE payload_drops ADD COLUMN oseq INTEGER;
ALTER TABLE payload_drops ADD COLUMN entry BLOB;
ALTER TABLE payload_drops ADD COLUMN sig BLOB;
ALTER TABLE payload_drops ADD COLUMN key_id TEXT;
ALTER TABLE event_batches ADD COLUMN log_id TEXT;
ALTER TABLE event_batches ADD COLUMN oseq INTEGER;
ALTER TABLE event_batches ADD COLUMN entry BLOB;
ALTER TABLE event_batches ADD COLUMN sig BLOB;
ALTER TABLE event_batches ADD COLUMN key_id TEXT;

CREATE INDEX deployments_by_log ON deployments (log_id, oseq);
CREATE INDEX node_results_by_log ON node_results (log_id, oseq);
CREATE INDEX users_by_log ON users (log_id, oseq);
CREATE INDEX roles_by_log ON roles (log_id, oseq);
CREATE INDEX members_by_log ON members (log_id, oseq);
CREATE INDEX pins_by_log ON pins (log_id, oseq);
CREATE INDEX payload_drops_by_log ON payload_drops (log_id, oseq);
CREATE INDEX event_batches_by_log ON event_batches (log_id, oseq);

-- One order for deploys of a project (SPEC 5): by the version the row was created at.
CREATE INDEX deployments_by_project_version ON deployments (project, status, created_version);

-- Local: who changed which row when, from which node (read_audit_log). Bounded.
CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl     TEXT NOT NULL,
    key     TEXT NOT NULL,
    op      TEXT NOT NULL,
    user    TEXT,
    node    TEXT NOT NULL,
    version INTEGER NOT NULL,
    t       INTEGER NOT NULL
);
INSERT INTO audit_log (tbl, key, op, user, node, version, t)
    SELECT tbl, key, op, user, origin, version, t FROM changelog ORDER BY seq;
CREATE INDEX audit_log_by_table ON audit_log (tbl, key, id);
CREATE INDEX audit_log_by_time ON audit_log (t);

-- The change log: entries of every log this node holds, by (log_id, oseq). A
-- transport, not the record: trimmed once every member holds an entry.
DROP TABLE changelog;
CREATE TABLE changelog (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    log_id      TEXT NOT NULL,
    oseq        INTEGER NOT NULL,
    writer      TEXT NOT NULL,
    tbl         TEXT NOT NULL,
    key         TEXT NOT NULL,
    version     INTEGER NOT NULL,
    entry       BLOB NOT NULL,
    sig         BLOB NOT NULL,
    key_id      TEXT NOT NULL,
    state       INTEGER NOT NULL DEFAULT 0,
    received_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX changelog_by_log ON changelog (log_id, oseq);
CREATE INDEX changelog_parked ON changelog (state) WHERE state = 1;

-- Local: every log this node holds entries of. ``head``: every entry up to it has been
-- received (applied, parked or quarantined); ``held_from``: the local change log holds
-- every entry from it to ``head`` (below it, serve the compacted rows).
CREATE TABLE logs (
    log_id     TEXT PRIMARY KEY,
    writer     TEXT NOT NULL,
    head       INTEGER NOT NULL,
    held_from  INTEGER NOT NULL,
    bytes      INTEGER NOT NULL DEFAULT 0,
    verified   INTEGER NOT NULL DEFAULT 0,
    first_seen INTEGER NOT NULL
);

-- Local: how far each member said it holds each log (trimming waits for them).
CREATE TABLE member_positions (
    member     TEXT NOT NULL,
    log_id     TEXT NOT NULL,
    oseq       INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (member, log_id)
) WITHOUT ROWID;
DROP TABLE peer_cursors;

-- Local: certificates of writers, by key id (entries name the key that signed them).
CREATE TABLE certs (
    key_id     TEXT PRIMARY KEY,
    node       TEXT NOT NULL,
    der        BLOB NOT NULL,
    not_before INTEGER NOT NULL,
    not_after  INTEGER NOT NULL
);

-- Local: changes refused on arrival, each with its reason. Bounded.
CREATE TABLE quarantine (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    peer   TEXT NOT NULL,
    log_id TEXT,
    oseq   INTEGER,
    writer TEXT,
    tbl    TEXT,
    key    TEXT,
    reason TEXT NOT NULL,
    at     INTEGER NOT NULL
);

-- Local: the desired release of each project on this node (SPEC 5: the newest success
-- that applies here, by created_version), maintained as rows become success, so that
-- convergence asks one small table instead of the whole history.
CREATE TABLE desired_releases (
    project         TEXT PRIMARY KEY,
    deployment_id   TEXT NOT NULL,
    created_version INTEGER NOT NULL,
    kind            TEXT NOT NULL
);
-- (Filled at start for this node's name: see Store.open.)

-- A deploy that lost to a newer concurrent deploy of the same project (SPEC 3).
ALTER TABLE deployments ADD COLUMN superseded_by TEXT;
-- Deadlines travel as durations (timeout_ms), never as the origin's wall-clock instant.
ALTER TABLE deployments DROP COLUMN deadline_at;

-- Replicated. Single writer: the node. What each node runs, per project (SPEC 4
-- get_components): its active deployment, its process and whether it converged.
CREATE TABLE node_components (
    node          TEXT NOT NULL,
    project       TEXT NOT NULL,
    deployment_id TEXT,
    payload_hash  TEXT,
    activated_at  INTEGER,
    converged     INTEGER NOT NULL,
    reason        TEXT,
    process       TEXT,
    version       INTEGER NOT NULL,
    origin        TEXT NOT NULL,
    log_id        TEXT,
    oseq          INTEGER,
    entry         BLOB,
    sig           BLOB,
    key_id        TEXT,
    PRIMARY KEY (node, project)
) WITHOUT ROWID;
CREATE INDEX node_components_by_log ON node_components (log_id, oseq);

-- Local: releases this node staged completely (extracted, hooks passed, synced). A
-- release directory without a row here is an interrupted stage and is removed at start.
CREATE TABLE staged_releases (
    project       TEXT NOT NULL,
    deployment_id TEXT NOT NULL,
    payload_hash  TEXT,
    staged_at     INTEGER NOT NULL,
    PRIMARY KEY (project, deployment_id)
) WITHOUT ROWID;

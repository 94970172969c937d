-- cairn schema 2: pinned deploys for retention (SPEC 8) and indexes that serve
-- read_audit_log and per-project result lookups without full scans.

ALTER TABLE deployments ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;

CREATE INDEX changelog_by_table ON changelog (tbl, key, seq);
CREATE INDEX changelog_by_time ON changelog (t);
CREATE INDEX node_results_by_node ON node_results (node, deployment_id);
CREATE INDEX deployments_by_hash ON deployments (payload_hash);

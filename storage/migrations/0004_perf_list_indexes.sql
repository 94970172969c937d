-- cairn schema 4: list_deployments indexes that serve its whole order.
--
-- list_deployments orders by (started_at DESC, deployment_id DESC). The filter indexes of
-- schema 1 stopped at started_at, so SQLite sorted each page with a temporary B-tree
-- ("USE TEMP B-TREE FOR RIGHT PART OF ORDER BY") and could not seek a cursor's
-- (started_at, deployment_id) pair. With deployment_id in them, a page is a range walk
-- of the index that stops after LIMIT rows, whatever the table holds.

DROP INDEX deployments_by_project;
DROP INDEX deployments_by_status;
DROP INDEX deployments_by_user;
CREATE INDEX deployments_by_project ON deployments (project, started_at DESC, deployment_id DESC);
CREATE INDEX deployments_by_status ON deployments (status, started_at DESC, deployment_id DESC);
CREATE INDEX deployments_by_user ON deployments (user, started_at DESC, deployment_id DESC);

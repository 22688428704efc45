-- The gateway's own tables, in schema regiongate. The gateway also creates them (idempotently) when it
-- starts, so a gateway works without `regiongate migrate`; this file makes them part of the schema history.
-- regiongate.migrations itself is created by `regiongate migrate` before it applies anything.
CREATE SCHEMA IF NOT EXISTS regiongate;

-- One row per gateway, bumped every monitor interval: replicas' lag is measured from the replayed row.
CREATE TABLE IF NOT EXISTS regiongate.heartbeat (
    gateway text PRIMARY KEY,
    seq bigint NOT NULL,
    written_at timestamptz NOT NULL
);

-- One row per refresh attempt of a materialized view. A successful refresh writes its row in the refresh's
-- own transaction, so a replica that has replayed the row has replayed the view's new contents.
CREATE TABLE IF NOT EXISTS regiongate.view_refreshes (
    id bigserial PRIMARY KEY,
    view_name text NOT NULL,
    -- The scheduled run this refresh belongs to; NULL for REFRESH VIEW from the admin console.
    slot timestamptz,
    gateway text NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    rows bigint,
    error text
);
-- Exactly one successful refresh per view and scheduled run, whichever gateway gets there first.
CREATE UNIQUE INDEX IF NOT EXISTS view_refreshes_one_per_slot
    ON regiongate.view_refreshes (view_name, slot) WHERE error IS NULL AND slot IS NOT NULL;
CREATE INDEX IF NOT EXISTS view_refreshes_latest
    ON regiongate.view_refreshes (view_name, started_at DESC);

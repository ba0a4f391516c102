-- Tenants, their raw events partitioned by month, the per-tenant daily rollups the reports
-- read for closed days, and the manifest of archived months. docs/adr/0016 says why the
-- layout is this one; analytics-repo/README.md shows the plans it gives.

CREATE TABLE tenants (
    id   uuid PRIMARY KEY,
    name text NOT NULL,
    plan text NOT NULL CHECK (plan IN ('free', 'pro', 'enterprise'))
);
CREATE INDEX tenants_plan ON tenants (plan, id);

-- One row per event. `id` is a UUIDv7 whose timestamp is the event's `created_at` (to the
-- millisecond), so ordering by id is ordering by time: one index, (tenant_id, id), serves the
-- keyset listing and the open day's scan. No primary key: the service makes every id, and a
-- unique index over 100M rows would cost ingest a second index for nothing.
CREATE TABLE events (
    id              uuid        NOT NULL,
    tenant_id       uuid        NOT NULL,
    created_at      timestamptz NOT NULL,
    processing_time integer     NOT NULL CHECK (processing_time >= 0),
    name            text        NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX events_tenant_id ON events (tenant_id, id);
-- The roll-up reads the last second or so of rows by time; rows arrive in time order, so a
-- BRIN index (a few pages per month) finds them without a second B-tree to maintain.
CREATE INDEX events_created_at ON events USING brin (created_at);

-- Rows outside every monthly partition (far past, far future) land here; the partition
-- maintainer moves them into the month it then creates, so this stays empty.
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- Per tenant and UTC day: the count and the sum that make an exact AVG (sum / count), of every
-- event before the watermark (rollup_state). Events after it are read raw by the reports.
CREATE TABLE daily_rollups (
    tenant_id           uuid   NOT NULL,
    day                 date   NOT NULL,
    events              bigint NOT NULL,
    processing_time_sum bigint NOT NULL,
    -- Covering: the report reads ~100K rollup rows by index alone (no heap visits once
    -- vacuumed), 88-117 ms against 115-148 ms at 1M events (README, "Queries").
    PRIMARY KEY (tenant_id, day) INCLUDE (events, processing_time_sum)
);

-- The watermark: every event with created_at before it is counted in daily_rollups, every
-- later one only in events. An ingest holds the shared advisory lock while it reads this and
-- writes (events before it go to the rollups in the same transaction); the roll-up holds it
-- exclusively while it folds the rows up to now into the rollups and moves it, so no batch
-- straddles a move.
CREATE TABLE rollup_state (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    rolled_up_to timestamptz NOT NULL
);
INSERT INTO rollup_state (rolled_up_to) VALUES (date_trunc('day', now(), 'UTC'));

-- Archived months: each step is recorded as it is done, so an archiver killed at any point
-- resumes from the last recorded one.
CREATE TABLE archived_months (
    month       date        PRIMARY KEY,
    state       text        NOT NULL CHECK (state IN ('detached', 'exported', 'dropped', 'restored')),
    path        text        NOT NULL,
    rows        bigint      NOT NULL,
    -- sum(hashtextextended(row::text, 0)) over the partition: order-independent, computed by
    -- PostgreSQL alike for the partition and for the file loaded back.
    checksum    numeric     NOT NULL,
    file_sha256 text        NOT NULL,
    file_bytes  bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The messaging tables every saga service keeps in its own schema: the outbox its
-- transactions write their outgoing messages to, and the inbox that makes consuming a
-- message idempotent. Applied into each service's schema before the service's own tables.

-- A message waits here from the transaction that produced it until the relay has
-- published it to its stream; the relay deletes it then. Rows are claimed with
-- FOR UPDATE SKIP LOCKED, so several relays share the work and none skips a row.
CREATE TABLE outbox (
    id uuid PRIMARY KEY,
    stream text NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per message already applied, written in the same transaction as its effect.
CREATE TABLE inbox (
    message_id uuid PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_received_at ON inbox (received_at);

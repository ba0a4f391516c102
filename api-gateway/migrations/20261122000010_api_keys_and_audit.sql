-- API keys and the audit log.

-- API keys are 256-bit random strings shown once at creation; only their SHA-256 is stored
-- (they are high-entropy, so a fast hash suffices: there is nothing to brute-force).
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,           -- UUIDv7
    key_hash     bytea       NOT NULL UNIQUE,       -- SHA-256 of the key
    key_prefix   text        NOT NULL,              -- first characters, to recognise a key
    name         text        NOT NULL,
    owner_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    roles        text[]      NOT NULL DEFAULT '{}',
    limit_count  integer,                           -- the key's own quota, or NULL for the default
    limit_window_ms bigint,
    created_by   uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    CHECK ((limit_count IS NULL) = (limit_window_ms IS NULL)),
    CHECK (limit_count IS NULL OR (limit_count > 0 AND limit_window_ms > 0))
);

-- Append-only audit trail. `seq` is gap-free (assigned under an advisory lock by the one
-- writer holding it), and each row stores the SHA-256 of its own content chained to the
-- previous row's hash, so editing, deleting or reordering rows breaks the chain where it
-- happened (`audit-verify` walks it). Never a password or a token in here.
CREATE TABLE audit_log (
    seq        bigint      PRIMARY KEY,
    at         timestamptz NOT NULL,
    request_id text,
    subject    text,                                -- user id, `key:<id>`, or NULL
    ip         text,
    action     text        NOT NULL,                -- login, refresh, logout, api_key.create, ...
    outcome    text        NOT NULL,                -- success, failure, denied, limited, ...
    detail     text,                                -- a short reason, never a secret
    prev_hash  bytea       NOT NULL,
    hash       bytea       NOT NULL
);
CREATE INDEX audit_log_subject ON audit_log (subject, seq);

-- Users and refresh tokens. Passwords are argon2id PHC strings; refresh tokens are stored
-- only as SHA-256 hashes, so a database leak yields no usable token.

CREATE TABLE users (
    id            uuid        PRIMARY KEY,           -- UUIDv7
    username      text        NOT NULL UNIQUE,
    password_hash text        NOT NULL,              -- argon2id, PHC string format
    roles         text[]      NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per issued refresh token. A login starts a family; each refresh spends its token
-- and issues the next in the same family (RFC 9700 rotation). Presenting a spent token
-- again revokes the whole family: someone holds a copy.
CREATE TABLE refresh_tokens (
    id         uuid        PRIMARY KEY,              -- UUIDv7
    family_id  uuid        NOT NULL,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash bytea       NOT NULL UNIQUE,          -- SHA-256 of the opaque token
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    spent_at   timestamptz,                          -- set when rotated
    replaced_by uuid,                                -- the token issued in its place
    revoked_at timestamptz                           -- set by logout or reuse detection
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

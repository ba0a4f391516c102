-- Orders and the state of each order's saga, its step history, the idempotency keys of
-- POST /v1/orders, and the audit of orders an operator must look at.
CREATE TABLE orders (
    id uuid PRIMARY KEY,                      -- UUIDv7: time-ordered, the list's cursor
    customer_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled', 'needs_attention')),
    reason text,
    total bigint NOT NULL CHECK (total >= 0), -- minor units, computed by the server
    currency text NOT NULL,
    payment_method text NOT NULL,
    shipping_address jsonb NOT NULL,
    traceparent text,
    -- The saga: the step awaited, its attempt, whether its command went out, the
    -- compensations still to run, and when the step's answer (or backoff) is due.
    step text,
    attempt integer NOT NULL DEFAULT 0,
    sent boolean NOT NULL DEFAULT false,
    compensations text[] NOT NULL DEFAULT '{}',
    step_deadline timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The deadline sweeper's scan: running sagas by due time.
CREATE INDEX orders_due ON orders (step_deadline) WHERE status = 'pending';

CREATE TABLE order_lines (
    order_id uuid NOT NULL REFERENCES orders (id),
    product_id uuid NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    unit_price bigint NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (order_id, product_id)
);

-- Every attempt of every step, for GET /v1/orders/{id} and for the operator.
CREATE TABLE saga_steps (
    order_id uuid NOT NULL REFERENCES orders (id),
    step text NOT NULL,
    attempt integer NOT NULL,
    status text NOT NULL CHECK (status IN ('started', 'succeeded', 'failed', 'timed_out', 'abandoned')),
    detail text,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (order_id, step, attempt)
);

-- Idempotency-Key of POST /v1/orders: the fingerprint of the first request's body and the
-- answer it got, kept IDEMPOTENCY_TTL (48 h by default, never less than 24 h).
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    fingerprint bytea NOT NULL,
    order_id uuid NOT NULL,
    status smallint NOT NULL,
    response jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- Orders left needing attention, with why.
CREATE TABLE audit (
    id bigserial PRIMARY KEY,
    order_id uuid NOT NULL REFERENCES orders (id),
    event text NOT NULL,
    detail text,
    at timestamptz NOT NULL DEFAULT now()
);

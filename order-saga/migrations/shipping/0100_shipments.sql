-- Shipping: one shipment per order. `state`: created, cancelled (by a compensation, or a
-- tombstone when the cancellation came first), refused (destination not served).
CREATE TABLE shipments (
    order_id uuid PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('created', 'cancelled', 'refused')),
    reason text,
    country text,
    address jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

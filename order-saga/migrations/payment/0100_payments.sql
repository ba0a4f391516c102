-- Payment: one payment per order. `state`: authorizing (the provider is being asked),
-- authorized, captured, voided (a void, or a tombstone when the void came first),
-- refunded, declined.
CREATE TABLE payments (
    order_id uuid PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('authorizing', 'authorized', 'captured', 'voided', 'refunded', 'declined')),
    amount bigint NOT NULL CHECK (amount >= 0),
    currency text NOT NULL,
    provider_id text,
    -- Whether a request for the authorization may ever have reached the provider.
    attempted boolean NOT NULL DEFAULT false,
    reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

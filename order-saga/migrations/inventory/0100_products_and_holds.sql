-- Inventory: what can be sold, and what each order holds.
--
-- Per product, available + held + sold = received (every unit ever added): a reservation
-- moves units from available to held with one conditional UPDATE, a confirmation from held
-- to sold, a release back to available. The CHECKs make overselling impossible even for a
-- statement that forgot its WHERE.
CREATE TABLE products (
    id uuid PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    name text NOT NULL,
    price bigint NOT NULL CHECK (price >= 0),
    currency text NOT NULL,
    available integer NOT NULL CHECK (available >= 0),
    held integer NOT NULL DEFAULT 0 CHECK (held >= 0),
    sold integer NOT NULL DEFAULT 0 CHECK (sold >= 0),
    received integer NOT NULL CHECK (received >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (available + held + sold = received)
);

-- One row per order inventory has heard of. `state`: held (stock set aside until
-- expires_at), sold (confirmed), released (given back by a compensation, or a tombstone
-- when the release came first), refused (out of stock), expired (released by the sweeper).
CREATE TABLE holds (
    order_id uuid PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('held', 'sold', 'released', 'refused', 'expired')),
    reason text,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The sweeper's scan: live holds past their time.
CREATE INDEX holds_expiring ON holds (expires_at) WHERE state = 'held';

CREATE TABLE hold_lines (
    order_id uuid NOT NULL REFERENCES holds (order_id),
    product_id uuid NOT NULL REFERENCES products (id),
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
CREATE INDEX hold_lines_product ON hold_lines (product_id);

-- Notification history and group membership. Why this layout and these keys:
-- docs/adr/0004-notification-history-layout.md.

-- Each notification once, whatever its number of recipients.
CREATE TABLE notifications (
    id         uuid        PRIMARY KEY,  -- UUIDv7: time-ordered
    kind       text        NOT NULL,
    title      text        NOT NULL,
    message    text        NOT NULL,
    data       jsonb,
    created_at timestamptz NOT NULL
);

-- One row per (recipient, notification): the inbox. The primary key is the history index:
-- `WHERE user_id = $1 AND notification_id < $cursor ORDER BY notification_id DESC LIMIT n`
-- is one backward range scan of it, and recovery (`notification_id > $last`) a forward one.
CREATE TABLE deliveries (
    user_id         text NOT NULL,
    notification_id uuid NOT NULL,
    PRIMARY KEY (user_id, notification_id)
);

-- Membership, keyed for "who is in this group", which every broadcast reads.
CREATE TABLE group_members (
    group_id text        NOT NULL,
    user_id  text        NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, user_id)
);

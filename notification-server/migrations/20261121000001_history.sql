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

-- Direct sends: one row per (recipient, notification), the user's inbox. The primary key is
-- the index of both reads: `user_id = $1 AND notification_id < $cursor` backwards for history,
-- `notification_id > $last_id` forwards for recovery.
CREATE TABLE deliveries (
    user_id         text NOT NULL,
    notification_id uuid NOT NULL,
    PRIMARY KEY (user_id, notification_id)
);

-- Group broadcasts: one row per notification, however many members (fan-out on read).
CREATE TABLE group_notifications (
    group_id        text NOT NULL,
    notification_id uuid NOT NULL,
    PRIMARY KEY (group_id, notification_id)
);

-- Membership as intervals of ids: a member gets the group's broadcasts whose id is after
-- `since_id` (taken when they joined) and, once they left, before `until_id`. Leaving keeps
-- what was received; rejoining starts a new interval.
CREATE TABLE group_members (
    group_id text NOT NULL,
    user_id  text NOT NULL,
    since_id uuid NOT NULL,
    until_id uuid,
    PRIMARY KEY (group_id, user_id, since_id),
    CHECK (until_id IS NULL OR until_id >= since_id)
);
-- At most one open interval per member; also the index of "current members of a group".
CREATE UNIQUE INDEX group_members_current ON group_members (group_id, user_id)
    WHERE until_id IS NULL;
-- "Which groups is this user in", for history and recovery.
CREATE INDEX group_members_by_user ON group_members (user_id, group_id);

-- The `user:` channel's log (mobile_db::user_events): every event for one user gets the
-- user's next offset, in the transaction of the change that caused it, so an app that
-- was disconnected replays what it missed with `since`, as on a conversation.
--
-- The counter lives apart from `users`, so the events (a read on another device, a
-- finished upload) do not rewrite the row every request reads.
CREATE TABLE user_event_heads (
    user_id  uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    last_seq bigint NOT NULL CHECK (last_seq > 0)
);

-- The newest events of each user (older ones are pruned as new ones are written): the
-- exact JSON text of `data` as it was published, under its event name.
CREATE TABLE user_events (
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    seq        bigint NOT NULL CHECK (seq > 0),
    kind       text NOT NULL CHECK (length(kind) BETWEEN 1 AND 64),
    data       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, seq)
);

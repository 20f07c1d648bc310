-- Conversations, their members, and messages with a gap-free per-conversation `seq`.

CREATE TABLE conversations (
    id         uuid PRIMARY KEY,
    title      text,
    created_by uuid NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- The seq of the newest message. Posting a message increments it in the insert's
    -- transaction: the row lock serialises concurrent posts to one conversation, and a
    -- rolled-back post un-increments it, so seqs are gap-free and strictly increasing.
    last_seq   bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
);

CREATE TABLE conversation_members (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    joined_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, user_id)
);
-- "My conversations", newest first, and the membership check of every read.
CREATE INDEX conversation_members_user_idx ON conversation_members (user_id, conversation_id DESC);

CREATE TABLE messages (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             bigint NOT NULL CHECK (seq > 0),
    id              uuid NOT NULL,
    sender_id       uuid NOT NULL REFERENCES users (id),
    -- The sender's own id for the message: a retry after a lost response carries the
    -- same one and gets the first message back instead of a duplicate.
    client_msg_id   text NOT NULL CHECK (length(client_msg_id) BETWEEN 1 AND 128),
    body            text NOT NULL,
    media_id        uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq),
    CONSTRAINT messages_id_key UNIQUE (id),
    CONSTRAINT messages_client_msg_id_key UNIQUE (conversation_id, sender_id, client_msg_id)
);

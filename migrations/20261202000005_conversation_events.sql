-- Conversations a chat app can be built on (mobile_db::conversations): every change to a
-- conversation is an event with the next gap-free offset, members with an owner, read
-- positions and mute.
--
-- `conversations.last_seq` stays the one counter of a conversation's offsets: a message
-- takes the next one (its `seq`, event `message.created`), and so does every other
-- change, recorded in `conversation_events`. The offsets of both tables together are
-- 1, 2, 3, ... with no gaps, each assigned in its change's transaction.

-- An edit keeps the message's place; a deletion leaves a tombstone at it (body empty,
-- media detached).
ALTER TABLE messages
    ADD COLUMN edited_at  timestamptz,
    ADD COLUMN deleted_at timestamptz;

-- The owner may add and remove members; when the owner leaves, the member who joined
-- first after them becomes the owner. `last_activity_at` orders a user's list: the
-- newest message's time, or the conversation's creation.
ALTER TABLE conversations
    ADD COLUMN owner_id         uuid REFERENCES users (id),
    ADD COLUMN last_activity_at timestamptz;
UPDATE conversations c SET
    owner_id = c.created_by,
    last_activity_at = coalesce((SELECT max(m.created_at) FROM messages m WHERE m.conversation_id = c.id), c.created_at);
ALTER TABLE conversations
    ALTER COLUMN owner_id SET NOT NULL,
    ALTER COLUMN last_activity_at SET NOT NULL,
    ALTER COLUMN last_activity_at SET DEFAULT now();

-- Each member's read position (the newest offset they have seen: monotonic) and mute
-- (no pushes until then; 'infinity' for good; still counted unread).
ALTER TABLE conversation_members
    ADD COLUMN read_seq    bigint NOT NULL DEFAULT 0 CHECK (read_seq >= 0),
    ADD COLUMN muted_until timestamptz;

-- Every change but a new message: what happened, at which offset. Message events name
-- their message and are rendered from its row as it is now (an edited body, a
-- tombstone), so a replay never shows what was deleted; the others keep their `data`
-- as the exact JSON text that was published.
CREATE TABLE conversation_events (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             bigint NOT NULL CHECK (seq > 0),
    kind            text NOT NULL CHECK (kind IN ('message.updated', 'message.deleted', 'member.added', 'member.removed', 'conversation.updated')),
    message_id      uuid REFERENCES messages (id) ON DELETE CASCADE,
    data            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq),
    CHECK ((kind LIKE 'message.%') = (message_id IS NOT NULL AND data IS NULL))
);

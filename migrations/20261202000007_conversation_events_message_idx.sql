-- Deleting a conversation cascades to its messages, and each message to the events that
-- name it: without this index every cascaded message would scan the whole table.
CREATE INDEX conversation_events_message_id_idx ON conversation_events (message_id)
    WHERE message_id IS NOT NULL;

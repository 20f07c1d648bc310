-- Uploaded images. The original goes to object storage at upload; the worker decodes
-- it once, writes the variants, and marks the row `ready` (or `failed`, with why).

CREATE TABLE media (
    id             uuid PRIMARY KEY,
    owner_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status         text NOT NULL DEFAULT 'processing'
                   CHECK (status IN ('processing', 'ready', 'failed')),
    -- The declared type of the original, checked against its magic bytes at upload.
    content_type   text NOT NULL,
    byte_size      bigint NOT NULL CHECK (byte_size > 0),
    -- {"thumb": {"width", "height", "content_type", "etag", "byte_size"}, ...}
    variants       jsonb NOT NULL DEFAULT '{}',
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX media_owner_idx ON media (owner_id, id);

-- Who may see a picture besides its owner: members of a conversation it was posted to.
CREATE INDEX messages_media_idx ON messages (media_id) WHERE media_id IS NOT NULL;

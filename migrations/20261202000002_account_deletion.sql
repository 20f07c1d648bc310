-- Account deletion (DELETE /v1/me, mobile_db::accounts): the users row stays as a
-- tombstone under the messages its user sent to conversations others are still in,
-- with nothing personal left in it. Code of the previous release never sees one: a
-- tombstone's email is under `.invalid` and it has no sessions.
ALTER TABLE users ADD COLUMN deleted_at timestamptz;

-- What a user sees of their sessions (GET /v1/sessions): the app that signed in (its
-- User-Agent at sign-in) and the device it registered. A device belongs to the session
-- that last registered it; ending that session removes the device, so a phone that was
-- signed out from elsewhere (lost, sold) receives no more pushes.
--
-- Both columns are nullable additions: code of the previous release, which neither
-- reads nor writes them, runs unchanged against this schema during a rolling update.

ALTER TABLE sessions ADD COLUMN user_agent text;

ALTER TABLE devices
    ADD COLUMN session_id uuid REFERENCES sessions (id) ON DELETE SET NULL;
CREATE INDEX devices_session_id_idx ON devices (session_id) WHERE session_id IS NOT NULL;

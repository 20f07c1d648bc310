-- Sign in with Apple and Google: an account's identities at the providers, keyed by the
-- provider's stable subject (`sub`), never by email (an address can change hands; a
-- subject cannot). An account may have several (Apple and Google) and no password:
-- `users.password_hash` is then '' (no password matches it).
CREATE TABLE identities (
    provider   text NOT NULL CHECK (provider IN ('apple', 'google')),
    subject    text NOT NULL CHECK (length(subject) BETWEEN 1 AND 255),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- The address the provider gave at linking (Apple's may be a private relay).
    email      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, subject)
);
CREATE INDEX identities_user_id_idx ON identities (user_id);

-- Email (mobile_db::email): an account's address is verified by a link sent to it, and a
-- forgotten password is reset by a link sent to the account's address.
--
-- When the address was last proven to be the account's: by a link from a mail, or by
-- Apple or Google vouching for it. NULL: no one has proven it.
ALTER TABLE users ADD COLUMN email_verified_at timestamptz;

-- Accounts made by Apple or Google hold an address the provider verified.
UPDATE users u SET email_verified_at = u.created_at
WHERE u.password_hash = '' AND u.deleted_at IS NULL
  AND EXISTS (SELECT 1 FROM identities i WHERE i.user_id = u.id);

-- The links' tokens, as their SHA-256 only: whoever reads this table cannot use one.
-- A token is spent by deleting its row, so it works once; it also expires.
CREATE TABLE email_tokens (
    token_hash bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose    text NOT NULL CHECK (purpose IN ('verify_email', 'reset_password', 'restore_email')),
    -- The address the mail went to: the one a verification proves (a new address, for
    -- a change), the one a reset was asked for (the reset fails if it changed since),
    -- or the one an email change would leave, which a restore puts back.
    email      text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX email_tokens_user_id_idx ON email_tokens (user_id);
-- Expired tokens are swept whenever a token is made.
CREATE INDEX email_tokens_expires_at_idx ON email_tokens (expires_at);

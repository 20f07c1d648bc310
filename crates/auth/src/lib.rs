//! Authentication without HTTP: access tokens, refresh tokens, password hashing.
//!
//! - [`keys`]: Ed25519 keys from PEM files, named by their RFC 7638 thumbprint (`kid`),
//!   several verify keys at once so signing keys rotate without downtime; and
//!   [`TokenConfig`], the settings a binary loads its keys from.
//! - [`bearer`]: the `Authorization: Bearer` header, read one way everywhere.
//! - [`access`]: short-lived EdDSA JWTs; the algorithm is pinned, never read from the
//!   token.
//! - [`refresh`]: opaque random refresh tokens; only their SHA-256 is ever stored.
//! - [`password`]: argon2id on the blocking pool, and a login check that takes as
//!   long for an unknown email as for a wrong password.

pub mod access;
pub mod bearer;
pub mod keys;
pub mod password;
pub mod refresh;

pub use access::{AccessClaims, AccessTokens, TokenError};
pub use bearer::bearer_token;
pub use keys::{KeyError, SigningKey, TokenConfig, VerifyKeys};

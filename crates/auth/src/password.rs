//! Password hashing with argon2id, on the blocking pool.
//!
//! Parameters are OWASP's first recommendation for argon2id (19 MiB, 2 passes, one
//! lane), tens of milliseconds of one core per hash. Hashing runs in
//! `spawn_blocking` so a burst of logins queues there instead of stalling the async
//! workers that serve every other request, and at most two hashes per core run at once:
//! tokio's blocking pool has 512 threads, and 512 concurrent hashes would want 9.5 GiB.
//! Excess logins wait (asynchronously) for a permit, bounded by the request timeout.

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::{SaltString, rand_core::OsRng},
};
use std::sync::LazyLock;

use mobile_domain::Password;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Hashes allowed to run at once: two per core keeps every core busy, memory bounded.
static HASHING_PERMITS: LazyLock<Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    Semaphore::new(cores * 2)
});

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the blocking pool is gone: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the hashing semaphore is closed")]
    Closed(#[from] tokio::sync::AcquireError),
}

fn argon2() -> Argon2<'static> {
    // 19 MiB, 2 iterations, 1 lane; fixed, so stored hashes stay comparable.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a new password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub async fn hash(password: Password) -> Result<String, PasswordError> {
    spawn_blocking_in_span(move || {
        let salt = SaltString::generate(&mut OsRng);
        argon2()
            .hash_password(password.expose().as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| PasswordError::Hash(e.to_string()))
    })
    .await?
}

/// Checks a candidate password against a stored hash. With no stored hash (unknown
/// email) it checks against a dummy, so the answer takes as long either way and the
/// response time does not reveal which emails have accounts.
pub async fn verify(candidate: String, stored: Option<String>) -> Result<bool, PasswordError> {
    spawn_blocking_in_span(move || {
        let (stored, known) = match stored {
            Some(stored) => (stored, true),
            None => (dummy_hash().to_owned(), false),
        };
        let parsed = PasswordHash::new(&stored).map_err(|e| PasswordError::Hash(e.to_string()))?;
        let matches = argon2()
            .verify_password(candidate.as_bytes(), &parsed)
            .is_ok();
        Ok(known && matches)
    })
    .await?
}

/// A hash of a random password, made once, with the same parameters as real ones.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        argon2()
            .hash_password(salt.as_str().as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .unwrap_or_default()
    })
}

/// `spawn_blocking` under a hashing permit, keeping the caller's tracing span so the
/// hash shows up inside the request that caused it.
async fn spawn_blocking_in_span<T, F>(work: F) -> Result<T, PasswordError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let _permit = HASHING_PERMITS.acquire().await?;
    let span = tracing::Span::current();
    Ok(tokio::task::spawn_blocking(move || span.in_scope(work))
        .instrument(tracing::Span::current())
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_and_verify() {
        let password = Password::parse("correct horse battery").unwrap();
        let stored = hash(password).await.unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(
            verify("correct horse battery".into(), Some(stored.clone()))
                .await
                .unwrap()
        );
        assert!(
            !verify("wrong horse battery".into(), Some(stored))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn unknown_users_never_match() {
        // Not even with the dummy's own password (its salt), which a caller cannot know.
        assert!(!verify("anything at all".into(), None).await.unwrap());
    }
}

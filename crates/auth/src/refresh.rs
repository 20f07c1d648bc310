//! Refresh tokens: 256 random bits, shown to the client once, stored only as SHA-256.
//!
//! A plain hash (not argon2) is right here: the token has 256 bits of entropy, so there
//! is nothing to brute-force, and lookup must be an index hit.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The prefix makes a leaked token recognisable to secret scanners.
const PREFIX: &str = "rt_";
const RANDOM_BYTES: usize = 32;

/// A new refresh token and the hash to store.
#[derive(Debug)]
pub struct NewRefreshToken {
    pub token: String,
    pub hash: [u8; 32],
}

pub fn generate() -> NewRefreshToken {
    let mut bytes = [0u8; RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&token);
    NewRefreshToken { token, hash }
}

/// The stored form of a presented token, or `None` when it cannot be one of ours
/// (so garbage never reaches the database).
pub fn parse(presented: &str) -> Option<[u8; 32]> {
    let encoded = presented.strip_prefix(PREFIX)?;
    let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    (bytes.len() == RANDOM_BYTES).then(|| hash(presented))
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_to_their_hash() {
        let new = generate();
        assert!(new.token.starts_with("rt_"));
        assert_eq!(parse(&new.token), Some(new.hash));
        assert_ne!(generate().token, new.token);
    }

    #[test]
    fn garbage_does_not_parse() {
        for garbage in [
            "",
            "rt_",
            "rt_abc",
            "xx_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "rt_!!!",
        ] {
            assert_eq!(parse(garbage), None, "{garbage:?}");
        }
    }
}

//! The `Authorization: Bearer <token>` header (RFC 6750), read one way everywhere: the
//! API's middleware, its internal endpoints and the gateway's upgrade.

/// The token of an `Authorization` header value using the Bearer scheme. The scheme
/// is case-insensitive (RFC 9110 §11.1), separated from the token by one or more
/// spaces; the token is a non-empty `token68` (RFC 9110 §11.2).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    let token68 = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
    let body = token.trim_end_matches('=');
    (!body.is_empty() && body.bytes().all(token68)).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_a_token68() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(
            bearer_token("BEARER a.b-c_d~e+f/g=="),
            Some("a.b-c_d~e+f/g==")
        );
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer a b"), None);
        assert_eq!(bearer_token("Bearer ==="), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
}

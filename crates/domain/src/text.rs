//! The rules for text from outside, shared by the parsers, and the character classes
//! that publish them as patterns in the OpenAPI document (`crate::schema`).
//!
//! Patterns are written in the subset ECMA-262 (what OpenAPI names), Python's `re`
//! (what contract testers run) and Java agree on: explicit character classes, no
//! `\s` or `.`, and no `$` (Python's also matches before a final newline); the end is
//! `(?![\s\S])`. The tests check each pattern against its parser.

/// Control characters (Unicode category Cc), as the body of a character class.
pub const CONTROL: &str = r"\x00-\x1f\x7f-\x9f";
/// Unicode `White_Space` that is not a control character.
pub const SPACE: &str = r" \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
/// All of Unicode `White_Space`: what `str::trim` removes.
pub const WHITE_SPACE: &str = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// One line of printable text: no control characters, not blank, at most `max`
/// characters as sent. Returns it trimmed.
pub(crate) fn printable_line(raw: &str, max: usize) -> Option<&str> {
    if raw.chars().count() > max || raw.chars().any(char::is_control) {
        return None;
    }
    let trimmed = raw.trim();
    (!trimmed.is_empty()).then_some(trimmed)
}

/// The pattern of [`printable_line`] (lengths are `minLength`/`maxLength`).
pub fn printable_line_pattern() -> String {
    format!("[^{CONTROL}]*[^{CONTROL}{SPACE}][^{CONTROL}]*")
}

/// Free text (a message): anything but NUL, which PostgreSQL cannot store, and not
/// blank.
pub(crate) fn is_free_text(raw: &str) -> bool {
    !raw.contains('\0') && !raw.trim().is_empty()
}

pub fn free_text_pattern() -> String {
    format!(r"[^\x00]*[^\x00{WHITE_SPACE}][^\x00]*")
}

/// A pattern anchored at both ends, in the portable form described above.
pub fn anchored(body: &str) -> String {
    format!(r"^(?:{body})(?![\s\S])")
}

#[cfg(test)]
pub(crate) mod tests {
    //! Parity between a parser and its published pattern, on strings built to sit at
    //! the edges of the rules (white space of every kind, controls, lengths) and on
    //! random ones.

    use proptest::prelude::*;

    /// The published pattern, as Rust's `regex` runs it (`\z` for the portable end).
    pub(crate) fn matcher(body: &str) -> regex::Regex {
        regex::Regex::new(&format!(r"^(?:{body})\z")).unwrap()
    }

    /// Characters the rules treat specially, plus ordinary ones.
    pub(crate) fn edgy_char() -> impl Strategy<Value = char> {
        prop_oneof![
            Just(' '),
            Just('\t'),
            Just('\n'),
            Just('\0'),
            Just('\u{7f}'),
            Just('\u{85}'),
            Just('\u{a0}'),
            Just('\u{2007}'),
            Just('\u{200b}'),
            Just('\u{3000}'),
            Just('\u{feff}'),
            Just('@'),
            Just('.'),
            Just('-'),
            Just('_'),
            Just('é'),
            Just('😀'),
            proptest::char::range('a', 'z'),
            proptest::char::range('A', 'F'),
            proptest::char::range('0', '9'),
            any::<char>(),
        ]
    }

    pub(crate) fn edgy_string(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(edgy_char(), 0..max).prop_map(|chars| chars.into_iter().collect())
    }
}

//! The mails' texts, one set per language, compiled into the binary from
//! `crates/worker/templates/<language>/<template>.txt`.
//!
//! A template's first line is `Subject: …`, then an empty line, then the plain-text
//! body. `{name}` is replaced by a value: `{app_name}`, `{email}` (the address the mail
//! goes to), `{link}`, `{valid_for}` (how long the link works, in the language's
//! words) and `{new_email}`. Each template uses only the names its English original
//! uses (a test checks every language against English).
//!
//! Adding a language (docs/email.md): copy `templates/en` to `templates/<tag>` (a
//! BCP 47 tag: `fr`, `pt-BR`), translate the three files, and add one
//! `language!(…)` line to [`LANGUAGES`] with the words for minutes, hours and days.

use std::time::Duration;

use mobile_db::email::Mail;

/// One language's templates and the words `{valid_for}` is made of.
#[derive(Debug)]
pub struct Language {
    /// A BCP 47 tag: `en`, `de`, `pt-BR`.
    pub tag: &'static str,
    /// Singular and plural of minute, hour and day.
    pub units: [(&'static str, &'static str); 3],
    verify_email: &'static str,
    reset_password: &'static str,
    email_change_requested: &'static str,
}

macro_rules! language {
    ($tag:literal, $units:expr) => {
        Language {
            tag: $tag,
            units: $units,
            verify_email: include_str!(concat!("../../templates/", $tag, "/verify_email.txt")),
            reset_password: include_str!(concat!("../../templates/", $tag, "/reset_password.txt")),
            email_change_requested: include_str!(concat!(
                "../../templates/",
                $tag,
                "/email_change_requested.txt"
            )),
        }
    };
}

/// Every language, English first: the one used when nothing else matches.
pub static LANGUAGES: &[Language] = &[
    language!(
        "en",
        [("minute", "minutes"), ("hour", "hours"), ("day", "days")]
    ),
    language!(
        "de",
        [
            ("Minute", "Minuten"),
            ("Stunde", "Stunden"),
            ("Tag", "Tage")
        ]
    ),
];

/// The values a template's `{name}`s are replaced by.
#[derive(Debug)]
pub struct Values<'a> {
    pub app_name: &'a str,
    pub link: Option<&'a str>,
    pub valid_for: Option<Duration>,
}

/// A rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
    /// The language it is in.
    pub language: &'static str,
}

/// The first of `preferences` (BCP 47 tags, best first) that there are templates in:
/// an exact tag first (`pt-BR`), else its language (`pt`); else English.
pub fn pick<'a>(preferences: impl IntoIterator<Item = &'a str>) -> &'static Language {
    for wanted in preferences {
        let wanted = wanted.trim();
        let primary = wanted.split(['-', '_']).next().unwrap_or(wanted);
        let found = LANGUAGES
            .iter()
            .find(|l| l.tag.eq_ignore_ascii_case(&wanted.replace('_', "-")))
            .or_else(|| {
                LANGUAGES
                    .iter()
                    .find(|l| l.tag.eq_ignore_ascii_case(primary))
            });
        if let Some(language) = found {
            return language;
        }
    }
    &LANGUAGES[0]
}

impl Language {
    fn template(&self, mail: &Mail) -> &'static str {
        match mail {
            Mail::VerifyEmail { .. } => self.verify_email,
            Mail::ResetPassword { .. } => self.reset_password,
            Mail::EmailChangeRequested { .. } => self.email_change_requested,
        }
    }

    /// `mail` in this language. Fails only on a template that breaks the format (a
    /// test renders every one).
    pub fn render(&self, mail: &Mail, values: &Values<'_>) -> Result<Rendered, String> {
        let text = self.template(mail);
        let (first, body) = text.split_once("\n\n").ok_or_else(|| {
            format!(
                "{}/{}: no empty line after the subject",
                self.tag,
                mail.template()
            )
        })?;
        let subject = first.strip_prefix("Subject: ").ok_or_else(|| {
            format!(
                "{}/{}: the first line is not `Subject: …`",
                self.tag,
                mail.template()
            )
        })?;
        let valid_for = values.valid_for.map(|d| self.duration(d));
        let new_email = match mail {
            Mail::EmailChangeRequested { new_email, .. } => Some(new_email.as_str()),
            _ => None,
        };
        let lookup = |name: &str| match name {
            "app_name" => Some(values.app_name),
            "email" => Some(mail.to()),
            "link" => values.link,
            "valid_for" => valid_for.as_deref(),
            "new_email" => new_email,
            _ => None,
        };
        let fill = |text: &str| {
            substitute(text, lookup).map_err(|name| {
                format!("{}/{}: no value for {{{name}}}", self.tag, mail.template())
            })
        };
        Ok(Rendered {
            subject: fill(subject)?,
            body: fill(body.trim_end())? + "\n",
            language: self.tag,
        })
    }

    /// A whole number of days, hours or minutes: `1 day`, `24 hours`, `30 minutes`.
    fn duration(&self, duration: Duration) -> String {
        let minutes = (duration.as_secs() / 60).max(1);
        let [minute, hour, day] = self.units;
        let (count, (one, many)) = if minutes.is_multiple_of(24 * 60) {
            (minutes / (24 * 60), day)
        } else if minutes.is_multiple_of(60) {
            (minutes / 60, hour)
        } else {
            (minutes, minute)
        };
        format!("{count} {}", if count == 1 { one } else { many })
    }
}

/// Replaces each `{name}` in `text` by `value(name)`; the first name without a value is
/// the error.
fn substitute<'v>(text: &str, value: impl Fn(&str) -> Option<&'v str>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len() + 128);
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| "an unclosed `{`".to_owned())?;
        let name = &after[..end];
        out.push_str(value(name).ok_or_else(|| name.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use super::*;
    use mobile_domain::UserId;

    fn mails() -> Vec<Mail> {
        let user_id = UserId::new();
        vec![
            Mail::VerifyEmail {
                user_id,
                email: "ann@example.com".into(),
            },
            Mail::ResetPassword {
                email: "ann@example.com".into(),
            },
            Mail::EmailChangeRequested {
                user_id,
                email: "ann@example.com".into(),
                new_email: "ann@example.org".into(),
            },
        ]
    }

    fn names(text: &str) -> BTreeSet<String> {
        text.split('{')
            .skip(1)
            .filter_map(|part| part.split_once('}').map(|(name, _)| name.to_owned()))
            .collect()
    }

    #[test]
    fn every_language_renders_every_template_with_the_names_english_uses() {
        let values = Values {
            app_name: "Chatty",
            link: Some("https://example.com/app/verify-email#token=abc"),
            valid_for: Some(Duration::from_secs(86_400)),
        };
        for mail in mails() {
            let english = names(LANGUAGES[0].template(&mail));
            for language in LANGUAGES {
                assert_eq!(
                    names(language.template(&mail)),
                    english,
                    "{}/{}",
                    language.tag,
                    mail.template()
                );
                let rendered = language.render(&mail, &values).unwrap();
                assert!(rendered.subject.contains("Chatty"), "{rendered:?}");
                assert!(!rendered.body.contains('{'), "{rendered:?}");
                assert!(!rendered.subject.contains('\n'), "{rendered:?}");
            }
        }
    }

    #[test]
    fn the_exact_tag_then_the_language_then_english() {
        assert_eq!(pick(["de-AT", "en"]).tag, "de");
        assert_eq!(pick(["fr", "de"]).tag, "de");
        assert_eq!(pick(["fr"]).tag, "en");
        assert_eq!(pick(["DE_de"]).tag, "de");
        assert_eq!(pick([]).tag, "en");
    }

    #[test]
    fn durations_in_whole_units() {
        let en = pick(["en"]);
        assert_eq!(en.duration(Duration::from_secs(86_400)), "1 day");
        assert_eq!(en.duration(Duration::from_secs(3_600)), "1 hour");
        assert_eq!(en.duration(Duration::from_secs(7_200)), "2 hours");
        assert_eq!(en.duration(Duration::from_secs(1_800)), "30 minutes");
        assert_eq!(
            pick(["de"]).duration(Duration::from_secs(172_800)),
            "2 Tage"
        );
    }

    #[test]
    fn a_missing_value_is_named() {
        assert_eq!(substitute("a {x} b", |_| None), Err("x".to_owned()));
        assert_eq!(substitute("a {x} b", |_| Some("y")).unwrap(), "a y b");
    }
}

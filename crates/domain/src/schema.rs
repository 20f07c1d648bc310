//! The OpenAPI schemas of the domain's types, built from the constants and patterns
//! their parsers check, so the document says exactly what the server accepts. A
//! request body's field names one with `#[schema(schema_with = ...)]`.

use serde_json::json;
use utoipa::openapi::{
    RefOr,
    schema::{ObjectBuilder, Schema, SchemaFormat, SchemaType, Type},
};

use crate::{
    AppVersion, ClientMsgId, DisplayName, Email, Locale, MessageText, NotificationText, Password,
    Platform, PushToken, Title, text,
};

pub(crate) fn uuid(description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Uuid,
        )))
        .description(Some(description))
        .into()
}

pub(crate) fn string_enum<'a>(
    description: &str,
    values: impl Iterator<Item = &'a str>,
) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.collect::<Vec<_>>()))
        .description(Some(description))
        .into()
}

/// A string with a pattern (anchored here), lengths and one example the server
/// accepts.
fn text(
    description: &str,
    pattern: &str,
    (min, max): (usize, usize),
    example: &str,
) -> RefOr<Schema> {
    text_builder(description, pattern, (min, max), example).into()
}

fn text_builder(
    description: &str,
    pattern: &str,
    (min, max): (usize, usize),
    example: &str,
) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
        .pattern(Some(text::anchored(pattern)))
        .description(Some(description))
        .examples([json!(example)])
}

/// An optional field's schema: the value, or `null` (the same as leaving it out).
fn or_null(builder: ObjectBuilder) -> RefOr<Schema> {
    builder
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .into()
}

pub fn email() -> RefOr<Schema> {
    text(
        "An email address; compared and stored lower-cased, surrounding white space ignored",
        &Email::pattern(),
        (3, Email::MAX_CHARS),
        "ann@example.com",
    )
}

/// A new password: the length, and not a repeated character or a commonly breached
/// password (the pattern's lookahead).
pub fn new_password() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(Password::MIN_CHARS))
        .max_length(Some(Password::MAX_CHARS))
        .pattern(Some(Password::pattern()))
        .description(Some(
            "10 to 128 characters; not one repeated character, not a commonly breached password",
        ))
        .examples([json!("correct horse battery staple")])
        .into()
}

/// A password presented to sign in: anything up to the cap.
pub fn presented_password() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(Password::MAX_PRESENTED_CHARS))
        .examples([json!("correct horse battery staple")])
        .into()
}

fn display_name_builder() -> ObjectBuilder {
    text_builder(
        "The name other users see: one printable line, not blank; stored trimmed",
        &text::printable_line_pattern(),
        (1, DisplayName::MAX_CHARS),
        "Ann Lee",
    )
}

pub fn display_name() -> RefOr<Schema> {
    display_name_builder().into()
}

pub fn display_name_or_null() -> RefOr<Schema> {
    or_null(display_name_builder())
}

fn title_builder() -> ObjectBuilder {
    text_builder(
        "One printable line, not blank; stored trimmed",
        &text::printable_line_pattern(),
        (1, Title::MAX_CHARS),
        "Weekend trip",
    )
}

pub fn title() -> RefOr<Schema> {
    title_builder().into()
}

pub fn title_or_null() -> RefOr<Schema> {
    or_null(title_builder())
}

pub fn message_body() -> RefOr<Schema> {
    text(
        "Not blank, no NUL; kept exactly as sent",
        &text::free_text_pattern(),
        (1, MessageText::MAX_CHARS),
        "See you at 8!",
    )
}

pub fn notification_body() -> RefOr<Schema> {
    text(
        "Not blank, no NUL",
        &text::free_text_pattern(),
        (1, NotificationText::MAX_CHARS),
        "It arrives on Thursday.",
    )
}

pub fn client_msg_id() -> RefOr<Schema> {
    text(
        "The client's own id for this message; a retry with the same one returns the first message instead of posting twice",
        ClientMsgId::pattern(),
        (1, ClientMsgId::MAX_CHARS),
        "6f1c1c0e-4d2a-4d0b-9a57-2f1c2d3e4f50",
    )
}

pub fn ios_push_token() -> RefOr<Schema> {
    let (min, max) = PushToken::APNS_BYTES;
    text(
        "The APNs device token, hexadecimal",
        &PushToken::pattern(Platform::Ios),
        (2 * min, 2 * max),
        &"a1".repeat(32),
    )
}

pub fn android_push_token() -> RefOr<Schema> {
    text(
        "The FCM registration token",
        &PushToken::pattern(Platform::Android),
        PushToken::FCM_CHARS,
        "dQw4w9WgXcQ:APA91bH-example_registration_token",
    )
}

pub fn app_version_or_null() -> RefOr<Schema> {
    or_null(text_builder(
        "The app's version as it reports it",
        &text::printable_line_pattern(),
        (1, AppVersion::MAX_CHARS),
        "2.14.0 (311)",
    ))
}

pub fn locale_or_null() -> RefOr<Schema> {
    or_null(text_builder(
        "BCP 47 language tag, used to localise pushes",
        Locale::pattern(),
        (2, Locale::MAX_CHARS),
        "pt-BR",
    ))
}

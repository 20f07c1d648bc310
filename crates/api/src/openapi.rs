//! The OpenAPI 3.1 document: the frame here, the paths from the handlers' annotations,
//! and every error response generated from [`ErrorCode`].
//!
//! An operation declares only the problems that are its own, with a type made by
//! [`problems!`](crate::problems); [`finish`] adds those every operation of its shape
//! can answer (a JSON body's, a path parameter's, a bearer token's, an idempotent
//! POST's, a rate-limited route's, and the 5xx every one can), then writes each error
//! response from the codes it carries: the description lists them with their meaning,
//! and `x-problem-codes` lists them for machines (and for
//! `middleware::contract`, which holds the routes to them in debug builds).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::http::{Method, StatusCode};
use mobile_domain::ValidationCode;
use serde_json::{Map, Value, json};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::error::{ErrorCode, PROBLEM_JSON, Problem};

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "mobile-backend API",
        description = "The REST API of mobile-backend. Errors are RFC 9457 problem documents \
                       (`application/problem+json`) with a stable `code`; each operation lists \
                       the codes it can answer with, per status, in `x-problem-codes`. Every \
                       response carries `x-request-id`. A signed-in user's POST endpoints (all \
                       but the upload) accept `Idempotency-Key`.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(Problem)),
    tags(
        (name = "auth", description = "Accounts, sessions and tokens"),
        (name = "me", description = "The signed-in user"),
        (name = "sessions", description = "Where the user is signed in; ending a session"),
        (name = "devices", description = "Push-notification devices"),
        (name = "conversations", description = "Conversations and messages"),
        (name = "media", description = "Image uploads and their variants"),
        (name = "internal", description = "For the app's other backends (INTERNAL_API_TOKEN)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An access token from /v1/auth/login, /register or /refresh",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "internal",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The deployment's INTERNAL_API_TOKEN"))
                    .build(),
            ),
        );
    }
}

/// Declares a type listing the problems an operation answers with besides those of
/// its shape, for its `#[utoipa::path(responses(...))]`:
///
/// ```ignore
/// problems!(RegisterProblems: EmailTaken, Invalid(InvalidEmail), Invalid(WeakPassword));
/// ```
#[macro_export]
macro_rules! problems {
    ($name:ident: $($code:ident $(($validation:ident))?),+ $(,)?) => {
        #[derive(Debug)]
        struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                $crate::openapi::declared(&[
                    $($crate::problems!(@code $code $(($validation))?)),+
                ])
            }
        }
    };
    (@code Invalid($validation:ident)) => {
        $crate::error::ErrorCode::Invalid(mobile_domain::ValidationCode::$validation)
    };
    (@code $code:ident) => {
        $crate::error::ErrorCode::$code
    };
}

/// The extension that carries an error response's codes.
pub const CODES_EXTENSION: &str = "x-problem-codes";

/// An operation's own problems, as responses carrying only their codes; [`finish`]
/// writes the rest.
pub fn declared(
    codes: &[ErrorCode],
) -> BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>> {
    let mut by_status: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for code in codes {
        by_status
            .entry(code.status().as_u16().to_string())
            .or_default()
            .push(code.as_str());
    }
    by_status
        .into_iter()
        .map(|(status, codes)| {
            let extensions = utoipa::openapi::extensions::ExtensionsBuilder::new()
                .add(CODES_EXTENSION, json!(codes))
                .build();
            let response = utoipa::openapi::response::ResponseBuilder::new()
                .description("")
                .extensions(Some(extensions))
                .build();
            (status, response.into())
        })
        .collect()
}

/// Every code by its spelling, validation codes included.
fn all_codes() -> HashMap<&'static str, ErrorCode> {
    ErrorCode::ALL
        .iter()
        .copied()
        .chain(ValidationCode::ALL.into_iter().map(ErrorCode::Invalid))
        .map(|code| (code.as_str(), code))
        .collect()
}

/// Completes the document the router assembled: the problems of each operation's
/// shape, and every error response written from its codes.
pub fn finish(document: &utoipa::openapi::OpenApi) -> Value {
    let mut document = serde_json::to_value(document).unwrap_or_default();
    let codes = all_codes();
    if let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, operation) in item.iter_mut() {
                let shape = Shape::of(path, method, operation);
                let responses = operation
                    .as_object_mut()
                    .and_then(|o| o.get_mut("responses"))
                    .and_then(Value::as_object_mut);
                if let Some(responses) = responses {
                    for code in shape.problems() {
                        add_code(responses, code);
                    }
                    for (status, response) in responses.iter_mut() {
                        write_problem_response(status, response, &codes);
                    }
                }
            }
        }
    }
    document
}

/// What about an operation decides which problems it shares with others.
struct Shape {
    json_body: bool,
    uuid_in_path: bool,
    query: bool,
    bearer: bool,
    internal: bool,
    idempotent: bool,
    rate_limited: bool,
}

impl Shape {
    fn of(path: &str, method: &str, operation: &Value) -> Self {
        let parameters = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let security: Vec<&str> = operation["security"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .flat_map(|requirement| requirement.keys().map(String::as_str))
            .collect();
        let bearer = security.contains(&"bearer");
        Self {
            json_body: operation["requestBody"]["content"]
                .get("application/json")
                .is_some(),
            // Ids are `$ref`s to their named uuid schemas; free-text segments (a
            // variant's name) are plain strings that cannot be malformed.
            uuid_in_path: parameters.iter().any(|p| {
                p["in"] == "path"
                    && (p["schema"]["format"] == "uuid" || p["schema"]["$ref"].is_string())
            }),
            query: parameters.iter().any(|p| p["in"] == "query"),
            bearer,
            internal: security.contains(&"internal"),
            // A signed-in user's POSTs but uploads (middleware::idempotency).
            idempotent: bearer && crate::middleware::idempotency::applies(method, path),
            // The auth routes per client IP; the signed-in user's writes per user.
            rate_limited: path.starts_with("/v1/auth/") || (bearer && method != "get"),
        }
    }

    fn problems(&self) -> Vec<ErrorCode> {
        use ErrorCode::*;
        let mut codes = vec![
            Internal,
            DatabaseUnavailable,
            WriteConflict,
            Timeout,
            Overloaded,
        ];
        if self.json_body {
            codes.extend([
                BodyTimeout,
                MalformedJson,
                UnreadableBody,
                PayloadTooLarge,
                UnsupportedMediaType,
                ValidationFailed,
            ]);
        }
        if self.uuid_in_path {
            codes.push(InvalidPathParameter);
        }
        if self.query {
            codes.push(InvalidQuery);
        }
        if self.bearer {
            codes.extend([Unauthenticated, TokenExpired, InvalidToken]);
        }
        if self.internal {
            // Without INTERNAL_API_TOKEN the internal endpoints do not exist.
            codes.extend([Unauthenticated, NotFound]);
        }
        if self.idempotent {
            codes.extend([
                InvalidIdempotencyKey,
                IdempotencyRequestInFlight,
                IdempotencyKeyReused,
            ]);
        }
        if self.rate_limited {
            codes.push(RateLimited);
        }
        codes
    }
}

fn add_code(responses: &mut Map<String, Value>, code: ErrorCode) {
    let status = code.status().as_u16().to_string();
    let response = responses
        .entry(status)
        .or_insert_with(|| json!({ CODES_EXTENSION: [] }));
    if response.get(CODES_EXTENSION).is_none() {
        response[CODES_EXTENSION] = json!([]);
    }
    if let Some(list) = response[CODES_EXTENSION].as_array_mut()
        && !list.iter().any(|c| c == code.as_str())
    {
        list.push(json!(code.as_str()));
    }
}

/// Writes an error response from its codes: the description, the problem body, and
/// the headers its status carries.
fn write_problem_response(status: &str, response: &mut Value, codes: &HashMap<&str, ErrorCode>) {
    let Some(listed) = response.get(CODES_EXTENSION).and_then(Value::as_array) else {
        return;
    };
    let mut names: Vec<&str> = listed.iter().filter_map(Value::as_str).collect();
    names.sort_unstable();
    names.dedup();
    let lines: Vec<String> = names
        .iter()
        .map(|name| {
            let meaning = codes.get(name).map_or("", |code| code.meaning());
            format!("- `{name}`: {meaning}")
        })
        .collect();
    let mut written = json!({
        "description": lines.join("\n"),
        "content": { PROBLEM_JSON: { "schema": { "$ref": "#/components/schemas/Problem" } } },
        CODES_EXTENSION: names,
    });
    let header =
        |description: &str| json!({ "description": description, "schema": { "type": "string" } });
    match status
        .parse::<u16>()
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        Some(StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) => {
            written["headers"] =
                json!({ "Retry-After": header("Seconds to wait before retrying") });
        }
        Some(StatusCode::UNAUTHORIZED) => {
            written["headers"] =
                json!({ "WWW-Authenticate": header("The Bearer challenge (RFC 6750)") });
        }
        _ => {}
    }
    *response = written;
}

/// What each route may answer with, read back from the finished document: (method,
/// route template) → (status, code).
pub type Contract = HashMap<(Method, String), BTreeSet<(u16, String)>>;

pub fn contract(document: &Value) -> Contract {
    let mut contract = Contract::new();
    let Some(paths) = document["paths"].as_object() else {
        return contract;
    };
    for (path, item) in paths {
        for (method, operation) in item.as_object().into_iter().flatten() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let allowed = contract.entry((method, path.clone())).or_default();
            for (status, response) in operation["responses"].as_object().into_iter().flatten() {
                let Ok(status) = status.parse::<u16>() else {
                    continue;
                };
                for code in response[CODES_EXTENSION].as_array().into_iter().flatten() {
                    if let Some(code) = code.as_str() {
                        allowed.insert((status, code.to_owned()));
                    }
                }
            }
        }
    }
    contract
}

//! The OpenAPI 3.1 document's frame; the paths come from the handlers' annotations.

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::error::Problem;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mobile-backend API",
        description = "The REST API of mobile-backend. Errors are RFC 9457 problem documents \
                       (`application/problem+json`) with a stable `code`. Every response carries \
                       `x-request-id`. POST endpoints accept `Idempotency-Key`.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(Problem)),
    tags(
        (name = "auth", description = "Accounts, sessions and tokens"),
        (name = "me", description = "The signed-in user"),
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

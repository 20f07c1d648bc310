//! `/v1/devices`: the app installations a user receives pushes on.
//!
//! The app generates a UUID once per installation and `PUT`s its current push token
//! under it on every start and whenever the platform rotates the token. `PUT` is an
//! idempotent upsert: 201 the first time, 200 after.

use axum::{extract::State, http::StatusCode};
use mobile_db::devices::{self, DeviceRegistration, Upsert};
use mobile_domain::{ApnsEnvironment, AppVersion, DeviceId, Locale, Platform, PushToken};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::pagination::{self, PageQuery};
use crate::{
    error::{ApiError, Problem},
    extract::{AuthUser, Json, Path, Query},
    middleware::rate_limit::{self, Class},
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_devices))
        .routes(routes!(put_device, delete_device))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutDevice {
    /// `ios` or `android`.
    #[schema(example = "ios")]
    pub platform: String,
    /// The APNs device token (hex) or FCM registration token.
    pub push_token: String,
    #[schema(example = "2.14.0 (311)")]
    pub app_version: Option<String>,
    /// BCP 47 language tag, used to localise pushes.
    #[schema(example = "pt-BR")]
    pub locale: Option<String>,
    /// iOS only: `production` or `sandbox` (development builds).
    #[schema(example = "production")]
    pub apns_environment: Option<String>,
}

impl PutDevice {
    fn parse(self, id: Uuid) -> Result<DeviceRegistration, ApiError> {
        let platform: Platform = self.platform.parse()?;
        let apns_environment = self
            .apns_environment
            .as_deref()
            .map(str::parse::<ApnsEnvironment>)
            .transpose()?;
        if apns_environment.is_some() && platform != Platform::Ios {
            return Err(ApiError::unprocessable(
                "invalid_apns_environment",
                "apns_environment applies to ios devices only",
            ));
        }
        Ok(DeviceRegistration {
            id: DeviceId::from_uuid(id),
            push_token: PushToken::parse(platform, &self.push_token)?,
            platform,
            app_version: self
                .app_version
                .as_deref()
                .map(AppVersion::parse)
                .transpose()?,
            locale: self.locale.as_deref().map(Locale::parse).transpose()?,
            apns_environment,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Device {
    pub device_id: Uuid,
    #[schema(example = "ios")]
    pub platform: String,
    pub push_token: String,
    pub app_version: Option<String>,
    pub locale: Option<String>,
    pub apns_environment: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<devices::Device> for Device {
    fn from(d: devices::Device) -> Self {
        Self {
            device_id: d.id,
            platform: d.platform,
            push_token: d.push_token,
            app_version: d.app_version,
            locale: d.locale,
            apns_environment: d.apns_environment,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePage {
    pub items: Vec<Device>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Register or update a device.
#[utoipa::path(
    put,
    path = "/v1/devices/{device_id}",
    tag = "devices",
    security(("bearer" = [])),
    params(("device_id" = Uuid, Path, description = "The app installation's own UUID")),
    request_body = PutDevice,
    responses(
        (status = 201, description = "Registered", body = Device),
        (status = 200, description = "Updated", body = Device),
        (status = 400, description = "`invalid_path_parameter`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_platform`, `invalid_push_token`, `invalid_locale`, `invalid_app_version`, `invalid_apns_environment`, `validation_failed`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn put_device(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(device_id): Path<Uuid>,
    Json(body): Json<PutDevice>,
) -> Result<(StatusCode, axum::Json<Device>), ApiError> {
    let registration = body.parse(device_id)?;
    let (device, outcome) = devices::upsert_device(&state.db, auth.user_id, &registration).await?;
    let status = match outcome {
        Upsert::Created => StatusCode::CREATED,
        Upsert::Updated => StatusCode::OK,
    };
    Ok((status, axum::Json(device.into())))
}

/// The signed-in user's devices.
#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    security(("bearer" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "One page of devices", body = DevicePage),
        (status = 400, description = "`invalid_query`, `invalid_cursor`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_devices(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<DevicePage>, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let after = query
        .cursor
        .as_deref()
        .map(pagination::decode_id)
        .transpose()?;
    // One extra row tells whether another page exists.
    let rows = devices::list_devices(&state.db, auth.user_id, after, i64::from(limit) + 1).await?;
    let (rows, more) = pagination::split_page(rows, limit);
    let next_cursor = more
        .then(|| rows.last().map(|last| pagination::encode_id(last.id)))
        .flatten();
    Ok(axum::Json(DevicePage {
        items: rows.into_iter().map(Device::from).collect(),
        next_cursor,
    }))
}

/// Unregister a device (the app signs out, or the user disables pushes).
#[utoipa::path(
    delete,
    path = "/v1/devices/{device_id}",
    tag = "devices",
    security(("bearer" = [])),
    params(("device_id" = Uuid, Path, description = "The app installation's own UUID")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such device of this user", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn delete_device(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(device_id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    if devices::delete_device(&state.db, auth.user_id, DeviceId::from_uuid(device_id)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("no such device"))
    }
}

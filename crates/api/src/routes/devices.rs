//! `/v1/devices`: the app installations a user receives pushes on.
//!
//! The app generates a UUID once per installation and `PUT`s its current push token
//! under it on every start and whenever the platform rotates the token. `PUT` is an
//! idempotent upsert: 201 the first time, 200 after; 404 if the id is another
//! account's (the app deletes its device when it signs out, or registers under a new
//! id when it meets that 404).

use axum::{extract::State, http::StatusCode};
use mobile_db::devices::{self, DeviceRegistration, Upsert};
use mobile_domain::{
    ApnsEnvironment, AppVersion, DeviceId, Locale, Platform, PushToken, ValidationCode,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        RefOr,
        schema::{
            AdditionalProperties, Discriminator, ObjectBuilder, OneOfBuilder, Ref, Schema, Type,
        },
    },
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::pagination::{self, PageQuery};
use crate::{
    error::{ApiError, ErrorCode},
    extract::{AuthUser, Json, Path, Query},
    middleware::rate_limit::{self, Class},
    problems,
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

/// The body of `PUT /v1/devices/{device_id}` as read: each field as sent, parsed by
/// [`PutDevice::parse`] so that every refusal names its field's code. What it accepts
/// is documented by [`DeviceBody`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutDevice {
    pub platform: String,
    pub push_token: String,
    pub app_version: Option<String>,
    pub locale: Option<String>,
    pub apns_environment: Option<String>,
}

impl PutDevice {
    fn parse(self, id: DeviceId) -> Result<DeviceRegistration, ApiError> {
        let platform = Platform::parse(&self.platform)?;
        let apns_environment = self
            .apns_environment
            .as_deref()
            .map(ApnsEnvironment::parse)
            .transpose()?;
        if apns_environment.is_some() && platform != Platform::Ios {
            return Err(ApiError::new(ValidationCode::InvalidApnsEnvironment.into())
                .detail("apns_environment applies to ios devices only"));
        }
        Ok(DeviceRegistration {
            id,
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

/// What `PUT /v1/devices/{device_id}` takes, as the contract says it: an iOS device or
/// an Android device, told apart by `platform`. They take different push tokens, and
/// only iOS has an APNs environment.
#[derive(Debug)]
pub struct DeviceBody;

impl PartialSchema for DeviceBody {
    fn schema() -> RefOr<Schema> {
        let schema_ref = |name: &str| format!("#/components/schemas/{name}");
        OneOfBuilder::new()
            .item(Ref::from_schema_name("IosDevice"))
            .item(Ref::from_schema_name("AndroidDevice"))
            .discriminator(Some(Discriminator::with_mapping(
                "platform",
                [
                    ("ios", schema_ref("IosDevice")),
                    ("android", schema_ref("AndroidDevice")),
                ],
            )))
            .into()
    }
}

impl ToSchema for DeviceBody {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push(("IosDevice".to_owned(), device_schema(Platform::Ios)));
        schemas.push((
            "ApnsEnvironment".to_owned(),
            <ApnsEnvironment as PartialSchema>::schema(),
        ));
        schemas.push(("AndroidDevice".to_owned(), device_schema(Platform::Android)));
    }
}

/// One platform's device registration.
fn device_schema(platform: Platform) -> RefOr<Schema> {
    let tag = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([platform.as_str()]));
    let mut object = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("platform", tag)
        .required("platform")
        .required("push_token")
        .property("app_version", mobile_domain::schema::app_version_or_null())
        .property("locale", mobile_domain::schema::locale_or_null())
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    object = match platform {
        Platform::Ios => object
            .description(Some("An iOS app installation, reached through APNs"))
            .property("push_token", mobile_domain::schema::ios_push_token())
            .property(
                "apns_environment",
                OneOfBuilder::new()
                    .item(ObjectBuilder::new().schema_type(Type::Null))
                    .item(Ref::from_schema_name("ApnsEnvironment"))
                    .description(Some(
                        "`sandbox` for development builds; `production` (the default) otherwise",
                    )),
            ),
        Platform::Android => object
            .description(Some("An Android app installation, reached through FCM"))
            .property("push_token", mobile_domain::schema::android_push_token()),
    };
    object.into()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Device {
    pub device_id: DeviceId,
    pub platform: Platform,
    pub push_token: String,
    pub app_version: Option<String>,
    pub locale: Option<String>,
    pub apns_environment: Option<ApnsEnvironment>,
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

problems!(PutDeviceProblems:
    NotFound,
    Invalid(InvalidPlatform),
    Invalid(InvalidPushToken),
    Invalid(InvalidLocale),
    Invalid(InvalidAppVersion),
    Invalid(InvalidApnsEnvironment),
);

/// Register or update a device.
#[utoipa::path(
    put,
    path = "/v1/devices/{device_id}",
    tag = "devices",
    security(("bearer" = [])),
    params(("device_id" = DeviceId, Path, description = "The app installation's own UUID")),
    request_body = DeviceBody,
    responses(
        (status = 201, description = "Registered", body = Device),
        (status = 200, description = "Updated", body = Device),
        PutDeviceProblems,
    )
)]
async fn put_device(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(device_id): Path<DeviceId>,
    Json(body): Json<PutDevice>,
) -> Result<(StatusCode, axum::Json<Device>), ApiError> {
    let registration = body.parse(device_id)?;
    let Some((device, outcome)) =
        devices::upsert_device(&state.db, auth.user_id, auth.session_id, &registration).await?
    else {
        return Err(ApiError::new(ErrorCode::NotFound)
            .detail("this device id is registered to another account; register under a new id"));
    };
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
        CursorProblems,
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
        .map(pagination::decode_id::<DeviceId>)
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

problems!(CursorProblems: InvalidCursor);
problems!(DeleteDeviceProblems: NotFound);

/// Unregister a device (the app signs out, or the user disables pushes).
#[utoipa::path(
    delete,
    path = "/v1/devices/{device_id}",
    tag = "devices",
    security(("bearer" = [])),
    params(("device_id" = DeviceId, Path, description = "The app installation's own UUID")),
    responses(
        (status = 204, description = "Deleted"),
        DeleteDeviceProblems,
    )
)]
async fn delete_device(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(device_id): Path<DeviceId>,
) -> Result<StatusCode, ApiError> {
    if devices::delete_device(&state.db, auth.user_id, device_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(ErrorCode::NotFound).detail("no such device"))
    }
}

//! A conversation's members, and each member's own state in it: read position and mute.
//!
//! Who may do what: the owner (the creator, until they leave) adds members and removes
//! others; every member may leave (`DELETE .../members/{their own id}`) and sets their
//! own read position and mute. Joining and leaving are events on the conversation's
//! channel (`member.added`, `member.removed`); the members concerned also hear of it on
//! their `user:` channel (`conversation.joined`, `conversation.left`), so their other
//! devices update their lists. A removed member's open subscriptions end at the
//! `member.removed` event, and they read nothing written after it.
//!
//! Read positions are per user, not channel events: a read concerns the reader's own
//! devices (a `conversation.read` event on their `user:` channel, and a silent push
//! with the new badge), and putting every member's reads into the conversation's log
//! would multiply its events by its members.

use axum::{extract::State, http::StatusCode};
use mobile_db::{
    conversations,
    members::{self, AddMembers, RemoveMember},
    push::{Notification, PushKind},
};
use mobile_domain::{ConversationEventKind, ConversationId, RemovalReason, UserId};
use mobile_events::{ConversationData, ReadData};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::{AuthUser, Json, Path},
    middleware::rate_limit::{self, Class},
    problems,
    routes::conversations::no_such_conversation,
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(add_members))
        .routes(routes!(remove_member))
        .routes(routes!(mark_read))
        .routes(routes!(mute, unmute))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMembersRequest {
    /// Users to add; those who are members already are skipped.
    #[schema(min_items = 1, max_items = 999)]
    pub user_ids: Vec<UserId>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    /// The newest offset the user has seen (of any event; a message's `seq` will do).
    /// Beyond the newest offset counts as the newest.
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "whole_number")]
    pub offset: i64,
}

/// An integer as JSON Schema has it, which counts `5.0` as one: a client's JSON encoder
/// may write a whole number that way.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    /// Beyond 2^53 a float is not a whole number one can trust.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_i64()
        .or_else(|| {
            number
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= EXACT)
                // Whole and within ±2^53: the conversion is exact.
                .map(|f| f as i64)
        })
        .ok_or_else(|| serde::de::Error::custom("expected a whole number"))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MuteRequest {
    /// Until when (RFC 3339); left out or `null`: for good.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub until: Option<OffsetDateTime>,
}

/// `conversation.left` on a former member's `user:` channel.
#[derive(Debug, Serialize)]
struct LeftData {
    conversation_id: ConversationId,
    reason: RemovalReason,
}

problems!(AddMembersProblems: NotFound, NotOwner, UnknownMembers, TooManyMembers);

/// Add members: the owner only. A `member.added` event; each new member gets
/// `conversation.joined` on their `user:` channel, and sees the history.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/members",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation")),
    request_body = AddMembersRequest,
    responses(
        (status = 200, description = "The conversation with its members now", body = ConversationData),
        AddMembersProblems,
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn add_members(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
    Json(body): Json<AddMembersRequest>,
) -> Result<axum::Json<ConversationData>, ApiError> {
    if body.user_ids.is_empty() {
        return Err(ApiError::new(ErrorCode::ValidationFailed).detail("user_ids names no one"));
    }
    if body.user_ids.len() >= conversations::MAX_MEMBERS {
        return Err(ErrorCode::TooManyMembers.into());
    }
    let mut tx = state.db.begin().await?;
    let outcome = members::add_members(&mut tx, id, auth.user_id, &body.user_ids).await?;
    let (seq, data, added) = match outcome {
        AddMembers::Added { seq, data, added } => (seq, data, added),
        AddMembers::NothingNew => (0, String::new(), Vec::new()),
        AddMembers::NotFound => return Err(no_such_conversation()),
        AddMembers::NotOwner => return Err(ErrorCode::NotOwner.into()),
        AddMembers::TooMany => return Err(ErrorCode::TooManyMembers.into()),
        AddMembers::UnknownMembers(unknown) => {
            let unknown: Vec<String> = unknown.iter().map(UserId::to_string).collect();
            return Err(ApiError::new(ErrorCode::UnknownMembers)
                .detail(format!("no such users: {}", unknown.join(", "))));
        }
    };
    if !added.is_empty() {
        let views: Vec<(UserId, ConversationData)> = conversations::views_of(&mut *tx, &added, id)
            .await?
            .into_iter()
            .map(|(member, view)| {
                // Without the newest message: the event stays in the member's log, and
                // that message may be edited or deleted later.
                let mut view = ConversationData::from(view);
                view.last_message = None;
                (member, view)
            })
            .collect();
        let mut frames =
            mobile_events::record_user_events(&mut tx, "conversation.joined", &views).await?;
        tx.commit().await?;
        frames.push(mobile_events::conversation_event(
            id,
            ConversationEventKind::MemberAdded,
            seq,
            &data,
        ));
        events::publish(&state, &frames).await;
    }
    let conversation = conversations::find_conversation(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    Ok(axum::Json(conversation.into()))
}

problems!(RemoveMemberProblems: NotFound, NotOwner);

/// Remove a member (the owner only), or leave (anyone, with their own id). A
/// `member.removed` event; the former member's subscriptions end with an
/// `unsubscribed` frame, and their `user:` channel gets `conversation.left`. When the
/// owner leaves, the longest-standing member becomes the owner; when the last member
/// leaves, the conversation is deleted.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}/members/{user_id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(
        ("id" = ConversationId, Path, description = "The conversation"),
        ("user_id" = UserId, Path, description = "The member; the caller's own id to leave"),
    ),
    responses(
        (status = 204, description = "Removed, or left"),
        RemoveMemberProblems,
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn remove_member(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, member)): Path<(ConversationId, UserId)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.db.begin().await?;
    let outcome = members::remove_member(&mut tx, id, auth.user_id, member).await?;
    let reason = if member == auth.user_id {
        RemovalReason::Left
    } else {
        RemovalReason::Removed
    };
    let mut frames = match outcome {
        RemoveMember::Removed { seq, data } => vec![mobile_events::conversation_event(
            id,
            ConversationEventKind::MemberRemoved,
            seq,
            &data,
        )],
        RemoveMember::Dissolved => Vec::new(),
        RemoveMember::NotFound => return Err(no_such_conversation()),
        RemoveMember::NotMember => {
            return Err(ApiError::new(ErrorCode::NotFound).detail("no such member"));
        }
        RemoveMember::NotOwner => return Err(ErrorCode::NotOwner.into()),
    };
    let left = LeftData {
        conversation_id: id,
        reason,
    };
    frames.extend(
        mobile_events::record_user_events(&mut tx, "conversation.left", &[(member, left)]).await?,
    );
    tx.commit().await?;
    events::publish(&state, &frames).await;
    Ok(StatusCode::NO_CONTENT)
}

problems!(ReadProblems: NotFound);

/// Mark as read up to an offset. Monotonic: an older offset changes nothing. A move
/// tells the user's other devices: `conversation.read` on the `user:` channel, and a
/// silent push carrying the new badge.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/read",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation")),
    request_body = ReadRequest,
    responses(
        (status = 200, description = "The read position now, and what is left unread", body = ReadData),
        ReadProblems,
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn mark_read(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
    Json(body): Json<ReadRequest>,
) -> Result<axum::Json<ReadData>, ApiError> {
    if body.offset < 0 {
        return Err(ApiError::new(ErrorCode::ValidationFailed).detail("offset is 0 or more"));
    }
    let user = auth.user_id;
    let mut tx = state.db.begin().await?;
    let read = members::mark_read(&mut tx, user, id, body.offset)
        .await?
        .ok_or_else(no_such_conversation)?;
    let unread = conversations::find_conversation(&mut *tx, user, id)
        .await?
        .map_or(0, |view| view.unread_count);
    let total_unread = conversations::total_unread(&mut *tx, &[user])
        .await?
        .first()
        .map_or(0, |(_, total)| *total);
    let data = ReadData {
        conversation_id: id,
        read_offset: read.read_seq,
        unread_count: unread,
        total_unread,
    };
    if read.advanced {
        let hint = Notification {
            user_id: user,
            title: String::new(),
            body: String::new(),
            data: Some(serde_json::json!({
                "type": "read",
                "conversation_id": id.to_string(),
                "read_offset": read.read_seq.to_string(),
            })),
            collapse_id: Some(format!("read:{id}")),
            thread_id: None,
            kind: PushKind::Silent,
            localized: None,
            badge: Some(u32::try_from(total_unread).unwrap_or(u32::MAX)),
            unread_badge: false,
            message_id: None,
        };
        mobile_db::push::enqueue_notifications(&mut tx, &[hint]).await?;
        let frames =
            mobile_events::record_user_events(&mut tx, "conversation.read", &[(user, &data)])
                .await?;
        tx.commit().await?;
        events::publish(&state, &frames).await;
    }
    Ok(axum::Json(data))
}

problems!(MuteProblems: NotFound);

/// Mute for the caller, until a time or for good: no pushes for its messages, which
/// still count as unread. Muting again replaces the time.
#[utoipa::path(
    put,
    path = "/v1/conversations/{id}/mute",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation")),
    request_body = MuteRequest,
    responses(
        (status = 200, description = "The conversation, as the caller sees it", body = ConversationData),
        MuteProblems,
    )
)]
async fn mute(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
    Json(body): Json<MuteRequest>,
) -> Result<axum::Json<ConversationData>, ApiError> {
    if !members::set_mute(&state.db, auth.user_id, id, true, body.until).await? {
        return Err(no_such_conversation());
    }
    let conversation = conversations::find_conversation(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    Ok(axum::Json(conversation.into()))
}

/// Unmute for the caller.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}/mute",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation")),
    responses(
        (status = 200, description = "The conversation, as the caller sees it", body = ConversationData),
        MuteProblems,
    )
)]
async fn unmute(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
) -> Result<axum::Json<ConversationData>, ApiError> {
    if !members::set_mute(&state.db, auth.user_id, id, false, None).await? {
        return Err(no_such_conversation());
    }
    let conversation = conversations::find_conversation(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    Ok(axum::Json(conversation.into()))
}

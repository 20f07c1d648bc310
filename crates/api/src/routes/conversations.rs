//! `/v1/conversations`: conversations and their messages.
//!
//! Only members see a conversation; to anyone else it does not exist (404, not 403, so
//! ids cannot be probed). Posting a message assigns the next `seq` in the insert's
//! transaction, enqueues in the same transaction a push for every member who is not
//! online, and after the commit publishes the event to the gateways.

use axum::{extract::State, http::StatusCode};
use std::collections::HashSet;

use mobile_db::{
    conversations::{self, CreateConversation, NewMessage, PostMessage, Window},
    media,
    push::{self, Notification},
    users,
};
use mobile_domain::{ClientMsgId, MessageText, Title, UserId};
use mobile_events::{Channel, ConversationData, MessageData, presence};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::pagination::{self, PageQuery};
use crate::{
    error::{ApiError, Problem},
    events,
    extract::{AuthUser, Json, Path, Query},
    metrics::FeatureLabel,
    middleware::rate_limit::{self, Class},
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_conversation, list_conversations))
        .routes(routes!(get_conversation))
        .routes(routes!(post_message, list_messages))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversationRequest {
    /// The other members; the creator is always a member. Up to 999.
    pub member_ids: Vec<Uuid>,
    #[schema(example = "Weekend trip")]
    pub title: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationPage {
    pub items: Vec<ConversationData>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessageRequest {
    /// The client's own id for this message; a retry with the same one returns the
    /// first message instead of posting twice.
    #[schema(example = "6f1c1c0e-4d2a-4d0b-9a57-2f1c2d3e4f50")]
    pub client_msg_id: String,
    /// Not blank; at most 4000 characters.
    #[schema(example = "See you at 8!")]
    pub body: String,
    /// Media to attach (from `POST /v1/media`).
    pub media_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MessagesQuery {
    /// Messages with `seq` greater than this, oldest first (catching up).
    pub after_seq: Option<i64>,
    /// Messages with `seq` less than this, the newest of them (scrolling back).
    pub before_seq: Option<i64>,
    /// From a previous page's `next_cursor`; continues in the same direction.
    pub cursor: Option<String>,
    /// 1 to 100; default 50.
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    /// In ascending `seq` order.
    pub items: Vec<MessageData>,
    /// Pass as `cursor` to continue in the same direction; absent at the end.
    pub next_cursor: Option<String>,
}

/// Start a conversation.
#[utoipa::path(
    post,
    path = "/v1/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    request_body = CreateConversationRequest,
    responses(
        (status = 201, description = "Created; `conversation.created` goes to every member's `user:` channel", body = ConversationData),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`unknown_members`, `too_many_members`, `invalid_title`, `validation_failed`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`", body = Problem, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id))]
async fn create_conversation(
    State(state): State<AppState>,
    auth: AuthUser,
    Json(body): Json<CreateConversationRequest>,
) -> Result<(StatusCode, axum::Json<ConversationData>), ApiError> {
    let title = body.title.as_deref().map(Title::parse).transpose()?;
    if body.member_ids.len() >= conversations::MAX_MEMBERS {
        return Err(ApiError::unprocessable(
            "too_many_members",
            format!(
                "a conversation has at most {} members",
                conversations::MAX_MEMBERS
            ),
        ));
    }
    let created = conversations::create_conversation(
        &state.db,
        auth.user_id,
        &body.member_ids,
        title.as_ref().map(Title::as_str),
    )
    .await?;
    let conversation: ConversationData = match created {
        CreateConversation::Created(conversation) => conversation.into(),
        CreateConversation::UnknownMembers(unknown) => {
            let unknown: Vec<String> = unknown.iter().map(Uuid::to_string).collect();
            return Err(ApiError::unprocessable(
                "unknown_members",
                format!("no such users: {}", unknown.join(", ")),
            ));
        }
    };
    let frames: Vec<(Channel, String)> = conversation
        .member_ids
        .iter()
        .map(|&member| {
            let frame = mobile_events::user_event(member, "conversation.created", &conversation);
            (Channel::User(member), frame)
        })
        .collect();
    events::publish(&state, &frames).await;
    Ok((StatusCode::CREATED, axum::Json(conversation)))
}

/// The signed-in user's conversations, newest first.
#[utoipa::path(
    get,
    path = "/v1/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "One page", body = ConversationPage),
        (status = 400, description = "`invalid_query`, `invalid_cursor`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_conversations(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<ConversationPage>, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let before = query
        .cursor
        .as_deref()
        .map(pagination::decode_id)
        .transpose()?;
    let rows =
        conversations::list_conversations(&state.db, auth.user_id, before, i64::from(limit) + 1)
            .await?;
    let (rows, more) = pagination::split_page(rows, limit);
    let next_cursor = more
        .then(|| rows.last().map(|last| pagination::encode_id(last.id)))
        .flatten();
    Ok(axum::Json(ConversationPage {
        items: rows.into_iter().map(ConversationData::from).collect(),
        next_cursor,
    }))
}

/// One conversation of the signed-in user.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation")),
    responses(
        (status = 200, description = "The conversation", body = ConversationData),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such conversation, or not a member", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_conversation(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<ConversationData>, ApiError> {
    let conversation = conversations::find_conversation(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    Ok(axum::Json(conversation.into()))
}

/// Post a message.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation")),
    request_body = PostMessageRequest,
    responses(
        (status = 201, description = "Posted, with the next `seq`; the event goes to the `conversation:` channel", body = MessageData),
        (status = 200, description = "This `client_msg_id` was posted before: the first message", body = MessageData),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such conversation, or not a member", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`, `invalid_client_msg_id`, `unknown_media`, `validation_failed`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`", body = Problem, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn post_message(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
    Json(body): Json<PostMessageRequest>,
) -> Result<(StatusCode, axum::Json<MessageData>), ApiError> {
    let client_msg_id = ClientMsgId::parse(&body.client_msg_id)?;
    let text = MessageText::parse(&body.body)?;
    if let Some(media_id) = body.media_id
        && !media::attachable(&state.db, media_id, auth.user_id.as_uuid()).await?
    {
        return Err(ApiError::unprocessable(
            "unknown_media",
            format!(
                "no media {media_id} of yours that can be attached (unknown, or it failed processing)"
            ),
        ));
    }
    // Decided before the transaction, so no Redis round trip holds the conversation's lock.
    let offline = offline_members(&state, id, auth.user_id).await?;
    let notifications = if offline.is_empty() {
        Vec::new()
    } else {
        let sender = users::find_user(&state.db, auth.user_id)
            .await?
            .map_or_else(String::new, |user| user.display_name);
        offline
            .iter()
            .map(|&user_id| Notification {
                user_id,
                title: sender.clone(),
                body: preview(text.as_str()),
                data: None,
                collapse_id: None,
            })
            .collect()
    };
    let new = NewMessage {
        conversation_id: id,
        sender_id: auth.user_id,
        client_msg_id: client_msg_id.as_str(),
        body: text.as_str(),
        media_id: body.media_id,
    };
    let mut tx = state.db.begin().await?;
    let outcome = conversations::insert_message(&mut tx, &new).await?;
    if let PostMessage::Created(message) = &outcome
        && !notifications.is_empty()
    {
        // In the message's transaction: a committed message always has its pushes.
        let data = serde_json::json!({
            "type": "message",
            "conversation_id": message.conversation_id.to_string(),
            "message_id": message.id.to_string(),
            "seq": message.seq.to_string(),
        });
        let notifications: Vec<Notification> = notifications
            .into_iter()
            .map(|n| Notification {
                data: Some(data.clone()),
                ..n
            })
            .collect();
        push::enqueue_notifications(&mut tx, &notifications).await?;
    }
    tx.commit().await?;
    match outcome {
        PostMessage::Created(message) => {
            let message = MessageData::from(message);
            let frame = mobile_events::message_created(&message);
            events::publish(&state, &[(Channel::Conversation(id), frame)]).await;
            Ok((StatusCode::CREATED, axum::Json(message)))
        }
        PostMessage::Duplicate(first) => Ok((StatusCode::OK, axum::Json(first.into()))),
        PostMessage::NotFound => Err(no_such_conversation()),
    }
}

/// The conversation's members other than `sender` who have no live WebSocket
/// connection: they get a push. Empty if `sender` is not a member (the insert then
/// answers 404). Without Redis nobody counts as online: a push too many beats a
/// message nobody hears about.
async fn offline_members(
    state: &AppState,
    conversation: Uuid,
    sender: UserId,
) -> Result<Vec<Uuid>, ApiError> {
    let members = conversations::member_ids(&state.db, conversation).await?;
    if !members.contains(&sender.as_uuid()) {
        return Ok(Vec::new());
    }
    let others: Vec<Uuid> = members
        .into_iter()
        .filter(|&m| m != sender.as_uuid())
        .collect();
    let online = match presence::online(
        &mut state.redis.conn(),
        &state.settings.common.redis_key_prefix,
        &others,
    )
    .await
    {
        Ok(online) => online,
        Err(e) => {
            tracing::warn!(error = %e, "presence unavailable; pushing to every member");
            state
                .metrics
                .redis_degraded
                .get_or_create(&FeatureLabel {
                    feature: "presence",
                })
                .inc();
            HashSet::new()
        }
    };
    Ok(others.into_iter().filter(|m| !online.contains(m)).collect())
}

/// A push's preview of a message: the first 100 characters.
fn preview(text: &str) -> String {
    const PREVIEW_CHARS: usize = 100;
    let mut chars = text.chars();
    let mut preview: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    if chars.next().is_some() {
        preview.push('…');
    }
    preview
}

/// A page of messages, in `seq` order.
///
/// `after_seq` pages forward (catching up after being offline); `before_seq` pages
/// back through history; neither gives the newest messages. `next_cursor` continues in
/// the same direction.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation"), MessagesQuery),
    responses(
        (status = 200, description = "One page, ascending by `seq`", body = MessagePage),
        (status = 400, description = "`invalid_query`, `invalid_cursor`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such conversation, or not a member", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_messages(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
    Query(query): Query<MessagesQuery>,
) -> Result<axum::Json<MessagePage>, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let window = window(&query)?;
    conversations::member_last_seq(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    let mut rows =
        conversations::list_messages(&state.db, id, window, i64::from(limit) + 1).await?;
    let more = rows.len() > limit as usize;
    let next_cursor = match window {
        Window::After(_) => {
            rows.truncate(limit as usize);
            more.then(|| rows.last().map(|m| encode_window(Window::After(m.seq))))
                .flatten()
        }
        // Ascending, with the extra (oldest) row first.
        Window::Before(_) | Window::Latest => {
            if more {
                rows.remove(0);
            }
            more.then(|| rows.first().map(|m| encode_window(Window::Before(m.seq))))
                .flatten()
        }
    };
    Ok(axum::Json(MessagePage {
        items: rows.into_iter().map(MessageData::from).collect(),
        next_cursor,
    }))
}

fn window(query: &MessagesQuery) -> Result<Window, ApiError> {
    let window = match (query.after_seq, query.before_seq, query.cursor.as_deref()) {
        (None, None, None) => Window::Latest,
        (Some(after), None, None) if after >= 0 => Window::After(after),
        (None, Some(before), None) if before >= 1 => Window::Before(before),
        (None, None, Some(cursor)) => decode_window(cursor)?,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give at most one of after_seq (>= 0), before_seq (>= 1) and cursor",
            ));
        }
    };
    Ok(window)
}

fn encode_window(window: Window) -> String {
    match window {
        Window::After(seq) => pagination::encode(&format!("after:{seq}")),
        Window::Before(seq) => pagination::encode(&format!("before:{seq}")),
        Window::Latest => pagination::encode("latest"),
    }
}

fn decode_window(cursor: &str) -> Result<Window, ApiError> {
    let position = pagination::decode(cursor)?;
    let parsed = match position.split_once(':') {
        Some(("after", seq)) => seq.parse().ok().map(Window::After),
        Some(("before", seq)) => seq.parse().ok().map(Window::Before),
        None if position == "latest" => Some(Window::Latest),
        _ => None,
    };
    parsed.ok_or_else(pagination::invalid)
}

fn no_such_conversation() -> ApiError {
    ApiError::not_found("no such conversation")
}

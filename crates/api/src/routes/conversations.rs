//! `/v1/conversations`: conversations and their messages.
//!
//! Only members see a conversation; to anyone else it does not exist (404, not 403, so
//! ids cannot be probed). Posting a message assigns the next `seq` in the insert's
//! transaction, enqueues in the same transaction a push for every member who is not
//! online, and after the commit publishes the event to the gateways.

use axum::{extract::State, http::StatusCode};
use mobile_db::conversations::{
    self, ChangeMessage, CreateConversation, ListPosition, SetTitle, Window,
};
use mobile_domain::{
    ClientMsgId, ConversationEventKind, ConversationId, MediaId, MessageId, MessageText, Title,
    UserId,
};
use mobile_events::{Channel, ConversationData, MessageData};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::pagination::{self, PageQuery};
use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::{AuthUser, Json, Path, Query},
    messaging::{self, Draft, Posted},
    middleware::rate_limit::{self, Class},
    problems,
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_conversation, list_conversations))
        .routes(routes!(get_conversation, update_conversation))
        .routes(routes!(post_message, list_messages))
        .routes(routes!(edit_message, delete_message))
        .routes(routes!(list_events))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversationRequest {
    /// The other members; the creator is always a member (and may be listed too).
    #[schema(max_items = 999)]
    pub member_ids: Vec<UserId>,
    /// Left out (or `null`): untitled.
    #[schema(schema_with = mobile_domain::schema::title_or_null)]
    pub title: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationPage {
    /// The most recently active first.
    pub items: Vec<ConversationData>,
    /// Pass as `cursor` for the next (less recently active) page; absent on the last
    /// page. The order moves as messages arrive: an app refreshes from the first page
    /// when events tell it of activity.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConversationRequest {
    /// The new title; `null`: untitled.
    #[schema(schema_with = mobile_domain::schema::title_or_null)]
    pub title: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMessageRequest {
    #[schema(schema_with = mobile_domain::schema::message_body)]
    pub body: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessageRequest {
    #[schema(schema_with = mobile_domain::schema::client_msg_id)]
    pub client_msg_id: String,
    #[schema(schema_with = mobile_domain::schema::message_body)]
    pub body: String,
    /// Media to attach (from `POST /v1/media`), the sender's own.
    pub media_id: Option<MediaId>,
}

/// At most one of `after_seq`, `before_seq` and `cursor`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// Messages with `seq` greater than this, oldest first (catching up).
    #[param(minimum = 0)]
    pub after_seq: Option<i64>,
    /// Messages with `seq` less than this, the newest of them (scrolling back).
    #[param(minimum = 1)]
    pub before_seq: Option<i64>,
    /// From a previous page's `next_cursor`; continues in the same direction.
    #[param(max_length = 256)]
    pub cursor: Option<String>,
    /// 1 to 100; default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    /// In ascending `seq` order.
    pub items: Vec<MessageData>,
    /// Pass as `cursor` to continue in the same direction; absent at the end.
    pub next_cursor: Option<String>,
}

problems!(CreateConversationProblems: NotFound, UnknownMembers, TooManyMembers, Invalid(InvalidTitle));

/// Start a conversation.
#[utoipa::path(
    post,
    path = "/v1/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    request_body = CreateConversationRequest,
    responses(
        (status = 201, description = "Created; `conversation.created` goes to every member's `user:` channel", body = ConversationData),
        CreateConversationProblems,
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
        return Err(ErrorCode::TooManyMembers.into());
    }
    let mut tx = state.db.begin().await?;
    let created =
        conversations::create_conversation(&mut tx, auth.user_id, &body.member_ids, title.as_ref())
            .await?;
    let conversation: ConversationData = match created {
        CreateConversation::Created(conversation) => (*conversation).into(),
        CreateConversation::UnknownMembers(unknown) if unknown.contains(&auth.user_id) => {
            return Err(ApiError::new(ErrorCode::NotFound).detail("the user no longer exists"));
        }
        CreateConversation::UnknownMembers(unknown) => {
            let unknown: Vec<String> = unknown.iter().map(UserId::to_string).collect();
            return Err(ApiError::new(ErrorCode::UnknownMembers)
                .detail(format!("no such users: {}", unknown.join(", "))));
        }
    };
    let told: Vec<(UserId, &ConversationData)> = conversation
        .member_ids
        .iter()
        .map(|&member| (member, &conversation))
        .collect();
    let frames = mobile_events::record_user_events(&mut tx, "conversation.created", &told).await?;
    tx.commit().await?;
    events::publish(&state, &frames).await;
    Ok((StatusCode::CREATED, axum::Json(conversation)))
}

problems!(CursorProblems: InvalidCursor);

/// The signed-in user's conversations, the most recently active first, each with its
/// newest message, the caller's unread count and read position.
#[utoipa::path(
    get,
    path = "/v1/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "One page", body = ConversationPage),
        CursorProblems,
    )
)]
async fn list_conversations(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<ConversationPage>, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let after = query.cursor.as_deref().map(decode_position).transpose()?;
    let rows =
        conversations::list_conversations(&state.db, auth.user_id, after, i64::from(limit) + 1)
            .await?;
    let (rows, more) = pagination::split_page(rows, limit);
    let next_cursor = more
        .then(|| {
            rows.last()
                .map(|last| encode_position((last.last_activity_at, last.id)))
        })
        .flatten();
    Ok(axum::Json(ConversationPage {
        items: rows.into_iter().map(ConversationData::from).collect(),
        next_cursor,
    }))
}

/// A list position as a cursor: the last item's activity (Unix microseconds) and id.
fn encode_position((at, id): ListPosition) -> String {
    let micros = at.unix_timestamp_nanos() / 1_000;
    pagination::encode(&format!("{micros}:{id}"))
}

fn decode_position(cursor: &str) -> Result<ListPosition, ApiError> {
    let position = pagination::decode(cursor)?;
    let (micros, id) = position.split_once(':').ok_or_else(pagination::invalid)?;
    let at = micros
        .parse::<i128>()
        .ok()
        .and_then(|micros| OffsetDateTime::from_unix_timestamp_nanos(micros * 1_000).ok())
        .ok_or_else(pagination::invalid)?;
    let id = id.parse().map_err(|_| pagination::invalid())?;
    Ok((at, id))
}

problems!(ConversationProblems: NotFound);

/// One conversation of the signed-in user.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation")),
    responses(
        (status = 200, description = "The conversation", body = ConversationData),
        ConversationProblems,
    )
)]
async fn get_conversation(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
) -> Result<axum::Json<ConversationData>, ApiError> {
    let conversation = conversations::find_conversation(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    Ok(axum::Json(conversation.into()))
}

problems!(UpdateConversationProblems: NotFound, Invalid(InvalidTitle));

/// Set the title: any member may. A change is a `conversation.updated` event.
#[utoipa::path(
    patch,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation")),
    request_body = UpdateConversationRequest,
    responses(
        (status = 200, description = "The conversation, as the caller sees it", body = ConversationData),
        UpdateConversationProblems,
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn update_conversation(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
    Json(body): Json<UpdateConversationRequest>,
) -> Result<axum::Json<ConversationData>, ApiError> {
    let title = body.title.as_deref().map(Title::parse).transpose()?;
    let mut tx = state.db.begin().await?;
    let outcome = conversations::set_title(&mut tx, id, auth.user_id, title.as_ref()).await?;
    tx.commit().await?;
    match outcome {
        SetTitle::Changed { seq, data } => {
            let frame = mobile_events::conversation_event(
                id,
                ConversationEventKind::ConversationUpdated,
                seq,
                &data,
            );
            events::publish(&state, &[frame]).await;
        }
        SetTitle::Unchanged => {}
        SetTitle::NotFound => return Err(no_such_conversation()),
    }
    let conversation = conversations::find_conversation(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    Ok(axum::Json(conversation.into()))
}

problems!(PostMessageProblems: NotFound, UnknownMedia, Invalid(InvalidBody), Invalid(InvalidClientMsgId));

/// Post a message.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation")),
    request_body = PostMessageRequest,
    responses(
        (status = 201, description = "Posted, with the next `seq`; the event goes to the `conversation:` channel", body = MessageData),
        (status = 200, description = "This `client_msg_id` was posted before: the first message", body = MessageData),
        PostMessageProblems,
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn post_message(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
    Json(body): Json<PostMessageRequest>,
) -> Result<(StatusCode, axum::Json<MessageData>), ApiError> {
    let draft = Draft {
        client_msg_id: ClientMsgId::parse(&body.client_msg_id)?,
        text: MessageText::parse(&body.body)?,
        media_id: body.media_id,
    };
    Ok(
        match messaging::post(&state, auth.user_id, id, draft).await? {
            Posted::Created(message) => (StatusCode::CREATED, axum::Json(message)),
            Posted::Duplicate(first) => (StatusCode::OK, axum::Json(first)),
        },
    )
}

problems!(EditMessageProblems: NotFound, NotSender, MessageDeleted, Invalid(InvalidBody));

/// Edit a message: its sender only. A change is a `message.updated` event at the next
/// offset; the message keeps its `seq`. The same body again changes nothing.
#[utoipa::path(
    patch,
    path = "/v1/conversations/{id}/messages/{message_id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(
        ("id" = ConversationId, Path, description = "The conversation"),
        ("message_id" = MessageId, Path, description = "The message"),
    ),
    request_body = EditMessageRequest,
    responses(
        (status = 200, description = "The message as edited", body = MessageData),
        EditMessageProblems,
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn edit_message(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, message_id)): Path<(ConversationId, MessageId)>,
    Json(body): Json<EditMessageRequest>,
) -> Result<axum::Json<MessageData>, ApiError> {
    let text = MessageText::parse(&body.body)?;
    let mut tx = state.db.begin().await?;
    let outcome = conversations::edit_message(&mut tx, id, auth.user_id, message_id, &text).await?;
    tx.commit().await?;
    let message = changed(&state, ConversationEventKind::MessageUpdated, outcome).await?;
    Ok(axum::Json(message))
}

problems!(DeleteMessageProblems: NotFound, NotSender);

/// Delete a message: its sender only. Its body and media go; a tombstone keeps its
/// `seq`, and a `message.deleted` event takes the next offset. Deleting it again changes
/// nothing.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}/messages/{message_id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(
        ("id" = ConversationId, Path, description = "The conversation"),
        ("message_id" = MessageId, Path, description = "The message"),
    ),
    responses(
        (status = 200, description = "The tombstone", body = MessageData),
        DeleteMessageProblems,
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, conversation_id = %id))]
async fn delete_message(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, message_id)): Path<(ConversationId, MessageId)>,
) -> Result<axum::Json<MessageData>, ApiError> {
    let mut tx = state.db.begin().await?;
    let outcome = conversations::delete_message(&mut tx, id, auth.user_id, message_id).await?;
    tx.commit().await?;
    let message = changed(&state, ConversationEventKind::MessageDeleted, outcome).await?;
    Ok(axum::Json(message))
}

/// After an edit's or a deletion's commit: the event to the gateways, or the error.
async fn changed(
    state: &AppState,
    kind: ConversationEventKind,
    outcome: ChangeMessage,
) -> Result<MessageData, ApiError> {
    match outcome {
        ChangeMessage::Changed { message, seq } => {
            let message = MessageData::from(message);
            let frame = mobile_events::message_event(kind, seq, &message);
            events::publish(
                state,
                &[(Channel::Conversation(message.conversation_id), frame)],
            )
            .await;
            Ok(message)
        }
        ChangeMessage::Unchanged(message) => Ok(message.into()),
        ChangeMessage::NotFound => {
            Err(ApiError::new(ErrorCode::NotFound).detail("no such message"))
        }
        ChangeMessage::NotSender => Err(ErrorCode::NotSender.into()),
        ChangeMessage::Deleted => Err(ErrorCode::MessageDeleted.into()),
    }
}

problems!(ListMessagesProblems: NotFound, InvalidCursor);

/// A page of messages, in `seq` order: as they are now (edited bodies, tombstones).
///
/// `after_seq` pages forward (catching up after being offline); `before_seq` pages
/// back through history; neither gives the newest messages. `next_cursor` continues in
/// the same direction.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation"), MessagesQuery),
    responses(
        (status = 200, description = "One page, ascending by `seq`", body = MessagePage),
        ListMessagesProblems,
    )
)]
async fn list_messages(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
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

/// `?after=&limit=` for the event log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events with offsets greater than this (the last one the app applied); default 0.
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// 1 to 100; default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
}

/// An event exactly as the WebSocket sends it on the `conversation:` channel.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventFrame {
    /// Always `event`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `conversation:<id>`.
    pub channel: String,
    pub event: ConversationEventKind,
    pub offset: i64,
    /// A message for `message.*` (as it is now), a `MemberAdded`,
    /// `MemberRemoved` or `ConversationUpdated` for the others.
    pub data: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    /// In offset order, with no gaps.
    pub items: Vec<EventFrame>,
    /// The offset to pass as `after` for the next page; absent when this page reaches
    /// the newest event.
    pub next_after: Option<i64>,
}

problems!(ListEventsProblems: NotFound);

/// The conversation's events after an offset: what an app that fell further behind
/// than the socket replays (`recovered: false`) applies to catch up, each frame exactly
/// as the socket sends it. Message events show the message as it is now.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/events",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = ConversationId, Path, description = "The conversation"), EventsQuery),
    responses(
        (status = 200, description = "One page, in offset order", body = EventPage),
        ListEventsProblems,
    )
)]
async fn list_events(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<ConversationId>,
    Query(query): Query<EventsQuery>,
) -> Result<axum::Json<EventPage>, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::new(ErrorCode::InvalidQuery).detail("after is 0 or more"));
    }
    let newest = conversations::member_last_seq(&state.db, auth.user_id, id)
        .await?
        .ok_or_else(no_such_conversation)?;
    let events = conversations::list_events(&state.db, id, after, newest, i64::from(limit)).await?;
    let last = events.last().map(|event| event.seq);
    let items = events
        .into_iter()
        .map(|event| {
            let kind = event.kind;
            let offset = event.seq;
            let frame = mobile_events::logged_event(id, event);
            let data = serde_json::from_str::<serde_json::Value>(&frame)
                .map(|mut frame| frame["data"].take())
                .map_err(|e| ApiError::internal(anyhow::Error::new(e)))?;
            Ok(EventFrame {
                kind: "event".to_owned(),
                channel: Channel::Conversation(id).to_string(),
                event: kind,
                offset,
                data,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let next_after = last.filter(|&last| last < newest);
    Ok(axum::Json(EventPage { items, next_after }))
}

fn window(query: &MessagesQuery) -> Result<Window, ApiError> {
    let window = match (query.after_seq, query.before_seq, query.cursor.as_deref()) {
        (None, None, None) => Window::Latest,
        (Some(after), None, None) if after >= 0 => Window::After(after),
        (None, Some(before), None) if before >= 1 => Window::Before(before),
        (None, None, Some(cursor)) => decode_window(cursor)?,
        _ => {
            return Err(ApiError::new(ErrorCode::InvalidQuery)
                .detail("give at most one of after_seq (>= 0), before_seq (>= 1) and cursor"));
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
    // The same ranges as the query parameters: a cursor is input like any other.
    let parsed = match position.split_once(':') {
        Some(("after", seq)) => seq.parse().ok().filter(|s| *s >= 0).map(Window::After),
        Some(("before", seq)) => seq.parse().ok().filter(|s| *s >= 1).map(Window::Before),
        None if position == "latest" => Some(Window::Latest),
        _ => None,
    };
    parsed.ok_or_else(pagination::invalid)
}

pub(crate) fn no_such_conversation() -> ApiError {
    ApiError::new(ErrorCode::NotFound).detail("no such conversation")
}

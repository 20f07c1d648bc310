//! Posting a message: the one write whose consequences reach beyond its row. In order:
//!
//! 1. an attached media must be the sender's, and not failed;
//! 2. who gets a push: the other members who have not muted the conversation and have
//!    no live connection, asked of Redis *before* the transaction, so no Redis round
//!    trip holds the conversation's lock (without Redis nobody counts as online: a push
//!    too many beats a message nobody hears about);
//! 3. one transaction: the message with the next `seq`, and its pushes, so a committed
//!    message always has them and a refused or retried one has none;
//! 4. after the commit, the event to the gateways.

use std::collections::HashSet;

use mobile_db::{
    conversations::{self, Message, NewMessage, PostMessage},
    media,
    push::{self, Notification, PushKind},
};
use mobile_domain::{ClientMsgId, ConversationId, MediaId, MessageText, UserId};
use mobile_events::{Channel, MessageData, presence};

use crate::{
    error::{ApiError, ErrorCode},
    events,
    metrics::FeatureLabel,
    routes::conversations::no_such_conversation,
    state::AppState,
};

/// A message as the client wrote it, parsed.
#[derive(Debug)]
pub struct Draft {
    pub client_msg_id: ClientMsgId,
    pub text: MessageText,
    pub media_id: Option<MediaId>,
}

/// What posting a draft did.
#[derive(Debug)]
pub enum Posted {
    /// A new message, with the next `seq`.
    Created(MessageData),
    /// This `client_msg_id` was posted before: the first message, unchanged.
    Duplicate(MessageData),
}

/// Posts `draft` from `sender` to `conversation`; 404 unless the sender is a member.
pub async fn post(
    state: &AppState,
    sender: UserId,
    conversation: ConversationId,
    draft: Draft,
) -> Result<Posted, ApiError> {
    if let Some(media_id) = draft.media_id
        && !media::attachable(&state.db, media_id, sender).await?
    {
        return Err(ApiError::new(ErrorCode::UnknownMedia).detail(format!(
            "no media {media_id} of yours that can be attached (unknown, or it failed processing)"
        )));
    }
    let members = conversations::members_with_names(&state.db, conversation).await?;
    let Some(sender_name) = members
        .iter()
        .find(|member| member.user_id == sender)
        .map(|member| member.display_name.clone())
    else {
        return Err(no_such_conversation());
    };
    // Muted members get no push; their unread count grows all the same.
    let others: Vec<UserId> = members
        .into_iter()
        .filter(|member| member.user_id != sender && !member.muted)
        .map(|member| member.user_id)
        .collect();
    let offline = offline(state, others).await;

    let mut tx = state.db.begin().await?;
    let outcome = conversations::insert_message(
        &mut tx,
        &NewMessage {
            conversation_id: conversation,
            sender_id: sender,
            client_msg_id: &draft.client_msg_id,
            body: &draft.text,
            media_id: draft.media_id,
        },
    )
    .await?;
    if let PostMessage::Created(message) = &outcome
        && !offline.is_empty()
    {
        let notifications = notifications(message, &sender_name, &offline);
        push::enqueue_notifications(&mut tx, &notifications).await?;
    }
    tx.commit().await?;

    match outcome {
        PostMessage::Created(message) => {
            let message = MessageData::from(message);
            let frame = mobile_events::message_created(&message);
            events::publish(state, &[(Channel::Conversation(conversation), frame)]).await;
            Ok(Posted::Created(message))
        }
        PostMessage::Duplicate(first) => Ok(Posted::Duplicate(first.into())),
        // A member a moment ago, removed meanwhile.
        PostMessage::NotFound => Err(no_such_conversation()),
    }
}

/// Which of `members` have no live WebSocket connection.
async fn offline(state: &AppState, members: Vec<UserId>) -> Vec<UserId> {
    let online = match presence::online(&state.redis, &members).await {
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
    members
        .into_iter()
        .filter(|member| !online.contains(member))
        .collect()
}

/// One push per recipient: the sender's name as the title, a preview as the body,
/// the recipient's badge (counted by the worker as it sends), and where the message
/// is as data for the app.
fn notifications(message: &Message, sender_name: &str, recipients: &[UserId]) -> Vec<Notification> {
    let data = serde_json::json!({
        "type": "message",
        "conversation_id": message.conversation_id.to_string(),
        "message_id": message.id.to_string(),
        "seq": message.seq.to_string(),
    });
    let body = push::preview(&message.body);
    // One thread per conversation: its messages stack together on the phone.
    let thread_id = message.conversation_id.to_string();
    recipients
        .iter()
        .map(|&user_id| Notification {
            user_id,
            title: sender_name.to_owned(),
            body: body.clone(),
            data: Some(data.clone()),
            collapse_id: None,
            thread_id: Some(thread_id.clone()),
            kind: PushKind::Alert,
            localized: None,
            badge: None,
            unread_badge: true,
            message_id: Some(message.id),
        })
        .collect()
}

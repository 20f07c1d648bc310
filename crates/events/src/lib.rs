//! What travels between the services over Redis, and from the gateway to the apps.
//!
//! A publisher (the API after a commit, the worker after a job) writes the **exact
//! frame** the gateway will send to clients; the gateway parses only its small header
//! ([`FrameHeader`]: channel, offset, sender) and forwards the same bytes to every local
//! subscriber. So a payload is encoded once, and the API and the gateway's PostgreSQL
//! gap filler produce identical frames because both call [`message_created`].
//!
//! Channel names are the protocol's (`conversation:<uuid>`, `user:<uuid>`); on Redis
//! they carry the deployment's key prefix (`Redis::key`). Every publish, the API's,
//! the worker's and the gateway's own ephemeral events, goes through [`publish`].

pub mod presence;

use std::{collections::BTreeMap, fmt, str::FromStr};

use mobile_domain::{
    ConversationEventKind, ConversationId, MediaId, MediaStatus, MemberRemoved, MessageId,
    SessionId, UserId,
};
use mobile_runtime::redis::{Feature, Redis};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// A channel a client can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Every change to one conversation, with gap-free offsets.
    Conversation(ConversationId),
    /// Events for one user (`conversation.created`, `.joined`, `.left`, `.read`,
    /// `media.ready`, `media.failed`, `notification`), with gap-free offsets of the
    /// user's own log.
    User(UserId),
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conversation(id) => write!(f, "conversation:{id}"),
            Self::User(id) => write!(f, "user:{id}"),
        }
    }
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidChannel;

impl fmt::Display for InvalidChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a channel is \"conversation:<uuid>\" or \"user:<uuid>\"")
    }
}

impl std::error::Error for InvalidChannel {}

impl FromStr for Channel {
    type Err = InvalidChannel;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (kind, id) = raw.split_once(':').ok_or(InvalidChannel)?;
        // Only the canonical, hyphenated lower-case form: one spelling per channel.
        if id.len() != 36 || id.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(InvalidChannel);
        }
        let id = Uuid::parse_str(id).map_err(|_| InvalidChannel)?;
        match kind {
            "conversation" => Ok(Self::Conversation(ConversationId::from_uuid(id))),
            "user" => Ok(Self::User(UserId::from_uuid(id))),
            _ => Err(InvalidChannel),
        }
    }
}

/// A message as clients see it, in REST responses and in events alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessageData {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    /// The message's offset in its conversation: strictly increasing. The conversation's
    /// other events take the offsets in between, so messages alone may skip some.
    pub seq: i64,
    pub sender_id: UserId,
    pub client_msg_id: String,
    /// Empty once deleted.
    pub body: String,
    pub media_id: Option<MediaId>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When its sender last edited it (`message.updated`); `null` if never.
    #[serde(with = "time::serde::rfc3339::option")]
    pub edited_at: Option<OffsetDateTime>,
    /// When its sender deleted it (`message.deleted`): a tombstone, its body empty and
    /// its media detached; `null` if not.
    #[serde(with = "time::serde::rfc3339::option")]
    pub deleted_at: Option<OffsetDateTime>,
}

impl From<mobile_db::conversations::Message> for MessageData {
    fn from(m: mobile_db::conversations::Message) -> Self {
        Self {
            id: m.id,
            conversation_id: m.conversation_id,
            seq: m.seq,
            sender_id: m.sender_id,
            client_msg_id: m.client_msg_id,
            body: m.body,
            media_id: m.media_id,
            created_at: m.created_at,
            edited_at: m.edited_at,
            deleted_at: m.deleted_at,
        }
    }
}

/// A conversation as one member sees it: the same for every member, but for the
/// member's own read position, unread count and mute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationData {
    pub id: ConversationId,
    pub title: Option<String>,
    /// Adds and removes members; the creator, until they leave.
    pub owner_id: UserId,
    /// Every member, the owner included.
    pub member_ids: Vec<UserId>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The newest offset of the `conversation:` channel (of any event).
    pub last_offset: i64,
    /// When the newest message was posted (the creation, before any): the list's order.
    #[serde(with = "time::serde::rfc3339")]
    pub last_activity_at: OffsetDateTime,
    /// The newest message, for the list's preview; `null` before the first.
    pub last_message: Option<MessageData>,
    /// The newest offset this member has read (`POST .../read`).
    pub read_offset: i64,
    /// Messages from others after `read_offset`, deleted ones not counted; 1000 means
    /// 1000 or more.
    pub unread_count: i64,
    /// Set while this member has muted the conversation: no pushes, still unread.
    pub mute: Option<MuteData>,
}

/// A mute in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MuteData {
    /// When it ends; `null`: for good.
    #[serde(with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
}

impl From<mobile_db::conversations::Conversation> for ConversationData {
    fn from(c: mobile_db::conversations::Conversation) -> Self {
        Self {
            id: c.id,
            title: c.title,
            owner_id: c.owner_id,
            member_ids: c.member_ids,
            created_at: c.created_at,
            last_offset: c.last_seq,
            last_activity_at: c.last_activity_at,
            last_message: c.last_message.map(MessageData::from),
            read_offset: c.read_seq,
            unread_count: c.unread_count,
            mute: c.muted.map(|until| MuteData { until }),
        }
    }
}

/// `conversation.read` on the reader's `user:` channel: where they have read to, for
/// their other devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReadData {
    pub conversation_id: ConversationId,
    /// The newest offset read.
    pub read_offset: i64,
    /// What is left unread in this conversation.
    pub unread_count: i64,
    /// Unread over every conversation: the badge.
    pub total_unread: i64,
}

/// Processing status and variants of an uploaded image, in REST responses and in the
/// `media.ready` / `media.failed` events alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MediaData {
    pub id: MediaId,
    pub status: MediaStatus,
    /// `thumb`, `medium` and `large` once ready; empty before.
    pub variants: BTreeMap<String, VariantData>,
    /// Why processing failed, for `failed` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
}

/// One rendition of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VariantData {
    /// Where to fetch it: `/v1/media/{id}/{variant}`, with the same bearer token.
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
}

impl From<mobile_db::media::Media> for MediaData {
    fn from(m: mobile_db::media::Media) -> Self {
        let variants = m
            .variants
            .0
            .into_iter()
            .map(|(name, v)| {
                let url = format!("/v1/media/{}/{name}", m.id);
                let variant = VariantData {
                    url,
                    width: v.width,
                    height: v.height,
                    content_type: v.content_type,
                };
                (name, variant)
            })
            .collect();
        Self {
            id: m.id,
            status: m.status,
            variants,
            failure_reason: m.failure_reason,
        }
    }
}

#[derive(Serialize)]
struct EventFrame<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: String,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<UserId>,
    data: &'a T,
}

fn frame<T: Serialize>(
    channel: Channel,
    event: &str,
    offset: Option<i64>,
    from: Option<UserId>,
    data: &T,
) -> String {
    let frame = EventFrame {
        kind: "event",
        channel: channel.to_string(),
        event,
        offset,
        from,
        data,
    };
    // Serialising these types cannot fail: no maps with non-string keys, no I/O.
    serde_json::to_string(&frame).unwrap_or_default()
}

/// `{"type":"event","channel":"conversation:<id>","event":"message.created","offset":<seq>,"data":<message>}`
pub fn message_created(message: &MessageData) -> String {
    message_event(ConversationEventKind::MessageCreated, message.seq, message)
}

/// A message event (`message.created`, `.updated`, `.deleted`) at `offset`: its data is
/// the message as it is after the change.
pub fn message_event(kind: ConversationEventKind, offset: i64, message: &MessageData) -> String {
    frame(
        Channel::Conversation(message.conversation_id),
        kind.as_str(),
        Some(offset),
        None,
        message,
    )
}

/// Any other conversation event at `offset`, whose `data` is the JSON text that was
/// stored with it; the same bytes live and replayed.
pub fn conversation_event(
    conversation: ConversationId,
    kind: ConversationEventKind,
    offset: i64,
    data: &str,
) -> (Channel, String) {
    let channel = Channel::Conversation(conversation);
    // Stored by us from a serialised struct: valid JSON. Should it not be, `null` goes
    // out rather than a frame that is not JSON.
    let data = serde_json::value::RawValue::from_string(data.to_owned())
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
    (
        channel,
        frame(channel, kind.as_str(), Some(offset), None, &data),
    )
}

/// An event of a conversation's log, as PostgreSQL returns it, encoded as it was
/// published.
pub fn logged_event(
    conversation: ConversationId,
    event: mobile_db::conversations::Event,
) -> String {
    use mobile_db::conversations::EventBody;
    match event.body {
        EventBody::Message(message) => {
            message_event(event.kind, event.seq, &MessageData::from(message))
        }
        EventBody::Data(data) => conversation_event(conversation, event.kind, event.seq, &data).1,
    }
}

/// Records `event` for each (user, data) in the user's log, inside the caller's
/// transaction, and returns the frames to publish once it commits:
/// `{"type":"event","channel":"user:<id>","event":<event>,"offset":<n>,"data":<data>}`.
pub async fn record_user_events<T: Serialize>(
    conn: &mut sqlx::PgConnection,
    event: &str,
    events: &[(UserId, T)],
) -> Result<Vec<(Channel, String)>, sqlx::Error> {
    let encoded = events
        .iter()
        .map(|(user, data)| Ok((*user, serde_json::to_string(data)?)))
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let recorded = mobile_db::user_events::record(conn, event, &encoded).await?;
    Ok(recorded
        .iter()
        .map(|event| (Channel::User(event.user_id), logged_user_event(event)))
        .collect())
}

/// An event of a user's log, encoded as it was published.
pub fn logged_user_event(event: &mobile_db::user_events::UserEvent) -> String {
    let data = serde_json::value::RawValue::from_string(event.data.clone())
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
    frame(
        Channel::User(event.user_id),
        &event.kind,
        Some(event.seq),
        None,
        &data,
    )
}

/// A client's ephemeral event (typing, ...), fanned out to the channel's other members:
/// `{"type":"event","channel":…,"event":"ephemeral","from":<user>,"data":…}`.
pub fn ephemeral(channel: Channel, from: UserId, data: &serde_json::value::RawValue) -> String {
    frame(channel, "ephemeral", None, Some(from), &data)
}

/// Which of a user's sessions a revocation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revoke {
    /// One session (logout, refresh-token reuse, a session ended by its user).
    Session(SessionId),
    /// Every session but one (a password change keeps the session that made it).
    AllBut(SessionId),
    /// Every session (a password reset, account deletion).
    All,
}

impl Revoke {
    /// Whether a connection of `session` must close.
    pub fn ends(self, session: SessionId) -> bool {
        match self {
            Self::Session(ended) => ended == session,
            Self::AllBut(kept) => kept != session,
            Self::All => true,
        }
    }
}

/// `{"type":"revoke","channel":"user:<id>","revoke":…}`: a control frame on the
/// user's own channel, which every gateway holding a socket of the user follows. The
/// gateway closes the sockets of the ended sessions (4001 `session_revoked`) and sends
/// the frame to no client.
pub fn revocation(user: UserId, revoke: Revoke) -> (Channel, String) {
    #[derive(Serialize)]
    struct RevokeFrame {
        #[serde(rename = "type")]
        kind: &'static str,
        channel: String,
        revoke: Revoke,
    }
    let channel = Channel::User(user);
    let frame = RevokeFrame {
        kind: "revoke",
        channel: channel.to_string(),
        revoke,
    };
    (channel, serde_json::to_string(&frame).unwrap_or_default())
}

/// Publishes frames (channel, frame) in one pipelined round trip. Losing a publish
/// loses no data, only immediacy: the caller logs and counts the error.
pub async fn publish(redis: &Redis, frames: &[(Channel, String)]) -> redis::RedisResult<()> {
    if frames.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (channel, frame) in frames {
        pipe.publish(redis.key(channel), frame).ignore();
    }
    pipe.query_async(&mut redis.conn(Feature::Events)).await
}

/// The part of a published frame the gateway needs to route it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FrameHeader {
    pub channel: String,
    pub offset: Option<i64>,
    /// The sender of an ephemeral event, who does not get it back.
    pub from: Option<UserId>,
    /// Set on a [`revocation`] frame, which no client sees.
    #[serde(default)]
    pub revoke: Option<Revoke>,
    /// The event's kind (`message.created`, ...); none on control frames.
    #[serde(default)]
    pub event: Option<String>,
}

impl FrameHeader {
    pub fn parse(frame: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(frame)
    }

    /// Who a `member.removed` frame removes: the gateway ends their subscriptions.
    pub fn removal(&self, frame: &[u8]) -> Option<MemberRemoved> {
        #[derive(Deserialize)]
        struct Removal {
            data: MemberRemoved,
        }
        if self.event.as_deref() != Some(ConversationEventKind::MemberRemoved.as_str()) {
            return None;
        }
        serde_json::from_slice::<Removal>(frame)
            .ok()
            .map(|removal| removal.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip_in_one_spelling() {
        let id = Uuid::new_v4();
        for channel in [
            Channel::Conversation(ConversationId::from_uuid(id)),
            Channel::User(UserId::from_uuid(id)),
        ] {
            assert_eq!(channel.to_string().parse::<Channel>().unwrap(), channel);
        }
        for bad in [
            "conversation",
            "room:00000000-0000-0000-0000-000000000000",
            "user:not-a-uuid",
            &format!("user:{}", id.simple()),
            &format!("user:{}", id.to_string().to_uppercase()),
            &format!("conversation:{id}:extra"),
        ] {
            assert!(bad.parse::<Channel>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_revocation_names_the_sessions_it_ends() {
        let user = UserId::new();
        let (one, other) = (SessionId::new(), SessionId::new());
        for (revoke, ends_one, ends_other) in [
            (Revoke::Session(one), true, false),
            (Revoke::AllBut(one), false, true),
            (Revoke::All, true, true),
        ] {
            let (channel, frame) = revocation(user, revoke);
            assert_eq!(channel, Channel::User(user));
            let header = FrameHeader::parse(frame.as_bytes()).unwrap();
            assert_eq!(header.channel, channel.to_string());
            assert_eq!(header.revoke, Some(revoke));
            assert_eq!(header.offset, None);
            assert_eq!(
                (revoke.ends(one), revoke.ends(other)),
                (ends_one, ends_other)
            );
        }
    }

    #[test]
    fn frames_carry_what_the_gateway_routes_on() {
        let message = MessageData {
            id: MessageId::new(),
            conversation_id: ConversationId::new(),
            seq: 7,
            sender_id: UserId::new(),
            client_msg_id: "c1".into(),
            body: "hi \"there\"".into(),
            media_id: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
            edited_at: None,
            deleted_at: None,
        };
        let text = message_created(&message);
        let header = FrameHeader::parse(text.as_bytes()).unwrap();
        assert_eq!(
            header.channel,
            format!("conversation:{}", message.conversation_id)
        );
        assert_eq!(header.offset, Some(7));
        assert_eq!(header.from, None);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["type"], "event");
        assert_eq!(value["event"], "message.created");
        assert_eq!(
            serde_json::from_value::<MessageData>(value["data"].clone()).unwrap(),
            message
        );

        let from = UserId::new();
        let data = serde_json::value::RawValue::from_string(r#"{"typing":true}"#.into()).unwrap();
        let typing = ephemeral(Channel::Conversation(message.conversation_id), from, &data);
        let header = FrameHeader::parse(typing.as_bytes()).unwrap();
        assert_eq!((header.offset, header.from), (None, Some(from)));
        assert!(typing.contains(r#""data":{"typing":true}"#));
    }
}

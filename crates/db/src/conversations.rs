//! Conversations, their messages, and the log of everything that changes them.
//!
//! Every change to a conversation takes the next offset by incrementing
//! `conversations.last_seq` in the change's own transaction: a message (its `seq`, the
//! event `message.created`), an edit, a deletion, a member joining or leaving, a new
//! title (rows of `conversation_events`). The `UPDATE` takes the conversation's row
//! lock, so concurrent changes to one conversation queue there (changes to different
//! conversations do not contend), and a transaction that rolls back gives its number
//! back: the offsets readers see are 1, 2, 3, ... with no gaps, in commit order. A
//! message's `seq` is its offset; messages alone skip the offsets of other events.
//!
//! Membership changes and read positions are in [`crate::members`].

use crate::metrics::timed;
use mobile_domain::{
    ClientMsgId, ConversationEventKind, ConversationId, ConversationUpdated, MediaId, MessageId,
    MessageText, Title, UserId,
};
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;

/// The most members a conversation may have.
pub const MAX_MEMBERS: usize = 1_000;

/// A conversation as one member sees it: the conversation, and their place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    pub title: Option<String>,
    pub owner_id: UserId,
    pub member_ids: Vec<UserId>,
    pub created_at: OffsetDateTime,
    /// The newest offset: of the last event, whatever its kind.
    pub last_seq: i64,
    /// When the newest message was posted (the creation, before any).
    pub last_activity_at: OffsetDateTime,
    /// The newest message, a tombstone if it was deleted.
    pub last_message: Option<Message>,
    /// The member's read position: the newest offset they have seen.
    pub read_seq: i64,
    /// Messages from others after `read_seq`, tombstones not counted, up to
    /// [`UNREAD_CAP`].
    pub unread_count: i64,
    /// `None`: not muted; `Some(None)`: muted for good; `Some(Some(t))`: until `t`.
    pub muted: Option<Option<OffsetDateTime>>,
}

/// Unread counts stop counting here: "1000" reads "1000 or more", and a list of
/// conversations each with a long backlog costs no more than this per item.
pub const UNREAD_CAP: i64 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: i64,
    pub sender_id: UserId,
    pub client_msg_id: String,
    pub body: String,
    pub media_id: Option<MediaId>,
    pub created_at: OffsetDateTime,
    pub edited_at: Option<OffsetDateTime>,
    /// A tombstone: the body is empty and the media detached.
    pub deleted_at: Option<OffsetDateTime>,
}

/// The outcome of [`create_conversation`].
#[derive(Debug)]
pub enum CreateConversation {
    Created(Box<Conversation>),
    /// These member ids name no user (or a deleted account, which may be the creator's).
    UnknownMembers(Vec<UserId>),
}

/// Creates a conversation whose members are `creator` (its owner) plus `members`
/// (duplicates ignored), inside the caller's transaction, so the caller can record the
/// members' events in the same commit. After `UnknownMembers` the caller rolls back.
pub async fn create_conversation(
    conn: &mut PgConnection,
    creator: UserId,
    members: &[UserId],
    title: Option<&Title>,
) -> Result<CreateConversation, sqlx::Error> {
    timed("conversations.create_conversation", async move {
        let mut all: Vec<UserId> = members.to_vec();
        all.push(creator);
        all.sort_unstable();
        all.dedup();

        let id = ConversationId::new();
        let created_at: OffsetDateTime = sqlx::query_scalar(
            "INSERT INTO conversations (id, title, created_by, owner_id, last_activity_at)
             VALUES ($1, $2, $3, $3, now()) RETURNING created_at",
        )
        .bind(id)
        .bind(title.map(Title::as_str))
        .bind(creator)
        .fetch_one(&mut *conn)
        .await?;
        // One statement for every member; only ids that name a user are inserted.
        let inserted: Vec<UserId> = sqlx::query_scalar(
            "INSERT INTO conversation_members (conversation_id, user_id)
             SELECT $1, u.id FROM users u WHERE u.id = ANY($2) AND u.deleted_at IS NULL
             FOR SHARE
             RETURNING user_id",
        )
        .bind(id)
        .bind(&all)
        .fetch_all(&mut *conn)
        .await?;
        if inserted.len() != all.len() {
            let unknown: Vec<UserId> = all.into_iter().filter(|m| !inserted.contains(m)).collect();
            return Ok(CreateConversation::UnknownMembers(unknown));
        }
        Ok(CreateConversation::Created(Box::new(Conversation {
            id,
            title: title.map(|t| t.as_str().to_owned()),
            owner_id: creator,
            member_ids: all,
            created_at,
            last_seq: 0,
            last_activity_at: created_at,
            last_message: None,
            read_seq: 0,
            unread_count: 0,
            muted: None,
        })))
    })
    .await
}

/// A conversation with one member's place in it (`me`), and its newest message (`lm`).
/// Callers add the `WHERE`, the order and the limit.
const VIEW: &str = "SELECT c.id, c.title, c.owner_id, c.created_at, c.last_seq, c.last_activity_at,
        ARRAY(SELECT m.user_id FROM conversation_members m WHERE m.conversation_id = c.id ORDER BY m.user_id) AS member_ids,
        me.user_id AS viewer_id, me.read_seq,
        (SELECT count(*) FROM (
             SELECT 1 FROM messages x
             WHERE x.conversation_id = c.id AND x.seq > me.read_seq
               AND x.sender_id <> me.user_id AND x.deleted_at IS NULL
             LIMIT 1000) unread) AS unread_count,
        coalesce(me.muted_until > now(), false) AS muted,
        CASE WHEN me.muted_until > now() AND me.muted_until <> 'infinity' THEN me.muted_until END AS muted_until,
        lm.id AS lm_id, lm.seq AS lm_seq, lm.sender_id AS lm_sender_id,
        lm.client_msg_id AS lm_client_msg_id, lm.body AS lm_body, lm.media_id AS lm_media_id,
        lm.created_at AS lm_created_at, lm.edited_at AS lm_edited_at, lm.deleted_at AS lm_deleted_at
    FROM conversation_members me
    JOIN conversations c ON c.id = me.conversation_id
    LEFT JOIN LATERAL (
        SELECT id, seq, sender_id, client_msg_id, body, media_id, created_at, edited_at, deleted_at
        FROM messages WHERE conversation_id = c.id ORDER BY seq DESC LIMIT 1
    ) lm ON true";

/// A row of [`VIEW`].
#[derive(sqlx::FromRow)]
struct ViewRow {
    id: ConversationId,
    title: Option<String>,
    owner_id: UserId,
    created_at: OffsetDateTime,
    last_seq: i64,
    last_activity_at: OffsetDateTime,
    member_ids: Vec<UserId>,
    viewer_id: UserId,
    read_seq: i64,
    unread_count: i64,
    muted: bool,
    muted_until: Option<OffsetDateTime>,
    lm_id: Option<MessageId>,
    lm_seq: Option<i64>,
    lm_sender_id: Option<UserId>,
    lm_client_msg_id: Option<String>,
    lm_body: Option<String>,
    lm_media_id: Option<MediaId>,
    lm_created_at: Option<OffsetDateTime>,
    lm_edited_at: Option<OffsetDateTime>,
    lm_deleted_at: Option<OffsetDateTime>,
}

impl ViewRow {
    fn into_view(self) -> (UserId, Conversation) {
        let last_message = match (
            self.lm_id,
            self.lm_seq,
            self.lm_sender_id,
            self.lm_client_msg_id,
            self.lm_body,
            self.lm_created_at,
        ) {
            (Some(id), Some(seq), Some(sender_id), Some(client_msg_id), Some(body), Some(at)) => {
                Some(Message {
                    id,
                    conversation_id: self.id,
                    seq,
                    sender_id,
                    client_msg_id,
                    body,
                    media_id: self.lm_media_id,
                    created_at: at,
                    edited_at: self.lm_edited_at,
                    deleted_at: self.lm_deleted_at,
                })
            }
            _ => None,
        };
        let conversation = Conversation {
            id: self.id,
            title: self.title,
            owner_id: self.owner_id,
            member_ids: self.member_ids,
            created_at: self.created_at,
            last_seq: self.last_seq,
            last_activity_at: self.last_activity_at,
            last_message,
            read_seq: self.read_seq,
            unread_count: self.unread_count,
            muted: self.muted.then_some(self.muted_until),
        };
        (self.viewer_id, conversation)
    }
}

/// A conversation as `user`, a member, sees it; `None` for others' and for unknown ids
/// alike.
pub async fn find_conversation(
    db: impl PgExecutor<'_>,
    user: UserId,
    id: ConversationId,
) -> Result<Option<Conversation>, sqlx::Error> {
    timed("conversations.find_conversation", async move {
        let row: Option<ViewRow> = sqlx::query_as(&format!(
            "{VIEW} WHERE me.user_id = $1 AND me.conversation_id = $2"
        ))
        .bind(user)
        .bind(id)
        .fetch_optional(db)
        .await?;
        Ok(row.map(|row| row.into_view().1))
    })
    .await
}

/// A conversation as each of `users` sees it (those who are members), for the events
/// that tell them of it.
pub async fn views_of(
    db: impl PgExecutor<'_>,
    users: &[UserId],
    id: ConversationId,
) -> Result<Vec<(UserId, Conversation)>, sqlx::Error> {
    timed("conversations.views_of", async move {
        let rows: Vec<ViewRow> = sqlx::query_as(&format!(
            "{VIEW} WHERE me.user_id = ANY($1) AND me.conversation_id = $2"
        ))
        .bind(users)
        .bind(id)
        .fetch_all(db)
        .await?;
        Ok(rows.into_iter().map(ViewRow::into_view).collect())
    })
    .await
}

/// Where a page of conversations resumes: below this (last activity, id).
pub type ListPosition = (OffsetDateTime, ConversationId);

/// One page of `user`'s conversations, the most recently active first, starting below
/// `after`.
pub async fn list_conversations(
    db: impl PgExecutor<'_>,
    user: UserId,
    after: Option<ListPosition>,
    limit: i64,
) -> Result<Vec<Conversation>, sqlx::Error> {
    timed("conversations.list_conversations", async move {
        let (at, id) = after.unzip();
        let rows: Vec<ViewRow> = sqlx::query_as(&format!(
            "{VIEW}
             WHERE me.user_id = $1
               AND ($2::timestamptz IS NULL OR (c.last_activity_at, c.id) < ($2, $3))
             ORDER BY c.last_activity_at DESC, c.id DESC
             LIMIT $4"
        ))
        .bind(user)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(db)
        .await?;
        Ok(rows.into_iter().map(|row| row.into_view().1).collect())
    })
    .await
}

/// The newest offset of a conversation `user` belongs to; `None` if not a member.
pub async fn member_last_seq(
    db: impl PgExecutor<'_>,
    user: UserId,
    conversation: ConversationId,
) -> Result<Option<i64>, sqlx::Error> {
    timed("conversations.member_last_seq", async move {
        sqlx::query_scalar(
            "SELECT c.last_seq FROM conversations c
             JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $1
             WHERE c.id = $2",
        )
        .bind(user)
        .bind(conversation)
        .fetch_optional(db)
        .await
    })
    .await
}

/// The newest offset of each conversation in `ids` (for a gateway catching up after it
/// lost its Redis subscription).
pub async fn last_seqs(
    db: impl PgExecutor<'_>,
    ids: &[ConversationId],
) -> Result<Vec<(ConversationId, i64)>, sqlx::Error> {
    timed("conversations.last_seqs", async move {
        sqlx::query_as("SELECT id, last_seq FROM conversations WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(db)
            .await
    })
    .await
}

/// A member as a post sees them: whom to notify, what to call the sender.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Member {
    pub user_id: UserId,
    pub display_name: String,
    /// Muted now: no pushes (their unread count still grows).
    pub muted: bool,
}

/// The members of a conversation with their display names and mute: for a post, whom
/// to notify and what to call the sender, in one round trip.
pub async fn members_with_names(
    db: impl PgExecutor<'_>,
    conversation: ConversationId,
) -> Result<Vec<Member>, sqlx::Error> {
    timed("conversations.members_with_names", async move {
        sqlx::query_as(
            "SELECT m.user_id, u.display_name, coalesce(m.muted_until > now(), false) AS muted
             FROM conversation_members m JOIN users u ON u.id = m.user_id
             WHERE m.conversation_id = $1
             ORDER BY m.user_id",
        )
        .bind(conversation)
        .fetch_all(db)
        .await
    })
    .await
}

/// Each of `users`' total unread messages, over all their conversations (muted ones
/// too): the badge a push carries. Users with none are left out.
pub async fn total_unread(
    db: impl PgExecutor<'_>,
    users: &[UserId],
) -> Result<Vec<(UserId, i64)>, sqlx::Error> {
    timed("conversations.total_unread", async move {
        sqlx::query_as(
            "SELECT me.user_id, sum(unread.count)::bigint
             FROM conversation_members me
             CROSS JOIN LATERAL (
                 SELECT count(*) FROM (
                     SELECT 1 FROM messages x
                     WHERE x.conversation_id = me.conversation_id AND x.seq > me.read_seq
                       AND x.sender_id <> me.user_id AND x.deleted_at IS NULL
                     LIMIT 1000) capped
             ) unread
             WHERE me.user_id = ANY($1)
             GROUP BY me.user_id
             HAVING sum(unread.count) > 0",
        )
        .bind(users)
        .fetch_all(db)
        .await
    })
    .await
}

/// A message to post.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub conversation_id: ConversationId,
    pub sender_id: UserId,
    pub client_msg_id: &'a ClientMsgId,
    pub body: &'a MessageText,
    pub media_id: Option<MediaId>,
}

/// The outcome of [`insert_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostMessage {
    /// A new message with the next seq.
    Created(Message),
    /// The sender already posted this `client_msg_id` here: the first message.
    Duplicate(Message),
    /// No such conversation, or the sender is not a member.
    NotFound,
}

/// Posts a message inside the caller's transaction, so the caller can enqueue work in
/// the same commit. `Duplicate` and `NotFound` leave the database as it was, whether the
/// caller then commits or rolls back.
pub async fn insert_message(
    conn: &mut PgConnection,
    message: &NewMessage<'_>,
) -> Result<PostMessage, sqlx::Error> {
    timed("conversations.insert_message", async move {
        // The sender's row first, in the mode the foreign key would take it later: an
        // account being deleted (which locks its row, then its conversations) is waited
        // for here rather than while holding the conversation, and a deleted account
        // (with a still-unexpired access token) posts nothing.
        let live: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NULL FOR KEY SHARE",
        )
        .bind(message.sender_id)
        .fetch_optional(&mut *conn)
        .await?;
        if live.is_none() {
            return Ok(PostMessage::NotFound);
        }
        // Take the conversation's lock and the next seq in one statement; members only.
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations c SET last_seq = c.last_seq + 1, last_activity_at = now()
             WHERE c.id = $1
               AND EXISTS (SELECT 1 FROM conversation_members m WHERE m.conversation_id = c.id AND m.user_id = $2)
             RETURNING c.last_seq",
        )
        .bind(message.conversation_id)
        .bind(message.sender_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(seq) = seq else {
            return Ok(PostMessage::NotFound);
        };

        // The membership again, in this statement's snapshot: the one above may have
        // waited for the lock behind a removal of the sender, and then it judged the
        // membership by what it saw before the wait. Asked here, it costs no round trip.
        let created = sqlx::query_as::<_, Message>(&format!(
            "INSERT INTO messages (conversation_id, seq, id, sender_id, client_msg_id, body, media_id)
             SELECT $1, $2, $3, $4, $5, $6, $7
             WHERE EXISTS (SELECT 1 FROM conversation_members m
                           WHERE m.conversation_id = $1 AND m.user_id = $4)
             ON CONFLICT ON CONSTRAINT messages_client_msg_id_key DO NOTHING
             RETURNING {MESSAGE_COLUMNS}"
        ))
        .bind(message.conversation_id)
        .bind(seq)
        .bind(MessageId::new())
        .bind(message.sender_id)
        .bind(message.client_msg_id.as_str())
        .bind(message.body.as_str())
        .bind(message.media_id)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(created) = created {
            return Ok(PostMessage::Created(created));
        }

        // Removed meanwhile, or a retry of a message already posted. We still hold the
        // lock (nobody took a seq after ours): give the seq back (and the activity time,
        // which neither is). A retry gets the first message, committed before our lock.
        sqlx::query(
            "UPDATE conversations c SET last_seq = c.last_seq - 1,
                 last_activity_at = coalesce(
                     (SELECT max(m.created_at) FROM messages m WHERE m.conversation_id = c.id),
                     c.created_at)
             WHERE c.id = $1",
        )
            .bind(message.conversation_id)
            .execute(&mut *conn)
            .await?;
        let first = sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE conversation_id = $1 AND sender_id = $2 AND client_msg_id = $3"
        ))
        .bind(message.conversation_id)
        .bind(message.sender_id)
        .bind(message.client_msg_id.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        Ok(first.map_or(PostMessage::NotFound, PostMessage::Duplicate))
    })
    .await
}

const MESSAGE_COLUMNS: &str = "id, conversation_id, seq, sender_id, client_msg_id, body, media_id, created_at, edited_at, deleted_at";

/// Which messages of a conversation to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The oldest `limit` messages with seq > `after`, ascending.
    After(i64),
    /// The newest `limit` messages with seq < `before`, returned ascending.
    Before(i64),
    /// The newest `limit` messages, returned ascending.
    Latest,
}

/// Messages of a conversation in ascending seq order. Membership is the caller's check.
pub async fn list_messages(
    db: impl PgExecutor<'_>,
    conversation: ConversationId,
    window: Window,
    limit: i64,
) -> Result<Vec<Message>, sqlx::Error> {
    timed("conversations.list_messages", async move {
        let query = match window {
            Window::After(_) => format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
            ),
            Window::Before(_) | Window::Latest => format!(
                "SELECT * FROM (
                     SELECT {MESSAGE_COLUMNS} FROM messages
                     WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3
                 ) newest ORDER BY seq"
            ),
        };
        let bound = match window {
            Window::After(after) => after,
            Window::Before(before) => before,
            Window::Latest => i64::MAX,
        };
        sqlx::query_as(&query)
            .bind(conversation)
            .bind(bound)
            .bind(limit)
            .fetch_all(db)
            .await
    })
    .await
}

/// What a member's lock on a conversation found: the conversation is theirs to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Locked {
    pub owner_id: UserId,
}

/// Takes the conversation's lock for a change by `user`, if `user` is a live member;
/// `None` otherwise. The user's row first, as a post takes it: an account being deleted
/// (which locks its row, then its conversations) is waited for here rather than while
/// holding the conversation.
pub(crate) async fn lock_as_member(
    conn: &mut PgConnection,
    conversation: ConversationId,
    user: UserId,
) -> Result<Option<Locked>, sqlx::Error> {
    let live: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NULL FOR KEY SHARE",
    )
    .bind(user)
    .fetch_optional(&mut *conn)
    .await?;
    if live.is_none() {
        return Ok(None);
    }
    let owner_id: Option<UserId> = sqlx::query_scalar(
        "SELECT c.owner_id FROM conversations c
         WHERE c.id = $1
           AND EXISTS (SELECT 1 FROM conversation_members m WHERE m.conversation_id = c.id AND m.user_id = $2)
         FOR NO KEY UPDATE",
    )
    .bind(conversation)
    .bind(user)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(owner_id) = owner_id else {
        return Ok(None);
    };
    // Asked again now that the lock is ours: if taking it waited for a removal of
    // `user`, the statement above still judged the membership by its snapshot from
    // before the wait (PostgreSQL re-reads only the locked row).
    let member: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM conversation_members WHERE conversation_id = $1 AND user_id = $2)",
    )
    .bind(conversation)
    .bind(user)
    .fetch_one(&mut *conn)
    .await?;
    Ok(member.then_some(Locked { owner_id }))
}

/// Takes the next offset of a conversation whose lock the caller holds, and records
/// the event at it: a message event names its message, any other carries its `data`.
pub(crate) async fn record(
    conn: &mut PgConnection,
    conversation: ConversationId,
    kind: ConversationEventKind,
    message: Option<MessageId>,
    data: Option<&str>,
) -> Result<i64, sqlx::Error> {
    let seq: i64 = sqlx::query_scalar(
        "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
    )
    .bind(conversation)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO conversation_events (conversation_id, seq, kind, message_id, data)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(conversation)
    .bind(seq)
    .bind(kind)
    .bind(message)
    .bind(data)
    .execute(&mut *conn)
    .await?;
    Ok(seq)
}

/// The outcome of [`edit_message`] and [`delete_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeMessage {
    /// Changed; the event is at `seq`.
    Changed { message: Message, seq: i64 },
    /// Already as asked (the same body; deleted before): no event.
    Unchanged(Message),
    /// No such message in a conversation of the user's.
    NotFound,
    /// Someone else's message.
    NotSender,
    /// A tombstone cannot be edited.
    Deleted,
}

/// The message `id` of `conversation`, locked, once `user` holds the conversation.
async fn lock_message(
    conn: &mut PgConnection,
    conversation: ConversationId,
    user: UserId,
    id: MessageId,
) -> Result<Result<Message, ChangeMessage>, sqlx::Error> {
    if lock_as_member(&mut *conn, conversation, user)
        .await?
        .is_none()
    {
        return Ok(Err(ChangeMessage::NotFound));
    }
    let message: Option<Message> = sqlx::query_as(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND id = $2 FOR UPDATE"
    ))
    .bind(conversation)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match message {
        None => Err(ChangeMessage::NotFound),
        Some(message) if message.sender_id != user => Err(ChangeMessage::NotSender),
        Some(message) => Ok(message),
    })
}

/// Its sender replaces a message's body, inside the caller's transaction (and the
/// preview in its pushes not yet sent); the `message.updated` event takes the next
/// offset. Anything but `Changed` leaves the database as it was.
pub async fn edit_message(
    conn: &mut PgConnection,
    conversation: ConversationId,
    user: UserId,
    id: MessageId,
    body: &MessageText,
) -> Result<ChangeMessage, sqlx::Error> {
    timed("conversations.edit_message", async move {
        let message = match lock_message(&mut *conn, conversation, user, id).await? {
            Ok(message) => message,
            Err(outcome) => return Ok(outcome),
        };
        if message.deleted_at.is_some() {
            return Ok(ChangeMessage::Deleted);
        }
        if message.body == body.as_str() {
            return Ok(ChangeMessage::Unchanged(message));
        }
        let message: Message = sqlx::query_as(&format!(
            "UPDATE messages SET body = $3, edited_at = now()
             WHERE conversation_id = $1 AND id = $2 RETURNING {MESSAGE_COLUMNS}"
        ))
        .bind(conversation)
        .bind(id)
        .bind(body.as_str())
        .fetch_one(&mut *conn)
        .await?;
        // Its pushes not yet sent carry its preview: they show the new text.
        crate::push::retext_for_message(&mut *conn, id, body.as_str()).await?;
        let seq = record(
            conn,
            conversation,
            ConversationEventKind::MessageUpdated,
            Some(id),
            None,
        )
        .await?;
        Ok(ChangeMessage::Changed { message, seq })
    })
    .await
}

/// Its sender deletes a message, inside the caller's transaction: the body and the
/// media go (and its pushes not yet sent), a tombstone keeps the offset, and
/// `message.deleted` takes the next one.
/// Anything but `Changed` leaves the database as it was.
pub async fn delete_message(
    conn: &mut PgConnection,
    conversation: ConversationId,
    user: UserId,
    id: MessageId,
) -> Result<ChangeMessage, sqlx::Error> {
    timed("conversations.delete_message", async move {
        let message = match lock_message(&mut *conn, conversation, user, id).await? {
            Ok(message) => message,
            Err(outcome) => return Ok(outcome),
        };
        if message.deleted_at.is_some() {
            return Ok(ChangeMessage::Unchanged(message));
        }
        let message: Message = sqlx::query_as(&format!(
            "UPDATE messages SET body = '', media_id = NULL, deleted_at = now()
             WHERE conversation_id = $1 AND id = $2 RETURNING {MESSAGE_COLUMNS}"
        ))
        .bind(conversation)
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
        // Its pushes not yet sent carry its preview: they go with it.
        crate::push::drop_for_message(&mut *conn, id).await?;
        let seq = record(
            conn,
            conversation,
            ConversationEventKind::MessageDeleted,
            Some(id),
            None,
        )
        .await?;
        Ok(ChangeMessage::Changed { message, seq })
    })
    .await
}

/// The outcome of [`set_title`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetTitle {
    /// `conversation.updated` is at `seq`, with `data`.
    Changed {
        seq: i64,
        data: String,
    },
    /// The title was this already: no event.
    Unchanged,
    NotFound,
}

/// A member sets the title (`None`: untitled), inside the caller's transaction.
pub async fn set_title(
    conn: &mut PgConnection,
    conversation: ConversationId,
    user: UserId,
    title: Option<&Title>,
) -> Result<SetTitle, sqlx::Error> {
    timed("conversations.set_title", async move {
        if lock_as_member(&mut *conn, conversation, user)
            .await?
            .is_none()
        {
            return Ok(SetTitle::NotFound);
        }
        let title = title.map(|t| t.as_str().to_owned());
        let changed = sqlx::query(
            "UPDATE conversations SET title = $2 WHERE id = $1 AND title IS DISTINCT FROM $2",
        )
        .bind(conversation)
        .bind(title.as_deref())
        .execute(&mut *conn)
        .await?;
        if changed.rows_affected() == 0 {
            return Ok(SetTitle::Unchanged);
        }
        let data = encode(&ConversationUpdated { title, by: user })?;
        let seq = record(
            conn,
            conversation,
            ConversationEventKind::ConversationUpdated,
            None,
            Some(&data),
        )
        .await?;
        Ok(SetTitle::Changed { seq, data })
    })
    .await
}

/// The JSON text an event's `data` is stored and published as.
pub(crate) fn encode(data: &impl serde::Serialize) -> Result<String, sqlx::Error> {
    serde_json::to_string(data).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// One event of a conversation's log, as [`list_events`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's offset.
    pub seq: i64,
    pub kind: ConversationEventKind,
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// `message.*`: the message as it is now (edited, or a tombstone).
    Message(Message),
    /// Any other kind: its `data`, the JSON text that was published.
    Data(String),
}

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    kind: ConversationEventKind,
    data: Option<String>,
    id: Option<MessageId>,
    message_seq: Option<i64>,
    sender_id: Option<UserId>,
    client_msg_id: Option<String>,
    body: Option<String>,
    media_id: Option<MediaId>,
    created_at: Option<OffsetDateTime>,
    edited_at: Option<OffsetDateTime>,
    deleted_at: Option<OffsetDateTime>,
}

/// The events of a conversation with offsets in `after + 1 ..= upto`, at most `limit`,
/// in offset order: its messages (`message.created`) and its other events merged.
/// Membership is the caller's check.
pub async fn list_events(
    db: impl PgExecutor<'_>,
    conversation: ConversationId,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    timed("conversations.list_events", async move {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT e.seq, e.kind, e.data, x.id, x.seq AS message_seq, x.sender_id, x.client_msg_id,
                    x.body, x.media_id, x.created_at, x.edited_at, x.deleted_at
             FROM (
                 (SELECT seq, 'message.created' AS kind, id AS message_id, NULL::text AS data
                  FROM messages WHERE conversation_id = $1 AND seq > $2 AND seq <= $3
                  ORDER BY seq LIMIT $4)
                 UNION ALL
                 (SELECT seq, kind, message_id, data
                  FROM conversation_events WHERE conversation_id = $1 AND seq > $2 AND seq <= $3
                  ORDER BY seq LIMIT $4)
                 ORDER BY seq LIMIT $4
             ) e
             LEFT JOIN messages x ON x.id = e.message_id
             ORDER BY e.seq",
        )
        .bind(conversation)
        .bind(after)
        .bind(upto)
        .bind(limit)
        .fetch_all(db)
        .await?;
        rows.into_iter()
            .map(|row| {
                let body = match (row.data, row.id) {
                    (Some(data), _) => EventBody::Data(data),
                    (None, Some(id)) => EventBody::Message(Message {
                        id,
                        conversation_id: conversation,
                        seq: row.message_seq.unwrap_or(row.seq),
                        sender_id: row.sender_id.ok_or_else(|| missing("sender_id"))?,
                        client_msg_id: row.client_msg_id.ok_or_else(|| missing("client_msg_id"))?,
                        body: row.body.ok_or_else(|| missing("body"))?,
                        media_id: row.media_id,
                        created_at: row.created_at.ok_or_else(|| missing("created_at"))?,
                        edited_at: row.edited_at,
                        deleted_at: row.deleted_at,
                    }),
                    (None, None) => return Err(missing("data")),
                };
                Ok(Event {
                    seq: row.seq,
                    kind: row.kind,
                    body,
                })
            })
            .collect()
    })
    .await
}

fn missing(column: &str) -> sqlx::Error {
    sqlx::Error::ColumnNotFound(column.to_owned())
}

#[cfg(test)]
mod tests {
    use mobile_domain::{DisplayName, Email};

    use super::*;
    use crate::users::{InsertUser, insert_user};

    async fn user(pool: &crate::Db, email: &str) -> UserId {
        let email = Email::parse(email).unwrap();
        match insert_user(pool, &email, "hash", &DisplayName::parse("U").unwrap())
            .await
            .unwrap()
        {
            InsertUser::Inserted(user) => user.id,
            InsertUser::EmailTaken => unreachable!(),
        }
    }

    async fn create(
        pool: &crate::Db,
        creator: UserId,
        members: &[UserId],
        title: Option<&Title>,
    ) -> CreateConversation {
        let mut tx = pool.begin().await.unwrap();
        let created = create_conversation(&mut tx, creator, members, title)
            .await
            .unwrap();
        if let CreateConversation::Created(_) = created {
            tx.commit().await.unwrap();
        }
        created
    }

    async fn post(
        pool: &crate::Db,
        conversation: ConversationId,
        sender: UserId,
        client_msg_id: &str,
    ) -> PostMessage {
        let mut tx = pool.begin().await.unwrap();
        let outcome = insert_message(
            &mut tx,
            &NewMessage {
                conversation_id: conversation,
                sender_id: sender,
                client_msg_id: &ClientMsgId::parse(client_msg_id).unwrap(),
                body: &MessageText::parse("hi").unwrap(),
                media_id: None,
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        outcome
    }

    #[tokio::test]
    async fn concurrent_posts_get_gap_free_seqs_and_retries_deduplicate() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let ann = user(&pool, "ann@example.com").await;
        let bob = user(&pool, "bob@example.com").await;
        let CreateConversation::Created(conversation) =
            create(&pool, ann, &[bob, ann], Some(&Title::parse("t").unwrap())).await
        else {
            panic!("created");
        };
        assert_eq!(conversation.member_ids.len(), 2, "the creator once");
        let conversation = *conversation;

        let posts = (0..40).map(|i| {
            let pool = pool.clone();
            let sender = if i % 2 == 0 { ann } else { bob };
            tokio::spawn(
                async move { post(&pool, conversation.id, sender, &format!("m{i}")).await },
            )
        });
        let mut seqs = Vec::new();
        for post in posts {
            match post.await.unwrap() {
                PostMessage::Created(m) => seqs.push(m.seq),
                other => panic!("{other:?}"),
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>());

        let PostMessage::Duplicate(first) = post(&pool, conversation.id, ann, "m0").await else {
            panic!("a retry returns the first message");
        };
        assert_eq!(first.client_msg_id, "m0");
        let latest = member_last_seq(&pool, ann, conversation.id).await.unwrap();
        assert_eq!(latest, Some(40), "a duplicate does not consume a seq");

        let page = list_messages(&pool, conversation.id, Window::After(35), 10)
            .await
            .unwrap();
        assert_eq!(
            page.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![36, 37, 38, 39, 40]
        );
        let page = list_messages(&pool, conversation.id, Window::Before(5), 2)
            .await
            .unwrap();
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4]);
        let page = list_messages(&pool, conversation.id, Window::Latest, 3)
            .await
            .unwrap();
        assert_eq!(
            page.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![38, 39, 40]
        );
    }

    /// Waits until `n` statements of this test's database wait for a lock.
    async fn lock_waiters(pool: &crate::Db, n: i64) {
        for _ in 0..1_000 {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if waiting >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} came to wait for a lock");
    }

    /// Three members are removed while their post, edit and title change wait for the
    /// removal's lock: once it commits, each is refused, and the log ends with the
    /// removals (nothing of theirs after them, no offset lost).
    #[tokio::test]
    async fn a_change_waiting_behind_its_authors_removal_is_refused() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let ann = user(&pool, "ann@example.com").await;
        let bob = user(&pool, "bob@example.com").await;
        let cy = user(&pool, "cy@example.com").await;
        let dee = user(&pool, "dee@example.com").await;
        let CreateConversation::Created(conversation) =
            create(&pool, ann, &[bob, cy, dee], None).await
        else {
            panic!("created");
        };
        let id = conversation.id;
        let PostMessage::Created(first) = post(&pool, id, cy, "first").await else {
            panic!("cy posts while a member");
        };

        let mut removal = pool.begin().await.unwrap();
        for member in [bob, cy, dee] {
            let removed = crate::members::remove_member(&mut removal, id, ann, member)
                .await
                .unwrap();
            assert!(matches!(
                removed,
                crate::members::RemoveMember::Removed { .. }
            ));
        }
        let posted = tokio::spawn({
            let pool = pool.clone();
            async move { post(&pool, id, bob, "late").await }
        });
        let edited = tokio::spawn({
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                let body = MessageText::parse("edited").unwrap();
                let edited = edit_message(&mut tx, id, cy, first.id, &body).await;
                tx.commit().await.unwrap();
                edited.unwrap()
            }
        });
        let titled = tokio::spawn({
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                let title = Title::parse("mine").unwrap();
                let titled = set_title(&mut tx, id, dee, Some(&title)).await;
                tx.commit().await.unwrap();
                titled.unwrap()
            }
        });
        lock_waiters(&pool, 3).await;
        removal.commit().await.unwrap();
        assert_eq!(posted.await.unwrap(), PostMessage::NotFound);
        assert_eq!(edited.await.unwrap(), ChangeMessage::NotFound);
        assert_eq!(titled.await.unwrap(), SetTitle::NotFound);

        let last: i64 = sqlx::query_scalar("SELECT last_seq FROM conversations WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(last, 4, "the last removal is the newest event");
        let events = list_events(&pool, id, 0, 100, 100).await.unwrap();
        let kinds: Vec<_> = events.iter().map(|e| (e.seq, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (1, ConversationEventKind::MessageCreated),
                (2, ConversationEventKind::MemberRemoved),
                (3, ConversationEventKind::MemberRemoved),
                (4, ConversationEventKind::MemberRemoved),
            ]
        );
        let title: Option<String> =
            sqlx::query_scalar("SELECT title FROM conversations WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(title, None);
    }

    /// The owner leaves while the member next in line is deleting their account (which
    /// holds their user row and waits for the conversation): ownership passes to the
    /// member after them instead of waiting for that row, which would be a deadlock.
    #[tokio::test]
    async fn ownership_passes_over_a_member_whose_account_is_being_deleted() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let ann = user(&pool, "ann@example.com").await;
        let bob = user(&pool, "bob@example.com").await;
        let cy = user(&pool, "cy@example.com").await;
        let CreateConversation::Created(conversation) = create(&pool, ann, &[bob], None).await
        else {
            panic!("created");
        };
        let id = conversation.id;
        let mut tx = pool.begin().await.unwrap();
        let added = crate::members::add_members(&mut tx, id, ann, &[cy])
            .await
            .unwrap();
        assert!(matches!(added, crate::members::AddMembers::Added { .. }));
        tx.commit().await.unwrap();

        // Bob's deletion, as `accounts::delete_account` begins it: his row first.
        let mut deletion = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
            .bind(bob)
            .execute(&mut *deletion)
            .await
            .unwrap();

        let (left_tx, left_rx) = tokio::sync::oneshot::channel();
        let (commit_tx, commit_rx) = tokio::sync::oneshot::channel::<()>();
        let leaving = tokio::spawn({
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                let left = crate::members::remove_member(&mut tx, id, ann, ann)
                    .await
                    .unwrap();
                left_tx.send(left).unwrap();
                commit_rx.await.unwrap();
                tx.commit().await.unwrap();
            }
        });
        let left = tokio::select! {
            left = left_rx => left.unwrap(),
            () = lock_waiters(&pool, 1) => panic!(
                "leaving waits for bob's row while holding the conversation, which his \
                 deletion waits for next: a deadlock"
            ),
        };
        let crate::members::RemoveMember::Removed { data, .. } = left else {
            panic!("ann left: {left:?}");
        };
        let removed: mobile_domain::MemberRemoved = serde_json::from_str(&data).unwrap();
        assert_eq!(removed.owner_id, cy, "bob, being deleted, is passed over");

        // The deletion goes on: the conversation, once the leaving commits.
        commit_tx.send(()).unwrap();
        sqlx::query("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut *deletion)
            .await
            .unwrap();
        deletion.commit().await.unwrap();
        leaving.await.unwrap();
    }

    #[tokio::test]
    async fn outsiders_cannot_post_or_see() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let ann = user(&pool, "ann@example.com").await;
        let eve = user(&pool, "eve@example.com").await;
        let CreateConversation::Created(conversation) = create(&pool, ann, &[], None).await else {
            panic!("created");
        };
        assert_eq!(
            post(&pool, conversation.id, eve, "x").await,
            PostMessage::NotFound
        );
        assert!(
            find_conversation(&pool, eve, conversation.id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            member_last_seq(&pool, eve, conversation.id)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            member_last_seq(&pool, ann, conversation.id).await.unwrap(),
            Some(0)
        );

        let unknown = UserId::new();
        assert!(matches!(
            create(&pool, ann, &[unknown], None).await,
            CreateConversation::UnknownMembers(ids) if ids == vec![unknown]
        ));
    }
}

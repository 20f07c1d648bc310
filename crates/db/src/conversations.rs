//! Conversations, members, and messages.
//!
//! `seq` is assigned by incrementing `conversations.last_seq` in the insert's own
//! transaction. The `UPDATE` takes the conversation's row lock, so concurrent posts to
//! one conversation queue there (posts to different conversations do not contend), and
//! a transaction that rolls back gives its number back: the seqs readers see are 1, 2,
//! 3, ... with no gaps, in commit order.

use crate::Db;
use crate::metrics::timed;
use mobile_domain::{ClientMsgId, ConversationId, MediaId, MessageId, MessageText, Title, UserId};
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;

/// The most members a conversation may have.
pub const MAX_MEMBERS: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Conversation {
    pub id: ConversationId,
    pub title: Option<String>,
    pub member_ids: Vec<UserId>,
    pub created_at: OffsetDateTime,
    pub last_seq: i64,
}

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
}

/// The outcome of [`create_conversation`].
#[derive(Debug)]
pub enum CreateConversation {
    Created(Conversation),
    /// These member ids name no user (or a deleted account, which may be the creator's).
    UnknownMembers(Vec<UserId>),
}

/// Creates a conversation whose members are `creator` plus `members` (duplicates
/// ignored), in one transaction.
pub async fn create_conversation(
    db: &Db,
    creator: UserId,
    members: &[UserId],
    title: Option<&Title>,
) -> Result<CreateConversation, sqlx::Error> {
    timed("conversations.create_conversation", async move {
        let mut all: Vec<UserId> = members.to_vec();
        all.push(creator);
        all.sort_unstable();
        all.dedup();

        let mut tx = db.begin().await?;
        let id = ConversationId::new();
        let created_at: OffsetDateTime =
            sqlx::query_scalar("INSERT INTO conversations (id, title, created_by) VALUES ($1, $2, $3) RETURNING created_at")
                .bind(id)
                .bind(title.map(Title::as_str))
                .bind(creator)
                .fetch_one(&mut *tx)
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
        .fetch_all(&mut *tx)
        .await?;
        if inserted.len() != all.len() {
            let unknown: Vec<UserId> = all.into_iter().filter(|m| !inserted.contains(m)).collect();
            tx.rollback().await?;
            return Ok(CreateConversation::UnknownMembers(unknown));
        }
        tx.commit().await?;
        Ok(CreateConversation::Created(Conversation {
            id,
            title: title.map(|t| t.as_str().to_owned()),
            member_ids: all,
            created_at,
            last_seq: 0,
        }))
    })
    .await
}

const CONVERSATION_COLUMNS: &str = "c.id, c.title, c.created_at, c.last_seq,
    ARRAY(SELECT m.user_id FROM conversation_members m WHERE m.conversation_id = c.id ORDER BY m.user_id) AS member_ids";

/// A conversation `user` is a member of; `None` for others' and for unknown ids alike.
pub async fn find_conversation(
    db: impl PgExecutor<'_>,
    user: UserId,
    id: ConversationId,
) -> Result<Option<Conversation>, sqlx::Error> {
    timed("conversations.find_conversation", async move {
        sqlx::query_as(&format!(
            "SELECT {CONVERSATION_COLUMNS}
             FROM conversations c
             JOIN conversation_members me ON me.conversation_id = c.id AND me.user_id = $1
             WHERE c.id = $2"
        ))
        .bind(user)
        .bind(id)
        .fetch_optional(db)
        .await
    })
    .await
}

/// One page of `user`'s conversations, newest first, starting below `before`.
pub async fn list_conversations(
    db: impl PgExecutor<'_>,
    user: UserId,
    before: Option<ConversationId>,
    limit: i64,
) -> Result<Vec<Conversation>, sqlx::Error> {
    timed("conversations.list_conversations", async move {
        sqlx::query_as(&format!(
            "SELECT {CONVERSATION_COLUMNS}
             FROM conversation_members me
             JOIN conversations c ON c.id = me.conversation_id
             WHERE me.user_id = $1 AND ($2::uuid IS NULL OR me.conversation_id < $2)
             ORDER BY me.conversation_id DESC
             LIMIT $3"
        ))
        .bind(user)
        .bind(before)
        .bind(limit)
        .fetch_all(db)
        .await
    })
    .await
}

/// The newest seq of a conversation `user` belongs to; `None` if not a member.
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

/// The newest seq of each conversation in `ids` (for a gateway catching up after it
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

/// The members of a conversation with their display names: for a post, whom to
/// notify and what to call the sender, in one round trip.
pub async fn members_with_names(
    db: impl PgExecutor<'_>,
    conversation: ConversationId,
) -> Result<Vec<(UserId, String)>, sqlx::Error> {
    timed("conversations.members_with_names", async move {
        sqlx::query_as(
            "SELECT m.user_id, u.display_name
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
            "UPDATE conversations c SET last_seq = c.last_seq + 1
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

        let created = sqlx::query_as::<_, Message>(&format!(
            "INSERT INTO messages (conversation_id, seq, id, sender_id, client_msg_id, body, media_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
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

        // A retry of a message already posted. We still hold the lock (so the original is
        // committed and nobody took a seq after ours): give the seq back, return the first.
        sqlx::query("UPDATE conversations SET last_seq = last_seq - 1 WHERE id = $1")
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
        .fetch_one(&mut *conn)
        .await?;
        Ok(PostMessage::Duplicate(first))
    })
    .await
}

const MESSAGE_COLUMNS: &str =
    "id, conversation_id, seq, sender_id, client_msg_id, body, media_id, created_at";

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
            create_conversation(&pool, ann, &[bob, ann], Some(&Title::parse("t").unwrap()))
                .await
                .unwrap()
        else {
            panic!("created");
        };
        assert_eq!(conversation.member_ids.len(), 2, "the creator once");

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

    #[tokio::test]
    async fn outsiders_cannot_post_or_see() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let ann = user(&pool, "ann@example.com").await;
        let eve = user(&pool, "eve@example.com").await;
        let CreateConversation::Created(conversation) =
            create_conversation(&pool, ann, &[], None).await.unwrap()
        else {
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
            create_conversation(&pool, ann, &[unknown], None).await.unwrap(),
            CreateConversation::UnknownMembers(ids) if ids == vec![unknown]
        ));
    }
}

//! The `data` of the conversation events that are not about one message: the same
//! JSON is published live, stored at the event's offset, and replayed from there.

use serde::{Deserialize, Serialize};

use crate::{RemovalReason, UserId};

/// `member.added`: who joined, and who added them (the owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemberAdded {
    pub user_ids: Vec<UserId>,
    pub by: UserId,
}

/// `member.removed`: who is no longer a member, why, who did it (the member themself
/// when they left), and the owner from now on (another member when the owner left).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemberRemoved {
    pub user_id: UserId,
    pub reason: RemovalReason,
    pub by: UserId,
    pub owner_id: UserId,
}

/// `conversation.updated`: the title now (`null`: untitled), and who set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationUpdated {
    pub title: Option<String>,
    pub by: UserId,
}

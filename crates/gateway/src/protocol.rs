//! The WebSocket protocol: frames in both directions and close codes.
//! `docs/websocket-protocol.md` is the client-facing description of the same.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Close codes the gateway uses.
pub mod close {
    /// The access token is missing, invalid or expired (`invalid_token`,
    /// `token_expired`), or its session was revoked (`session_revoked`). Terminal:
    /// refresh (or sign in again) before reconnecting.
    pub const BAD_TOKEN: u16 = 4001;
    /// The client did not read fast enough; reconnect and resubscribe with `since`.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// A frame that is not this protocol (not JSON, unknown type, binary).
    pub const PROTOCOL_VIOLATION: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server is restarting; reconnect (to another pod) after `after_ms`.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Missed pongs (the client is gone).
    pub const PING_TIMEOUT: u16 = 1001;
}

/// A frame from the client.
#[derive(Debug)]
pub enum ClientFrame {
    Subscribe {
        id: Option<u64>,
        channel: String,
        /// The last offset the client has; it gets every later one.
        since: Option<i64>,
    },
    Unsubscribe {
        id: Option<u64>,
        channel: String,
    },
    /// An ephemeral event (typing) for the channel's other members; `data` is passed
    /// on as the client wrote it.
    Publish {
        id: Option<u64>,
        channel: String,
        data: Box<RawValue>,
    },
    /// A fresh access token for this socket, before the current one expires.
    Refresh {
        id: Option<u64>,
        token: String,
    },
}

/// Every field any client frame has. serde cannot keep `data` raw inside an internally
/// tagged enum, so frames are read flat and then checked per type.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    id: Option<u64>,
    channel: Option<String>,
    since: Option<i64>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    token: Option<String>,
}

impl ClientFrame {
    /// Parses a text frame; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let channel = || {
            raw.channel
                .clone()
                .ok_or_else(|| format!("a {} frame needs a channel", raw.kind))
        };
        let unexpected = |field: &str, present: bool| {
            if present {
                Err(format!("a {} frame has no {field}", raw.kind))
            } else {
                Ok(())
            }
        };
        match raw.kind {
            "subscribe" => {
                unexpected("data", raw.data.is_some())?;
                unexpected("token", raw.token.is_some())?;
                Ok(Self::Subscribe {
                    id: raw.id,
                    channel: channel()?,
                    since: raw.since,
                })
            }
            "unsubscribe" => {
                unexpected("since", raw.since.is_some())?;
                unexpected("data", raw.data.is_some())?;
                unexpected("token", raw.token.is_some())?;
                Ok(Self::Unsubscribe {
                    id: raw.id,
                    channel: channel()?,
                })
            }
            "publish" => {
                unexpected("since", raw.since.is_some())?;
                unexpected("token", raw.token.is_some())?;
                let data = raw.data.ok_or("a publish frame needs data")?;
                Ok(Self::Publish {
                    id: raw.id,
                    channel: channel()?,
                    data: data.to_owned(),
                })
            }
            "refresh" => {
                unexpected("channel", raw.channel.is_some())?;
                unexpected("since", raw.since.is_some())?;
                unexpected("data", raw.data.is_some())?;
                Ok(Self::Refresh {
                    id: raw.id,
                    token: raw.token.ok_or("a refresh frame needs a token")?,
                })
            }
            other => Err(format!("unknown frame type {other:?}")),
        }
    }
}

/// A frame the gateway writes itself (events arrive pre-encoded from Redis).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        connection_id: &'a str,
        ping_interval_s: u64,
    },
    Subscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        /// The newest offset of the channel when the subscription started (for the
        /// user's own channel: when the connection started).
        offset: Option<i64>,
        /// Whether every event after `since` follows; `false` without `since`, or when
        /// the client is too far behind (then page through REST).
        recovered: bool,
    },
    /// The answer to an `unsubscribe` (with its `id`), or, with a `reason` and no `id`,
    /// the end of a subscription the client did not ask for: `removed`, `left` or
    /// `account_deleted` after the `member.removed` event that ended the membership.
    Unsubscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    Published {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: &'a str,
        message: &'a str,
    },
    /// Sent before a 1012 close: wait `after_ms`, then reconnect and resubscribe with
    /// `since`.
    Reconnect { after_ms: u64 },
    /// The socket now lives on the token of a `refresh` frame, until `expires_at`
    /// (RFC 3339), `expires_in` seconds from now (for a phone whose clock is off).
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        expires_at: &'a str,
        expires_in: i64,
    },
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> String {
        // Plain structs of strings and numbers: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The `id` of a frame that failed to parse, when it has one, to answer it.
pub fn frame_id(text: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct WithId {
        id: Option<u64>,
    }
    serde_json::from_str::<WithId>(text).ok().and_then(|f| f.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_frames_strictly() {
        let frame = ClientFrame::parse(
            r#"{"type":"subscribe","id":1,"channel":"conversation:x","since":4}"#,
        )
        .unwrap();
        assert!(matches!(
            frame,
            ClientFrame::Subscribe {
                id: Some(1),
                since: Some(4),
                ..
            }
        ));
        let frame =
            ClientFrame::parse(r#"{"type":"publish","channel":"c","data":{"typing":true}}"#)
                .unwrap();
        let ClientFrame::Publish { data, .. } = frame else {
            panic!()
        };
        assert_eq!(data.get(), r#"{"typing":true}"#);
        let frame = ClientFrame::parse(r#"{"type":"refresh","id":3,"token":"t"}"#).unwrap();
        assert!(matches!(frame, ClientFrame::Refresh { id: Some(3), token } if token == "t"));
        for bad in [
            r#"{"type":"subscribe"}"#,
            r#"{"type":"shout","channel":"c"}"#,
            r#"{"type":"subscribe","channel":"c","extra":1}"#,
            r#"{"type":"subscribe","channel":"c","since":"4"}"#,
            r#"{"type":"publish","channel":"c"}"#,
            r#"{"type":"unsubscribe","channel":"c","data":1}"#,
            r#"{"type":"refresh","id":1}"#,
            r#"{"type":"refresh","token":"t","channel":"c"}"#,
            r#"{"type":"subscribe","channel":"c","token":"t"}"#,
            "[]",
        ] {
            assert!(ClientFrame::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_frames_match_the_protocol() {
        let text = ServerFrame::Subscribed {
            id: Some(1),
            channel: "conversation:x",
            offset: Some(9),
            recovered: true,
        }
        .to_text();
        assert_eq!(
            text,
            r#"{"type":"subscribed","id":1,"channel":"conversation:x","offset":9,"recovered":true}"#
        );
        assert_eq!(
            ServerFrame::Reconnect { after_ms: 250 }.to_text(),
            r#"{"type":"reconnect","after_ms":250}"#
        );
        assert_eq!(frame_id(r#"{"type":"nope","id":7}"#), Some(7));
    }
}

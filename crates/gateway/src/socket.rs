//! The WebSocket under each connection: the upgrade handshake (RFC 6455 §4), and a
//! sending side that takes the hub's events as ready-made frames.
//!
//! The protocol is tungstenite's: reading and unmasking the client's frames, the size
//! limits, pings and pongs, the close handshake. What is ours is where its writes go.
//! Tungstenite writes each frame straight through into [`Wire`], a buffer in front of
//! the TCP stream that only the flush writes out, and an event is encoded once, as a
//! complete frame, when it reaches the gateway ([`text_frame`]): a connection appends
//! those bytes to the same buffer ([`Socket::push_frame`]). So the copy for each
//! subscriber is one `memcpy`, with no frame built, no reference count taken beyond the
//! delivery's own and no future polled per subscriber, and whatever is written, by
//! tungstenite or appended, leaves in the order it was written.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header, request},
    response::Response,
};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, handshake::derive_accept_key, protocol::Role},
};

pub use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The one version of the protocol there is (RFC 6455 §4.4).
const VERSION: &str = "13";

/// Capacity the send buffer keeps between flushes, at most: a batch of chat-sized
/// events. A larger batch (long events) grows it for that write only, so a socket that
/// once took a burst does not hold the burst's memory while it idles.
const KEPT_CAPACITY: usize = 16 * 1024;

/// Bytes the client may be owed before its socket is read again: a client that sends
/// without reading (pings, each answered with a pong it does not take) is read no
/// further until what it is owed has been written, so the send buffer stays bounded
/// and the flood backs up into the client's own TCP connection.
pub const MAX_OWED_BYTES: usize = 64 * 1024;

/// The first byte of an unfragmented text frame: FIN, opcode 1 (RFC 6455 §5.2).
const FIN_TEXT: u8 = 0x81;

/// `text` as one complete WebSocket frame from a server: final, opcode text, unmasked
/// (a server never masks, §5.1), the length in the shortest of its three forms.
pub fn text_frame(text: &str) -> Box<[u8]> {
    let payload = text.as_bytes();
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(FIN_TEXT);
    let len = payload.len();
    if let Ok(short) = u8::try_from(len)
        && short <= 125
    {
        frame.push(short);
    } else if let Ok(medium) = u16::try_from(len) {
        frame.push(126);
        frame.extend_from_slice(&medium.to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame.into_boxed_slice()
}

/// The payload of a frame made by [`text_frame`].
#[cfg(test)]
fn frame_text(frame: &[u8]) -> &str {
    let header = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame
        .get(header..)
        .and_then(|payload| std::str::from_utf8(payload).ok())
        .unwrap_or_default()
}

/// A stream whose writes gather in a buffer until it is flushed. Reads pass through.
#[derive(Debug)]
pub struct Wire<S> {
    io: S,
    out: Vec<u8>,
    /// How much of `out` the stream has taken, when a flush has to wait for it.
    written: usize,
}

impl<S> Wire<S> {
    pub const fn new(io: S) -> Self {
        Self {
            io,
            out: Vec::new(),
            written: 0,
        }
    }

    /// Bytes waiting for the next flush.
    pub fn buffered(&self) -> usize {
        self.out.len() - self.written
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    /// Taken whole, at once: written out by the flush.
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.written < this.out.len() {
            let taken = ready!(Pin::new(&mut this.io).poll_write(cx, &this.out[this.written..]))?;
            if taken == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.written += taken;
        }
        this.out.clear();
        this.out.shrink_to(KEPT_CAPACITY);
        this.written = 0;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An upgraded connection's WebSocket, server side.
#[derive(Debug)]
pub struct Socket<S = TokioIo<Upgraded>> {
    inner: WebSocketStream<Wire<S>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// Speaks the protocol on `io`, upgraded already. Tungstenite's own write buffer is
    /// set to nothing: each frame it writes goes straight into the [`Wire`], in order
    /// with the frames pushed there.
    pub async fn new(io: S, config: WebSocketConfig) -> Self {
        let config = config.write_buffer_size(0);
        Self {
            inner: WebSocketStream::from_raw_socket(Wire::new(io), Role::Server, Some(config))
                .await,
        }
    }

    /// The client's next message; `None` once the connection is closed. Cancel-safe.
    ///
    /// Once the client is owed [`MAX_OWED_BYTES`], that is written out first.
    pub async fn recv(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        if self.buffered() >= MAX_OWED_BYTES
            && let Err(error) = tokio::io::AsyncWriteExt::flush(self.inner.get_mut()).await
        {
            return Some(Err(error.into()));
        }
        self.inner.next().await
    }

    /// Hands a message to tungstenite, which frames it into the buffer. It goes out
    /// with the next flush.
    pub async fn feed(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.inner.feed(message).await
    }

    /// Appends a complete frame made by [`text_frame`] to the buffer. It goes out with
    /// the next flush, after everything written before it.
    pub fn push_frame(&mut self, frame: &[u8]) {
        self.inner.get_mut().out.extend_from_slice(frame);
    }

    /// Bytes waiting for the next flush.
    pub fn buffered(&self) -> usize {
        self.inner.get_ref().buffered()
    }

    /// Writes out everything buffered (and any pong or close tungstenite owes the
    /// client).
    ///
    /// Tungstenite's own flush flushes the stream too, except where it answers a
    /// client's Close: it writes the answer and reports the connection closed without
    /// flushing, as a server's last write to a plain socket needs none. (Its read does
    /// the same when read again after the client's Close; the connection stops reading
    /// at the Close and flushes.) Here that write is still in the buffer, so the buffer
    /// is flushed after it in every case.
    pub async fn flush(&mut self) -> Result<(), tungstenite::Error> {
        self.inner.flush().await?;
        tokio::io::AsyncWriteExt::flush(self.inner.get_mut()).await?;
        Ok(())
    }

    /// A message, written out at once.
    pub async fn send(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Ends the sending side (after everything buffered) and reads what the client
    /// still sends, discarding it, until the client ends its side too. For when
    /// tungstenite has stopped reading (after a frame too large, whose rest is never
    /// read): a socket dropped with bytes unread is answered by the kernel with a
    /// reset, and a reset destroys what the client has not read yet, the close frame
    /// included. The caller bounds the time it may take.
    pub async fn finish(&mut self) {
        let wire = self.inner.get_mut();
        if tokio::io::AsyncWriteExt::shutdown(wire).await.is_err() {
            return;
        }
        // On the heap: this future is part of every connection's, idle ones included.
        let mut discarded = vec![0; 4096];
        while let Ok(1..) = tokio::io::AsyncReadExt::read(wire, &mut discarded).await {}
    }
}

/// A request to upgrade to a WebSocket (RFC 6455 §4.2.1), checked: an HTTP/1.1 `GET`
/// with `Connection: Upgrade`, `Upgrade: websocket`, a `Sec-WebSocket-Key` and
/// `Sec-WebSocket-Version: 13`.
#[derive(Debug)]
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl<State: Send + Sync> FromRequestParts<State> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut request::Parts,
        _state: &State,
    ) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let asks_to_upgrade = parts.version == Version::HTTP_11
            && parts.method == Method::GET
            && has_token(headers, &header::CONNECTION, "upgrade")
            && has_token(headers, &header::UPGRADE, "websocket");
        let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        let (true, Some(key), Some(on_upgrade)) = (asks_to_upgrade, key, on_upgrade) else {
            return Err(crate::refuse(
                StatusCode::BAD_REQUEST,
                "not_a_websocket",
                "this is a WebSocket endpoint: an HTTP/1.1 GET with Connection: Upgrade, \
                 Upgrade: websocket, Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
            ));
        };
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|version| version != VERSION)
        {
            // §4.4: the versions the server speaks, in the refusal.
            let mut refused = crate::refuse(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported_websocket_version",
                "this gateway speaks WebSocket version 13 (RFC 6455) only",
            );
            refused.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static(VERSION),
            );
            return Err(refused);
        }
        Ok(Self { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 Switching Protocols, and once the connection has switched, serves
    /// it with `serve` on a task of its own. An upgrade that fails after the answer
    /// (the client went away) is logged at debug level and dropped.
    pub fn accept<F, Fut>(self, config: WebSocketConfig, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self { key, on_upgrade } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(Socket::new(TokioIo::new(upgraded), config).await).await,
                Err(error) => tracing::debug!(%error, "WebSocket upgrade failed"),
            }
        });
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::try_from(derive_accept_key(key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// Whether `name`'s comma-separated tokens include `token`, in any case (RFC 9110 §7.6.1
/// for `Connection`, §7.8 for `Upgrade`).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };

    use super::*;

    /// A server socket and its client, over a pipe of `capacity` bytes each way.
    async fn pair(
        capacity: usize,
    ) -> (
        Socket<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (server, client) = tokio::io::duplex(capacity);
        tokio::join!(
            Socket::new(server, WebSocketConfig::default()),
            WebSocketStream::from_raw_socket(client, Role::Client, None),
        )
    }

    /// Tungstenite's own encoding of the same text frame.
    fn tungstenite_frame(text: &str) -> Vec<u8> {
        let frame = Frame::message(text.to_owned(), OpCode::Data(Data::Text), true);
        let mut encoded = Vec::new();
        frame.format(&mut encoded).expect("into a Vec");
        encoded
    }

    #[test]
    fn a_text_frame_is_encoded_as_tungstenite_encodes_it_at_every_length_form() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            assert_eq!(text.len(), len);
            let frame = text_frame(&text);
            assert_eq!(*frame, *tungstenite_frame(&text), "length {len}");
            assert_eq!(frame_text(&frame), text, "length {len}");
        }
    }

    #[tokio::test]
    async fn pushed_frames_and_tungstenite_messages_leave_in_the_order_written() {
        // A 100-byte pipe: the flush goes out in many partial writes.
        let (mut server, mut client) = pair(100).await;
        let long = "é".repeat(40_000);
        server.feed(Message::text("first")).await.expect("fed");
        server.push_frame(&text_frame("second"));
        server.push_frame(&text_frame(&long));
        server.feed(Message::text("fourth")).await.expect("fed");
        server.push_frame(&text_frame("fifth"));
        let expected = ["first", "second", long.as_str(), "fourth", "fifth"];
        let waiting = server.buffered();
        assert!(
            waiting > long.len(),
            "nothing leaves before the flush: {waiting}"
        );

        let read = async {
            let mut got = Vec::new();
            while got.len() < expected.len() {
                match client.next().await {
                    Some(Ok(Message::Text(text))) => got.push(text.to_string()),
                    other => panic!("{other:?}"),
                }
            }
            got
        };
        let (flushed, got) = tokio::join!(server.flush(), read);
        flushed.expect("flushed");
        // Compared by length and start: the long one is 80 000 bytes.
        let brief = |texts: &[&str]| -> Vec<(usize, String)> {
            texts
                .iter()
                .map(|text| (text.len(), text.chars().take(6).collect()))
                .collect()
        };
        let got: Vec<&str> = got.iter().map(String::as_str).collect();
        assert_eq!(brief(&got), brief(&expected));
        assert_eq!(server.buffered(), 0);

        // And the buffer serves the next batch, with tungstenite's pong in it.
        client
            .send(Message::Ping("p".into()))
            .await
            .expect("pinged");
        assert!(matches!(server.recv().await, Some(Ok(Message::Ping(_)))));
        server.push_frame(&text_frame("sixth"));
        server.flush().await.expect("flushed");
        let mut after = Vec::new();
        for _ in 0..2 {
            after.push(client.next().await.expect("open").expect("read"));
        }
        assert!(after.contains(&Message::text("sixth")), "{after:?}");
        assert!(after.contains(&Message::Pong("p".into())), "{after:?}");
    }

    #[tokio::test]
    async fn a_client_that_pings_without_reading_is_read_no_further_once_owed_enough() {
        let (mut server, mut client) = pair(4096).await;
        // Pings as fast as the server reads them; the pongs are never read.
        tokio::spawn(async move {
            while client
                .send(Message::Ping(vec![7; 125].into()))
                .await
                .is_ok()
            {}
        });
        let mut pings = 0;
        while pings < 5_000 {
            match tokio::time::timeout(std::time::Duration::from_millis(500), server.recv()).await {
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Err(_) => break,
                other => panic!("{other:?}"),
            }
        }
        let owed = server.buffered();
        assert!(
            (MAX_OWED_BYTES..MAX_OWED_BYTES + 200).contains(&owed),
            "{pings} pings read, {owed} bytes of pongs owed"
        );
    }

    #[test]
    fn only_listed_tokens_count() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&headers, &header::CONNECTION, "upgrade"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("no-upgrades"));
        assert!(!has_token(&headers, &header::CONNECTION, "upgrade"));
        assert!(!has_token(&headers, &header::UPGRADE, "websocket"));
    }
}

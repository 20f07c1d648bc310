//! A mail server for tests that speaks real SMTP (RFC 5321) over TCP: `EHLO`,
//! `STARTTLS` (RFC 3207) or TLS from the first byte, `AUTH PLAIN` and `AUTH LOGIN`,
//! `MAIL`, `RCPT`, `DATA` with dot-stuffing, `RSET`, `NOOP`, `QUIT`. Its certificate is
//! signed by a CA of its own (`ca_file`), for `localhost`.
//!
//! Like a real submission server it takes no mail before TLS, and with credentials set
//! none before `AUTH`. It keeps what it accepted for the test to read
//! ([`FakeSmtp::wait_for_mail`]), and can answer the next `DATA`s with a temporary
//! failure (451) or refuse a recipient (550), for retries and permanent failures.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tokio_rustls::TlsAcceptor;

use crate::TestCa;

/// How the server secures a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain TCP, `STARTTLS` offered and required before `MAIL` (`smtp://`).
    StartTls,
    /// TLS from the first byte (`smtps://`).
    ImplicitTls,
    /// Plain TCP, no `STARTTLS` offered, mail taken in the clear: a relay no client of
    /// ours may use.
    Plain,
}

/// A mail the server accepted.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub from: String,
    pub to: Vec<String>,
    /// The message as sent, dot-stuffing removed, lines ending in CRLF.
    pub data: String,
    /// Whether it came over TLS.
    pub tls: bool,
    /// The user name it was authenticated as.
    pub user: Option<String>,
}

#[derive(Debug)]
struct Shared {
    security: Security,
    credentials: Option<(String, String)>,
    mails: Mutex<Vec<ReceivedMail>>,
    arrived: Notify,
    fail_next: AtomicUsize,
    refused: Mutex<HashSet<String>>,
    connections: AtomicUsize,
}

/// The server, until dropped.
#[derive(Debug)]
pub struct FakeSmtp {
    shared: Arc<Shared>,
    port: u16,
    ca: TestCa,
    server: tokio::task::JoinHandle<()>,
}

impl FakeSmtp {
    /// A server without authentication.
    pub async fn start(security: Security) -> Self {
        Self::start_with(security, None).await
    }

    /// A server that takes mail only from `user` with `password`.
    pub async fn with_credentials(security: Security, user: &str, password: &str) -> Self {
        Self::start_with(security, Some((user.to_owned(), password.to_owned()))).await
    }

    async fn start_with(security: Security, credentials: Option<(String, String)>) -> Self {
        let ca = TestCa::new();
        let cert = CertificateDer::from_pem_file(ca.cert_file()).expect("server certificate");
        let key = PrivateKeyDer::from_pem_file(ca.key_file()).expect("server key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("TLS certificate");
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake SMTP server");
        let port = listener.local_addr().expect("local address").port();
        let shared = Arc::new(Shared {
            security,
            credentials,
            mails: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            fail_next: AtomicUsize::new(0),
            refused: Mutex::new(HashSet::new()),
            connections: AtomicUsize::new(0),
        });
        let server = tokio::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(stream, acceptor.clone(), shared.clone()));
                }
            }
        });
        Self {
            shared,
            port,
            ca,
            server,
        }
    }

    /// `smtp://` or `smtps://` (with the credentials, if any) for `SMTP_URL`. The host
    /// is `localhost`, the name the certificate has.
    pub fn url(&self) -> String {
        let scheme = match self.shared.security {
            Security::ImplicitTls => "smtps",
            Security::StartTls | Security::Plain => "smtp",
        };
        let userinfo = match &self.shared.credentials {
            Some((user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        };
        format!("{scheme}://{userinfo}localhost:{}", self.port)
    }

    /// The CA that signed the server's certificate (`SMTP_CA_FILE`).
    pub fn ca_file(&self) -> PathBuf {
        self.ca.ca_file()
    }

    /// The worker's mail settings for this server.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        [
            ("SMTP_URL", self.url()),
            ("SMTP_CA_FILE", self.ca_file().display().to_string()),
            ("MAIL_FROM", "Chatty <no-reply@chatty.example>".to_owned()),
            ("APP_NAME", "Chatty".to_owned()),
            ("APP_LINK_BASE_URL", "https://chatty.example/app".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Answers the next `n` messages' `DATA` with 451 (try again later).
    pub fn fail_next(&self, n: usize) {
        self.shared.fail_next.store(n, Ordering::SeqCst);
    }

    /// Answers `RCPT TO` for `address` with 550 (no such mailbox).
    pub fn refuse(&self, address: &str) {
        self.shared
            .refused
            .lock()
            .expect("lock")
            .insert(address.to_owned());
    }

    /// Every mail accepted so far.
    pub fn mails(&self) -> Vec<ReceivedMail> {
        self.shared.mails.lock().expect("lock").clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The first mail accepted that `matches`, waiting up to `timeout`.
    pub async fn wait_for_mail(
        &self,
        timeout: Duration,
        matches: impl Fn(&ReceivedMail) -> bool,
    ) -> ReceivedMail {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            if let Some(mail) = self.mails().into_iter().find(&matches) {
                return mail;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("no such mail within {timeout:?}; got {:?}", self.mails());
            }
        }
    }
}

impl Drop for FakeSmtp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(stream: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    match shared.security {
        Security::ImplicitTls => {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            if greet(&mut tls).await.is_ok() {
                let _ = converse(tls, true, &shared).await;
            }
        }
        Security::StartTls | Security::Plain => {
            let mut plain = stream;
            if greet(&mut plain).await.is_err() {
                return;
            }
            if let Ok(Some(plain)) = converse(plain, false, &shared).await
                && let Ok(tls) = acceptor.accept(plain).await
            {
                let _ = converse(tls, true, &shared).await;
            }
        }
    }
}

async fn greet(stream: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
    stream
        .write_all(b"220 localhost ESMTP fake-smtp ready\r\n")
        .await
}

/// One SMTP conversation on `stream`. Returns the stream when the client asked for
/// `STARTTLS` (the caller wraps it in TLS and converses again), `None` at `QUIT`.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    tls: bool,
    shared: &Shared,
) -> std::io::Result<Option<S>> {
    let mut stream = BufReader::new(stream);
    let mut user: Option<String> = None;
    let mut from: Option<String> = None;
    let mut to: Vec<String> = Vec::new();
    let mut greeted = false;
    loop {
        let Some(line) = read_line(&mut stream).await? else {
            return Ok(None);
        };
        let upper = line.to_ascii_uppercase();
        let verb = upper.split(' ').next().unwrap_or_default();
        let reply: String = match verb {
            "EHLO" => {
                greeted = true;
                let mut lines = vec!["250-localhost greets you".to_owned()];
                if !tls && shared.security == Security::StartTls {
                    lines.push("250-STARTTLS".to_owned());
                }
                if tls || shared.security == Security::Plain {
                    lines.push("250-AUTH PLAIN LOGIN".to_owned());
                }
                lines.push("250-8BITMIME".to_owned());
                lines.push("250-SMTPUTF8".to_owned());
                lines.push("250 SIZE 10485760".to_owned());
                lines.join("\r\n")
            }
            "HELO" => {
                greeted = true;
                "250 localhost".to_owned()
            }
            "STARTTLS" if tls || shared.security != Security::StartTls => {
                "454 TLS not available".to_owned()
            }
            "STARTTLS" => {
                reply(&mut stream, "220 ready to start TLS").await?;
                return Ok(Some(stream.into_inner()));
            }
            "AUTH" => match authenticate(&mut stream, &line, shared).await? {
                Some(name) => {
                    user = Some(name);
                    "235 2.7.0 authentication succeeded".to_owned()
                }
                None => "535 5.7.8 authentication credentials invalid".to_owned(),
            },
            "MAIL" if !greeted => "503 5.5.1 EHLO first".to_owned(),
            "MAIL" if !tls && shared.security != Security::Plain => {
                "530 5.7.0 must issue a STARTTLS command first".to_owned()
            }
            "MAIL" if shared.credentials.is_some() && user.is_none() => {
                "530 5.7.0 authentication required".to_owned()
            }
            "MAIL" => {
                from = Some(address(&line));
                to.clear();
                "250 2.1.0 sender ok".to_owned()
            }
            "RCPT" if from.is_none() => "503 5.5.1 MAIL first".to_owned(),
            "RCPT" => {
                let address = address(&line);
                if shared.refused.lock().expect("lock").contains(&address) {
                    "550 5.1.1 no such mailbox".to_owned()
                } else {
                    to.push(address);
                    "250 2.1.5 recipient ok".to_owned()
                }
            }
            "DATA" if to.is_empty() => "503 5.5.1 RCPT first".to_owned(),
            "DATA" => {
                reply(&mut stream, "354 end data with <CR><LF>.<CR><LF>").await?;
                let data = read_data(&mut stream).await?;
                let failing = shared
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if failing {
                    "451 4.3.0 try again later".to_owned()
                } else {
                    shared.mails.lock().expect("lock").push(ReceivedMail {
                        from: from.take().unwrap_or_default(),
                        to: std::mem::take(&mut to),
                        data,
                        tls,
                        user: user.clone(),
                    });
                    shared.arrived.notify_waiters();
                    "250 2.0.0 queued".to_owned()
                }
            }
            "RSET" => {
                from = None;
                to.clear();
                "250 2.0.0 ok".to_owned()
            }
            "NOOP" => "250 2.0.0 ok".to_owned(),
            "QUIT" => {
                reply(&mut stream, "221 2.0.0 bye").await?;
                return Ok(None);
            }
            _ => "500 5.5.2 command not recognized".to_owned(),
        };
        self::reply(&mut stream, &reply).await?;
    }
}

async fn reply(stream: &mut (impl AsyncWrite + Unpin), text: &str) -> std::io::Result<()> {
    stream.write_all(text.as_bytes()).await?;
    stream.write_all(b"\r\n").await?;
    stream.flush().await
}

/// One line without its CRLF; `None` at the end of the stream.
async fn read_line(
    stream: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

/// The message after `DATA`, up to the line holding only `.`, unstuffed.
async fn read_data(stream: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> std::io::Result<String> {
    let mut data = String::new();
    loop {
        let Some(line) = read_line(stream).await? else {
            return Ok(data);
        };
        if line == "." {
            return Ok(data);
        }
        data.push_str(line.strip_prefix('.').unwrap_or(&line));
        data.push_str("\r\n");
    }
}

/// The address in `MAIL FROM:<a>` or `RCPT TO:<a>`.
fn address(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(address, _)| address.to_owned())
        .unwrap_or_default()
}

/// `AUTH PLAIN [initial]` or `AUTH LOGIN`: the user name if the credentials match.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    line: &str,
    shared: &Shared,
) -> std::io::Result<Option<String>> {
    let decode = |text: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let mechanism = words.get(1).map(|m| m.to_ascii_uppercase());
    let (user, password) = match mechanism.as_deref() {
        Some("PLAIN") => {
            let initial = match words.get(2) {
                Some(initial) => (*initial).to_owned(),
                None => {
                    reply(stream, "334 ").await?;
                    read_line(stream).await?.unwrap_or_default()
                }
            };
            let Some(decoded) = decode(&initial) else {
                return Ok(None);
            };
            let mut parts = decoded.split('\0').skip(1);
            match (parts.next(), parts.next()) {
                (Some(user), Some(password)) => (user.to_owned(), password.to_owned()),
                _ => return Ok(None),
            }
        }
        Some("LOGIN") => {
            reply(stream, "334 VXNlcm5hbWU6").await?;
            let user = decode(&read_line(stream).await?.unwrap_or_default());
            reply(stream, "334 UGFzc3dvcmQ6").await?;
            let password = decode(&read_line(stream).await?.unwrap_or_default());
            match (user, password) {
                (Some(user), Some(password)) => (user, password),
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    let matches = shared
        .credentials
        .as_ref()
        .is_none_or(|(u, p)| *u == user && *p == password);
    Ok(matches.then_some(user))
}

impl ReceivedMail {
    /// A header's value, unfolded, with RFC 2047 encoded words decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        let (head, _) = self.data.split_once("\r\n\r\n")?;
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        unfolded.split("\r\n").find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| decode_words(value.trim()))
        })
    }

    pub fn subject(&self) -> String {
        self.header("Subject").unwrap_or_default()
    }

    /// The body, its transfer encoding (7bit, 8bit, quoted-printable, base64) undone.
    pub fn body(&self) -> String {
        let (_, body) = self.data.split_once("\r\n\r\n").unwrap_or_default();
        let encoding = self
            .header("Content-Transfer-Encoding")
            .unwrap_or_default()
            .to_ascii_lowercase();
        match encoding.as_str() {
            "quoted-printable" => quoted_printable(body),
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(body.replace("\r\n", ""))
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .unwrap_or_default(),
            _ => body.to_owned(),
        }
        .replace("\r\n", "\n")
    }

    /// The `token` of the first link in the body whose path ends with `path`
    /// (`/verify-email`; the token in the fragment, `#token=`), and the link.
    pub fn link(&self, path: &str) -> Option<(String, String)> {
        self.body().split_whitespace().find_map(|word| {
            let (before, token) = word.split_once("#token=")?;
            before
                .ends_with(path)
                .then(|| (word.to_owned(), token.to_owned()))
        })
    }
}

/// Quoted-printable (RFC 2045): `=XX` is a byte, `=` at a line's end joins it to the next.
fn quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && let Some(hex) = joined.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 2047 encoded words (`=?utf-8?b?…?=`, `=?utf-8?q?…?=`) decoded; the rest as is.
fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    let mut after_word = false;
    while let Some(start) = rest.find("=?") {
        let Some((text, encoding, len)) = encoded_word(&rest[start + 2..]) else {
            break;
        };
        let between = &rest[..start];
        // Whitespace between two encoded words is not part of the text.
        if !(after_word && between.trim().is_empty()) {
            out.push_str(between);
        }
        let decoded = match encoding.to_ascii_lowercase().as_str() {
            "b" => base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok()),
            "q" => Some(quoted_printable(&text.replace('_', " "))),
            _ => None,
        };
        out.push_str(&decoded.unwrap_or_else(|| text.to_owned()));
        after_word = true;
        rest = &rest[start + 2 + len..];
    }
    out.push_str(rest);
    out
}

/// `charset?encoding?text?=` (after the `=?`): the text, the encoding, and the length
/// up to and with the closing `?=`.
fn encoded_word(word: &str) -> Option<(&str, &str, usize)> {
    let (charset, rest) = word.split_once('?')?;
    let (encoding, rest) = rest.split_once('?')?;
    let end = rest.find("?=")?;
    Some((
        &rest[..end],
        encoding,
        charset.len() + encoding.len() + 2 + end + 2,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn transfer_encodings_and_encoded_words_decode() {
        assert_eq!(quoted_printable("Gr=C3=BC=\r\nße a=3Db"), "Grüße a=b");
        assert_eq!(
            decode_words("=?utf-8?b?R3LDvMOfZQ==?= =?utf-8?q?_d=C3=A4?="),
            "Grüße dä"
        );
        assert_eq!(decode_words("Re: =?utf-8?q?a?= b"), "Re: a b");
        assert_eq!(decode_words("plain text"), "plain text");
    }
}

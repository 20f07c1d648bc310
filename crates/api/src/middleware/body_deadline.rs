//! Deadlines for reading a request's body, whoever reads it.
//!
//! The server bounds the head and idle time of a connection; once a request is in
//! flight, its body is read by whatever needs it (the idempotency layer, a JSON
//! extractor, the upload handler), and a client that sends a few bytes and then nothing
//! would hold the request, its connection and its task forever. Here the body is
//! wrapped so that a read past its deadline fails; the reader then answers as it does
//! for any unreadable body, and this layer replaces that answer with a 408 and closes
//! the connection (what is left of the body is never read):
//!
//! - an ordinary body must be whole within `REQUEST_BODY_TIMEOUT_SECONDS` of the
//!   request's start (408 `body_timeout`);
//! - an upload (`POST /v1/media`), which a phone may send for minutes over a weak
//!   link, must keep moving instead: at least `UPLOAD_MIN_BYTES_PER_SECOND` over every
//!   `UPLOAD_RATE_WINDOW_SECONDS` (408 `upload_too_slow`), and be whole within
//!   `UPLOAD_TIMEOUT_SECONDS` (408 `upload_timeout`). Nothing of a cut upload is
//!   stored: the handler sees the read fail and abandons what it began.
//!
//! Bodiless requests (`GET /v1/me`) pass through untouched.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes, HttpBody},
    extract::{Request, State},
    http::{HeaderValue, Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::{
    error::{ApiError, ErrorCode},
    routes::media::UPLOAD_PATH,
    state::AppState,
};

pub async fn body_deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let settings = &state.settings;
    let upload = req.method() == Method::POST && req.uri().path() == UPLOAD_PATH;
    let (limit, pace) = if upload {
        let pacing = settings.upload;
        let required = pacing
            .min_bytes_per_second
            .saturating_mul(pacing.window.as_secs());
        (pacing.timeout, Some(Pace::new(required, pacing.window)))
    } else {
        (settings.request_body_timeout, None)
    };
    let fired = Arc::new(AtomicU8::new(Fired::NOT));
    let req = req.map(|body| {
        Body::new(Deadline {
            inner: body,
            timer: Box::pin(tokio::time::sleep_until(Instant::now() + limit)),
            pace,
            fired: fired.clone(),
        })
    });
    let response = next.run(req).await;
    let error = match fired.load(Ordering::Acquire) {
        Fired::DEADLINE if upload => ApiError::new(ErrorCode::UploadTimeout).detail(format!(
            "the upload did not complete within {} s",
            limit.as_secs()
        )),
        Fired::DEADLINE => ApiError::new(ErrorCode::BodyTimeout).detail(format!(
            "the request body did not arrive within {} s",
            limit.as_secs()
        )),
        Fired::TOO_SLOW => ApiError::new(ErrorCode::UploadTooSlow).detail(format!(
            "the upload brought less than {} bytes a second over {} s; retry on a better connection",
            settings.upload.min_bytes_per_second,
            settings.upload.window.as_secs()
        )),
        _ => return response,
    };
    tracing::info!(
        upload,
        code = error.code().as_str(),
        "a request body was cut"
    );
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Which deadline a body missed.
struct Fired;

impl Fired {
    const NOT: u8 = 0;
    const DEADLINE: u8 = 1;
    const TOO_SLOW: u8 = 2;
}

/// An upload's rate rule: at least `required` bytes in every `window`.
struct Pace {
    required: u64,
    window: Duration,
    received: u64,
    window_end: Pin<Box<Sleep>>,
}

impl Pace {
    fn new(required: u64, window: Duration) -> Self {
        Self {
            required,
            window,
            received: 0,
            window_end: Box::pin(tokio::time::sleep_until(Instant::now() + window)),
        }
    }

    /// At a window's end: `false` if it brought too little, else the next one begins.
    fn roll(&mut self) -> bool {
        if self.received < self.required {
            return false;
        }
        self.received = 0;
        let next = Instant::now() + self.window;
        self.window_end.as_mut().reset(next);
        true
    }
}

/// The body that stops at its deadline, or when an upload's pace drops too low.
struct Deadline {
    inner: Body,
    timer: Pin<Box<Sleep>>,
    pace: Option<Pace>,
    fired: Arc<AtomicU8>,
}

impl Deadline {
    fn fail(&self, why: u8) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.fired.store(why, Ordering::Release);
        Poll::Ready(Some(Err(axum::Error::new(TimedOut))))
    }
}

/// What a read past the deadline fails with.
#[derive(Debug)]
struct TimedOut;

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for TimedOut {}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if let (Some(Ok(frame)), Some(pace)) = (&frame, &mut self.pace) {
                let bytes = frame.data_ref().map_or(0, Bytes::len);
                pace.received = pace.received.saturating_add(bytes as u64);
                if pace.window_end.is_elapsed() && !pace.roll() {
                    return self.fail(Fired::TOO_SLOW);
                }
            }
            return Poll::Ready(frame);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            return self.fail(Fired::DEADLINE);
        }
        if let Some(pace) = &mut self.pace {
            // Each window that ends while waiting is judged; a full one starts the
            // next, whose timer is polled in turn (and so armed).
            while pace.window_end.as_mut().poll(cx).is_ready() {
                if !pace.roll() {
                    return self.fail(Fired::TOO_SLOW);
                }
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! A deadline for reading a request's body, whoever reads it.
//!
//! The server bounds the head and idle time of a connection; once a request is in
//! flight, its body is read by whatever needs it (the idempotency layer, a JSON
//! extractor), and a client that sends a few bytes and then nothing would hold the
//! request, its connection and its task forever. Here the body is wrapped so that any
//! read past `REQUEST_BODY_TIMEOUT_SECONDS` from the request's start fails; the reader
//! then answers as it does for any unreadable body, and this layer replaces that
//! answer with 408 `body_timeout` and closes the connection (what is left of the body
//! is never read).
//!
//! Uploads are left to their own rule (they are long by nature; `routes::media`).
//! Bodiless requests (`GET /v1/me`) pass through untouched.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use axum::{
    body::{Body, Bytes, HttpBody},
    extract::{Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::{
    error::{ApiError, ErrorCode},
    state::AppState,
};

pub async fn body_deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() || req.uri().path() == crate::routes::media::UPLOAD_PATH {
        return next.run(req).await;
    }
    let limit = state.settings.request_body_timeout;
    let fired = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(Deadline {
            inner: body,
            timer: Box::pin(tokio::time::sleep_until(Instant::now() + limit)),
            fired: fired.clone(),
        })
    });
    let response = next.run(req).await;
    if !fired.load(Ordering::Acquire) {
        return response;
    }
    tracing::info!(?limit, "the request body did not arrive in time");
    let mut response = ApiError::new(ErrorCode::BodyTimeout)
        .detail(format!(
            "the request body did not arrive within {} s",
            limit.as_secs()
        ))
        .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The body that stops at the deadline.
struct Deadline {
    inner: Body,
    timer: Pin<Box<Sleep>>,
    fired: Arc<AtomicBool>,
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
            return Poll::Ready(frame);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.fired.store(true, Ordering::Release);
                Poll::Ready(Some(Err(axum::Error::new(TimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! `/v1/media`: uploads, the checks made before anything is stored, and the variants
//! after the worker (run in-process here, on the same database and storage) made them.

use std::time::Duration;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use mobile_runtime::{Env, Shutdown};
use reqwest::{Method, StatusCode, multipart};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::{
    conversations::{create, next_frame, subscribe},
    helpers::{Session, TestApp, assert_problem},
};

pub(crate) fn image_bytes(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(image)
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

pub(crate) async fn upload(
    app: &TestApp,
    session: &Session,
    content_type: &str,
    bytes: Vec<u8>,
) -> reqwest::Response {
    app.authed(Method::POST, "/v1/media", session)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// The queued jobs, but the verification mails every registration enqueues.
async fn jobs(app: &TestApp) -> Vec<(String, Value)> {
    let pool = app.db.pool().await;
    sqlx::query_as("SELECT kind, payload FROM jobs WHERE kind <> 'mail.send' ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap()
}

async fn get(app: &TestApp, session: &Session, path: &str) -> reqwest::Response {
    app.authed(Method::GET, path, session).send().await.unwrap()
}

pub(crate) async fn post_with_media(
    app: &TestApp,
    session: &Session,
    conversation: &Value,
    client_msg_id: &str,
    body: &str,
    media_id: &str,
) -> reqwest::Response {
    let path = format!(
        "/v1/conversations/{}/messages",
        conversation["id"].as_str().unwrap()
    );
    app.authed(Method::POST, &path, session)
        .json(&json!({ "client_msg_id": client_msg_id, "body": body, "media_id": media_id }))
        .send()
        .await
        .unwrap()
}

/// Files under the app's storage directory.
pub(crate) fn stored_files(app: &TestApp) -> usize {
    fn count(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }
    count(&app.storage_dir)
}

#[tokio::test]
async fn an_upload_is_stored_and_queued_for_processing() {
    let app = TestApp::spawn().await;
    let ada = app.register("ada@example.com").await;
    let response = upload(
        &app,
        &ada,
        "image/jpeg",
        image_bytes(640, 480, ImageFormat::Jpeg),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let media: Value = response.json().await.unwrap();
    assert_eq!(media["status"], "processing");
    assert_eq!(media["variants"], json!({}));
    let id = media["id"].as_str().unwrap();

    assert_eq!(
        app.get_json(&format!("/v1/media/{id}"), &ada).await["status"],
        "processing"
    );
    assert_eq!(
        jobs(&app).await,
        vec![("media.process".to_owned(), json!({ "media_id": id }))]
    );
    assert_eq!(stored_files(&app), 1);

    // Multipart, with the image in `file` after another part.
    let form = multipart::Form::new().text("caption", "hi").part(
        "file",
        multipart::Part::bytes(image_bytes(64, 64, ImageFormat::Png))
            .file_name("a.png")
            .mime_str("image/png")
            .unwrap(),
    );
    let response = app
        .authed(Method::POST, "/v1/media", &ada)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(jobs(&app).await.len(), 2);

    // Someone else cannot see it.
    let bob = app.register("bob@example.com").await;
    let response = get(&app, &bob, &format!("/v1/media/{id}")).await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn bad_uploads_are_refused_before_anything_is_stored() {
    let app = TestApp::builder()
        .env("MEDIA_MAX_BYTES", "200000")
        .spawn()
        .await;
    let ada = app.register("ada@example.com").await;
    let png = image_bytes(64, 64, ImageFormat::Png);

    let cases = [
        (
            "image/jpeg",
            png.clone(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type_mismatch",
        ),
        (
            "text/plain",
            b"hello".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "image/gif",
            b"GIF89a".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "image/png",
            Vec::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_upload",
        ),
        (
            "image/png",
            b"definitely not a png".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "image/png",
            vec![7; 300_000],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        // A header claiming 20,000 × 20,000 pixels: refused from its first bytes.
        (
            "image/png",
            png_header(20_000, 20_000),
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_too_large",
        ),
    ];
    for (content_type, bytes, status, code) in cases {
        let response = upload(&app, &ada, content_type, bytes).await;
        assert_problem(response, status, code).await;
    }

    // Too large without a Content-Length (chunked): cut off mid-stream, nothing kept.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = std::iter::once(Ok(png.clone()))
        .chain((0..10).map(|_| Ok(vec![0; 50_000])))
        .collect();
    let response = app
        .authed(Method::POST, "/v1/media", &ada)
        .header("content-type", "image/png")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let form = multipart::Form::new().text("caption", "no file here");
    let response = app
        .authed(Method::POST, "/v1/media", &ada)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "missing_file").await;

    assert!(jobs(&app).await.is_empty());
    assert_eq!(stored_files(&app), 0, "nothing stored");
}

/// A PNG signature, an IHDR chunk claiming a size, and the start of its data: what a
/// decompression bomb looks like from the front.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0d".to_vec();
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
    png.extend_from_slice(b"\x00\x00\x00\x08IDAT\x78\xda\xed\xc1\x01\x01\x00\x00\x00\x00\x00\x00");
    png
}

/// Runs the worker in-process on the app's database and storage until dropped.
pub(crate) struct Worker {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// `http://…/metrics` of the worker.
    pub(crate) metrics: String,
}

impl Worker {
    pub(crate) async fn start(app: &TestApp, storage: &[(String, String)]) -> Self {
        let mut vars: Vec<(String, String)> = vec![
            ("APP_ENV".into(), "test".into()),
            ("REDIS_URL".into(), mobile_testkit::redis_url()),
            ("REDIS_KEY_PREFIX".into(), app.redis_prefix.clone()),
            (
                "STORAGE_URL".into(),
                format!("file://{}", app.storage_dir.display()),
            ),
            ("JOB_POLL_INTERVAL_SECONDS".into(), "1".into()),
        ];
        vars.extend(app.db.service_env());
        vars.extend(storage.iter().cloned());
        let env = Env::from_pairs(vars).with_secret_files().unwrap();
        let settings = mobile_worker::WorkerSettings::from_env(&env).unwrap();
        let shutdown = Shutdown::new();
        let listeners = mobile_runtime::service::Listeners {
            public: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            metrics: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let metrics = format!("http://{}/metrics", listeners.metrics.local_addr().unwrap());
        let task = tokio::spawn(mobile_worker::serve(settings, listeners, shutdown.clone()));
        Self {
            shutdown,
            task,
            metrics,
        }
    }

    pub(crate) async fn metrics_text(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub(crate) async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap().unwrap();
    }
}

pub(crate) async fn wait_until_ready(app: &TestApp, session: &Session, id: &str) -> Value {
    for _ in 0..200 {
        let media = app.get_json(&format!("/v1/media/{id}"), session).await;
        if media["status"] != "processing" {
            return media;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("media {id} still processing after 20 s");
}

#[tokio::test]
async fn the_worker_makes_variants_that_members_can_fetch_and_cache() {
    let app = TestApp::spawn().await;
    let worker = Worker::start(&app, &[]).await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let mut events = subscribe(&app, &format!("user:{}", ada.user_id)).await;

    let response = upload(
        &app,
        &ada,
        "image/jpeg",
        image_bytes(3000, 2000, ImageFormat::Jpeg),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let frame = next_frame(&mut events).await;
    assert_eq!(frame["event"], "media.ready");
    assert_eq!(frame["data"]["id"], id.as_str());
    let media = wait_until_ready(&app, &ada, &id).await;
    assert_eq!(media["status"], "ready");
    assert_eq!(
        media["variants"]["thumb"],
        json!({ "url": format!("/v1/media/{id}/thumb"), "width": 256, "height": 171, "content_type": "image/jpeg" })
    );
    assert_eq!(media["variants"]["large"]["width"], 2048);

    let response = get(&app, &ada, &format!("/v1/media/{id}/medium")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    assert_eq!(
        response.headers()["cache-control"],
        "private, max-age=31536000, immutable"
    );
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let bytes = response.bytes().await.unwrap();
    let medium = image::load_from_memory(&bytes).unwrap();
    assert_eq!((medium.width(), medium.height()), (1024, 683));

    let response = app
        .authed(Method::GET, &format!("/v1/media/{id}/medium"), &ada)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    let response = get(&app, &ada, &format!("/v1/media/{id}/huge")).await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;

    // Bob sees it once Ada posts it to a conversation they share.
    let response = get(&app, &bob, &format!("/v1/media/{id}/thumb")).await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let conversation = create(&app, &ada, &[bob.user_id.as_str()]).await;
    let response = post_with_media(&app, &ada, &conversation, "m1", "look", &id).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.json::<Value>().await.unwrap()["media_id"],
        id.as_str()
    );
    let response = get(&app, &bob, &format!("/v1/media/{id}/thumb")).await;
    assert_eq!(response.status(), StatusCode::OK);

    // Bob cannot attach Ada's media to a message of his own.
    let response = post_with_media(&app, &bob, &conversation, "m2", "mine now", &id).await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "unknown_media").await;
    worker.stop().await;
}

#[tokio::test]
async fn a_corrupt_image_ends_failed_with_a_reason() {
    let app = TestApp::spawn().await;
    let worker = Worker::start(&app, &[]).await;
    let ada = app.register("ada@example.com").await;
    let mut events = subscribe(&app, &format!("user:{}", ada.user_id)).await;
    let mut truncated = image_bytes(800, 600, ImageFormat::Jpeg);
    truncated.truncate(truncated.len() / 2);
    let response = upload(&app, &ada, "image/jpeg", truncated).await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    assert_eq!(next_frame(&mut events).await["event"], "media.failed");
    let media = wait_until_ready(&app, &ada, &id).await;
    assert_eq!(media["status"], "failed");
    assert!(
        media["failure_reason"]
            .as_str()
            .unwrap()
            .contains("truncated"),
        "{media}"
    );
    let response = get(&app, &ada, &format!("/v1/media/{id}/thumb")).await;
    assert_problem(response, StatusCode::CONFLICT, "not_ready").await;
    // The job ends just after the media row it settled (and the event): it is gone
    // within moments, where a retry would keep it queued for its backoff.
    let mut left = jobs(&app).await;
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = jobs(&app).await;
    }
    assert!(left.is_empty(), "failed for good, not retried: {left:?}");
    worker.stop().await;
}

#[tokio::test]
async fn uploads_and_variants_work_on_s3() {
    let s3 = mobile_testkit::S3Server::start().await;
    let mut builder = TestApp::builder().env("STORAGE_URL", &s3.bucket_url());
    for (name, value) in s3.env() {
        builder = builder.env(&name, &value);
    }
    let app = builder.spawn().await;
    let mut storage = s3.env();
    storage.push(("STORAGE_URL".into(), s3.bucket_url()));
    let worker = Worker::start(&app, &storage).await;
    let ada = app.register("ada@example.com").await;

    let response = upload(
        &app,
        &ada,
        "image/png",
        image_bytes(1200, 900, ImageFormat::Png),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let media = wait_until_ready(&app, &ada, &id).await;
    assert_eq!(media["status"], "ready", "{media}");
    let response = get(&app, &ada, &format!("/v1/media/{id}/thumb")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let thumb = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (256, 192));
    worker.stop().await;
}

/// A PNG of noise (it does not compress): about `side` × `side` × 3 bytes.
fn noise_png(side: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let image = RgbImage::from_fn(side, side, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let [r, g, b, ..] = state.to_le_bytes();
        Rgb([r, g, b])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(image)
        .write_to(&mut out, ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[tokio::test]
async fn a_phone_upload_at_128_kib_a_second_takes_32_s_and_succeeds() {
    // The defaults: REQUEST_TIMEOUT_SECONDS 15 would have cut it at 15 s.
    let app = TestApp::spawn().await;
    let ada = app.register("ada@example.com").await;
    let png = noise_png(1190);
    assert!(png.len() >= 4 << 20, "{}", png.len());
    // 16 KiB every 125 ms: 128 KiB/s, as a phone on a weak link sends.
    let chunks: Vec<Vec<u8>> = png.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
    let paced = futures_util::stream::unfold(chunks.into_iter(), |mut chunks| async move {
        let chunk = chunks.next()?;
        tokio::time::sleep(Duration::from_millis(125)).await;
        Some((Ok::<_, std::io::Error>(chunk), chunks))
    });
    let started = std::time::Instant::now();
    // A client of its own: the test client gives up after 30 s.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", app.base))
        .bearer_auth(&ada.access_token)
        .header("content-type", "image/png")
        .header("content-length", png.len().to_string())
        .body(reqwest::Body::wrap_stream(paced))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(took > Duration::from_secs(30), "{took:?}");
    assert_eq!(jobs(&app).await.len(), 1);
}

#[tokio::test]
async fn a_stalled_upload_is_cut_with_a_clear_error_and_nothing_is_stored() {
    let app = TestApp::builder()
        .env("UPLOAD_RATE_WINDOW_SECONDS", "2")
        .env("UPLOAD_MIN_BYTES_PER_SECOND", "8192")
        .spawn()
        .await;
    let ada = app.register("ada@example.com").await;
    let png = noise_png(400);
    // The head and more (storing has begun), then nothing: a phone that lost its link.
    let sent = 200 * 1024;
    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/media HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: image/png\r\ncontent-length: {}\r\n\r\n",
        ada.access_token,
        png.len()
    );
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&png[..sent]).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed within 10 s")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"upload_too_slow""#), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // Cut at the end of the first window that brought too little: 2 to 4 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(jobs(&app).await.is_empty());
    assert_eq!(stored_files(&app), 0, "nothing stored");
}

//! Object storage for media, behind one small interface.
//!
//! `STORAGE_URL` picks the backend: `file:///var/lib/mobile/media` (the default, a local
//! directory or a mounted volume), `s3://bucket`, `gs://bucket`, `az://container`, with an
//! optional key prefix after the bucket (`s3://bucket/media`). Credentials and
//! endpoints come from each provider's standard environment (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`), as their SDKs read them, so workload identity on EKS, GKE and AKS works
//! without a secret in the pod. `AWS_ENDPOINT_URL` (with `AWS_ALLOW_HTTP=true` for
//! plain HTTP) points the S3 backend at MinIO or SeaweedFS.
//!
//! Keys are the application's: [`original_key`] for uploads, [`variant_key`] for the
//! worker's renditions.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use object_store::{
    ObjectStore, ObjectStoreExt as _, PutPayload, buffered::BufWriter, local::LocalFileSystem,
    path::Path,
};
use tokio::io::AsyncWriteExt as _;

pub use object_store::Error as BackendError;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("STORAGE_URL: {0}")]
    Url(String),
    #[error("no such object: {0}")]
    NotFound(String),
    #[error("object storage: {0}")]
    Backend(#[from] object_store::Error),
    #[error("object storage: {0}")]
    Io(#[from] std::io::Error),
}

/// Where an upload's original lives.
pub fn original_key(media_id: impl std::fmt::Display) -> String {
    format!("originals/{media_id}")
}

/// Where a variant (`thumb`, `medium`, `large`) of a media lives.
pub fn variant_key(media_id: impl std::fmt::Display, variant: &str) -> String {
    format!("variants/{media_id}/{variant}")
}

/// A bucket (or directory), cheap to clone.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

impl Storage {
    /// Opens the store `url` names. `options` are the provider's settings in
    /// `object_store`'s names (`aws_endpoint`, `aws_allow_http`, `google_service_account`,
    /// ...); [`provider_options`] collects them from an environment.
    pub fn open<K, V>(
        url: &str,
        options: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, StorageError>
    where
        K: AsRef<str>,
        V: Into<String>,
    {
        let parsed = url::Url::parse(url).map_err(|e| StorageError::Url(format!("{url}: {e}")))?;
        if parsed.scheme() == "file" {
            let dir = PathBuf::from(parsed.path());
            std::fs::create_dir_all(&dir)
                .map_err(|e| StorageError::Url(format!("cannot create {}: {e}", dir.display())))?;
            let store = LocalFileSystem::new_with_prefix(&dir)?.with_automatic_cleanup(true);
            return Ok(Self {
                store: Arc::new(store),
                prefix: Path::default(),
                url: url.to_owned(),
            });
        }
        let (store, prefix) = object_store::parse_url_opts(&parsed, options).map_err(|e| {
            StorageError::Url(format!("{url}: {e} (use file://, s3://, gs:// or az://)"))
        })?;
        Ok(Self {
            store: Arc::from(store),
            prefix,
            url: url.to_owned(),
        })
    }

    /// The URL it was opened with, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// Stores a small object in one request.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    /// Streams `chunks` into `key` without holding the whole object in memory (a
    /// multipart upload on cloud stores, once past a few MiB). Returns the size. An
    /// error from the stream aborts the upload and leaves no object behind.
    pub async fn put_stream<E>(
        &self,
        key: &str,
        chunks: impl Stream<Item = Result<Bytes, E>>,
    ) -> Result<u64, PutStreamError<E>> {
        let mut writer = BufWriter::new(self.store.clone(), self.path(key));
        let mut chunks = std::pin::pin!(chunks);
        let mut size = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    let _ = writer.abort().await;
                    return Err(PutStreamError::Source(error));
                }
            };
            size += chunk.len() as u64;
            if let Err(error) = writer.put(chunk).await {
                let _ = writer.abort().await;
                return Err(PutStreamError::Storage(error.into()));
            }
        }
        writer
            .shutdown()
            .await
            .map_err(|e| PutStreamError::Storage(e.into()))?;
        Ok(size)
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        match self.store.get(&self.path(key)).await {
            Ok(result) => Ok(result.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams an object, for serving it.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, StorageError>> + Send + 'static, StorageError>
    {
        match self.store.get(&self.path(key)).await {
            Ok(result) => Ok(result.into_stream().map_err(StorageError::from)),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Why [`Storage::put_stream`] failed: the source stream, or the store.
#[derive(Debug, thiserror::Error)]
pub enum PutStreamError<E> {
    #[error("reading the upload failed")]
    Source(E),
    #[error(transparent)]
    Storage(StorageError),
}

/// The object-store options in an environment: every `AWS_*`, `GOOGLE_*` and `AZURE_*`
/// variable, lower-cased (`AWS_ENDPOINT_URL` → `aws_endpoint_url`), as `object_store`'s
/// `from_env` builders read them.
pub fn provider_options<'a>(
    vars: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    vars.into_iter()
        .filter(|(name, _)| {
            ["AWS_", "GOOGLE_", "AZURE_"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn round_trip(storage: &Storage) {
        let key = original_key("round-trip");
        storage
            .put(&key, Bytes::from_static(b"small"))
            .await
            .unwrap();
        assert_eq!(
            storage.get(&key).await.unwrap(),
            Bytes::from_static(b"small")
        );

        // Larger than one multipart part (5 MiB), in uneven chunks.
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..70u8)
            .map(|n| Ok(Bytes::from(vec![n; 100_003])))
            .collect();
        let size = storage
            .put_stream(&key, futures_util::stream::iter(chunks))
            .await
            .unwrap();
        assert_eq!(size, 70 * 100_003);
        let read = storage.get(&key).await.unwrap();
        assert_eq!(read.len() as u64, size);
        assert_eq!(read[100_003 * 69], 69);

        let failing = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"partial")),
            Err(std::io::Error::other("client went away")),
        ]);
        let aborted = variant_key("round-trip", "thumb");
        assert!(matches!(
            storage.put_stream(&aborted, failing).await,
            Err(PutStreamError::Source(_))
        ));
        assert!(matches!(
            storage.get(&aborted).await,
            Err(StorageError::NotFound(_))
        ));

        storage.delete(&key).await.unwrap();
        storage.delete(&key).await.unwrap();
        assert!(matches!(
            storage.get(&key).await,
            Err(StorageError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn the_local_directory_backend_round_trips() {
        let dir = std::env::temp_dir().join(format!("mobile-storage-{}", std::process::id()));
        let storage =
            Storage::open(&format!("file://{}", dir.display()), provider_options([])).unwrap();
        round_trip(&storage).await;
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn the_s3_backend_round_trips_against_a_real_s3_server() {
        let s3 = mobile_testkit::S3Server::start().await;
        let storage = Storage::open(&s3.bucket_url(), s3.options()).unwrap();
        round_trip(&storage).await;
    }

    #[test]
    fn unknown_schemes_and_bad_urls_name_the_setting() {
        let error = Storage::open("ftp://host/x", provider_options([])).unwrap_err();
        assert!(
            error.to_string().starts_with("STORAGE_URL: ftp://host/x"),
            "{error}"
        );
        assert!(Storage::open("not a url", provider_options([])).is_err());
    }

    #[test]
    fn provider_options_are_the_provider_variables_lower_cased() {
        let options = provider_options([
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:8333"),
            ("DATABASE_URL", "postgres://secret"),
            ("GOOGLE_SERVICE_ACCOUNT", "/sa.json"),
        ]);
        assert_eq!(
            options,
            vec![
                (
                    "aws_endpoint_url".to_owned(),
                    "http://127.0.0.1:8333".to_owned()
                ),
                ("google_service_account".to_owned(), "/sa.json".to_owned()),
            ]
        );
    }
}

//! A fresh, migrated database per test, dropped when the test ends.

use std::sync::OnceLock;

use sqlx::{Connection, Executor, PgConnection, PgPool, postgres::PgConnectOptions};

use crate::PgBouncer;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A database of its own for one test.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    server: PgConnectOptions,
    url: String,
    /// The PgBouncer a service reaches this database through, with
    /// `TEST_DATABASE_POOLER=pgbouncer`.
    bouncer: OnceLock<PgBouncer>,
}

impl TestDb {
    /// Creates `test_<uuid>` and applies every migration.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        let pool = db.pool().await;
        MIGRATOR
            .run(&pool)
            .await
            .expect("migrate the test database");
        pool.close().await;
        db
    }

    /// Names a database `test_<uuid>` that does not exist yet (for testing that the
    /// migrator creates it); it is dropped with the guard all the same.
    pub fn unborn() -> Self {
        let server_url = server_url();
        let server: PgConnectOptions = server_url
            .parse()
            .expect("TEST_DATABASE_URL is a postgres URL");
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let url = with_database(&server_url, &name);
        Self {
            name,
            server,
            url,
            bouncer: OnceLock::new(),
        }
    }

    /// Creates `test_<uuid>` without applying migrations.
    pub async fn empty() -> Self {
        let db = Self::unborn();
        let mut conn = PgConnection::connect_with(&db.server)
            .await
            .expect("connect to the test PostgreSQL server (is it running?)");
        conn.execute(format!("CREATE DATABASE {}", db.name).as_str())
            .await
            .expect("create the test database");
        conn.close().await.ok();
        db
    }

    /// The database's name (`test_<uuid>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `postgres://` URL of the test database, for a spawned binary.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The settings a service under test reaches this database with: `DATABASE_URL`.
    /// With `TEST_DATABASE_POOLER=pgbouncer` (CI runs the services' suites once so),
    /// that URL is a PgBouncer in transaction mode with two server connections, and
    /// `DATABASE_POOL_MODE=transaction` and `DATABASE_LISTEN_URL` (the direct URL)
    /// come with it. The test's own checks keep using [`TestDb::url`].
    pub fn service_env(&self) -> Vec<(String, String)> {
        let pooled = std::env::var("TEST_DATABASE_POOLER").is_ok_and(|v| v == "pgbouncer");
        if !pooled {
            return vec![("DATABASE_URL".to_owned(), self.url.clone())];
        }
        let bouncer = self
            .bouncer
            .get_or_init(|| PgBouncer::start(self.server.get_host(), self.server.get_port(), 2));
        vec![
            ("DATABASE_URL".to_owned(), bouncer.url(&self.name)),
            ("DATABASE_POOL_MODE".to_owned(), "transaction".to_owned()),
            ("DATABASE_LISTEN_URL".to_owned(), self.url.clone()),
        ]
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // The bouncer first, so its server connections do not outlive the database.
        drop(self.bouncer.take());
        // Drop is synchronous and may run inside a runtime: use a thread of our own.
        let server = self.server.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect_with(&server).await {
                    let _ = conn.execute(statement.as_str()).await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}

fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Replaces the database name (the URL's path) in a `postgres://` URL.
fn with_database(server_url: &str, name: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server_url, None),
    };
    let authority_end = base
        .find("://")
        .map(|scheme| scheme + 3)
        .and_then(|start| base[start..].find('/').map(|slash| start + slash))
        .unwrap_or(base.len());
    let mut url = format!("{}/{}", &base[..authority_end], name);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            super::with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            super::with_database("postgres://u@h?sslmode=disable", "t1"),
            "postgres://u@h/t1?sslmode=disable"
        );
    }
}

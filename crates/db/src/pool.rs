//! The connection pool, and [`Db`]: what every query runs on.
//!
//! `DATABASE_URL` may reach PostgreSQL directly, or through a pooler such as PgBouncer.
//! In PgBouncer's transaction mode a server session belongs to a client only inside a
//! transaction: between two statements it may serve another client. sqlx prepares each
//! statement in one round trip and runs it in the next, and caches what it prepared by
//! name, so outside a transaction the second half may reach a server that never saw
//! the first, or that holds another client's statement under the same name.
//! [`PoolMode::Transaction`] keeps everything it sends inside a transaction, and starts
//! each one by dropping what any earlier client left prepared on that server.
//! `LISTEN` and session advisory locks need a session of their own, so they go over a
//! direct connection ([`Db::direct`], `DATABASE_LISTEN_URL`).

use std::{str::FromStr, time::Duration};

use futures_util::{TryFutureExt as _, TryStreamExt as _, future::BoxFuture, stream::BoxStream};
use sqlx::{
    Connection as _, Either, Execute, Executor, PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo},
};

/// How `DATABASE_URL` reaches PostgreSQL (`DATABASE_POOL_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolMode {
    /// Directly, or through a pooler in session mode: a connection is a session.
    #[default]
    Session,
    /// Through a pooler in transaction mode (PgBouncer's `pool_mode = transaction`).
    Transaction,
}

impl FromStr for PoolMode {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "session" => Ok(Self::Session),
            "transaction" => Ok(Self::Transaction),
            other => Err(format!(
                "expected \"session\" or \"transaction\", got {other:?}"
            )),
        }
    }
}

/// How the pool is sized and how long a request may wait for a connection.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// What `pg_stat_activity` shows for these connections (`mobile-api`, ...), unless
    /// `DATABASE_URL` names one (`application_name=`).
    pub application_name: &'static str,
    pub max_connections: u32,
    /// A request that cannot get a connection in this time fails fast instead of
    /// queueing behind a database that is down or saturated.
    pub acquire_timeout: Duration,
    /// `DATABASE_POOL_MODE`.
    pub mode: PoolMode,
    /// `DATABASE_LISTEN_URL`: a direct connection for what needs a session of its own,
    /// when `DATABASE_URL` goes through a pooler. `None`: `DATABASE_URL` itself.
    pub direct_url: Option<String>,
}

impl PoolSettings {
    /// The defaults, for `application_name`'s connections, with `max_connections`
    /// (`DATABASE_MAX_CONNECTIONS`).
    pub fn new(application_name: &'static str, max_connections: u32) -> Self {
        Self {
            application_name,
            max_connections,
            ..Self::default()
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            application_name: env!("CARGO_PKG_NAME"),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(3),
            mode: PoolMode::Session,
            direct_url: None,
        }
    }
}

/// The database, as the services use it: an executor for every query in this crate
/// (`find_user(&db, id)`), [`Db::begin`] for a transaction, and [`Db::direct`] for a
/// session of one's own. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    mode: PoolMode,
    /// The pool behind `DATABASE_LISTEN_URL`; the main pool when it is not set.
    direct: PgPool,
}

/// A pool over a direct connection (a test's database): session mode, no pooler.
impl From<PgPool> for Db {
    fn from(pool: PgPool) -> Self {
        Self {
            direct: pool.clone(),
            pool,
            mode: PoolMode::Session,
        }
    }
}

/// What a transaction-mode transaction starts with: the statements an earlier client
/// prepared on this server session (and never closed, as sqlx does not) are dropped, so
/// a name sqlx picks cannot meet one of theirs.
const BEGIN_CLEAN: &str = "BEGIN; DEALLOCATE ALL";

impl Db {
    /// A pool that connects on first use, so a binary starts (and reports itself
    /// unready) while PostgreSQL is still coming up, instead of crash-looping. Fails
    /// only on a malformed URL.
    pub fn connect_lazy(database_url: &str, settings: &PoolSettings) -> Result<Self, sqlx::Error> {
        let mut options = named(database_url.parse()?, settings);
        if settings.mode == PoolMode::Transaction {
            // No statement outlives its transaction, so none is cached.
            options = options.statement_cache_capacity(0);
        }
        let pool = pool_options(settings.max_connections, settings.acquire_timeout)
            .connect_lazy_with(options);
        let direct = match &settings.direct_url {
            // LISTEN and one advisory lock: a couple of connections is all it needs.
            Some(url) => pool_options(2, settings.acquire_timeout)
                .connect_lazy_with(named(url.parse()?, settings)),
            None => pool.clone(),
        };
        Ok(Self {
            pool,
            mode: settings.mode,
            direct,
        })
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        match self.mode {
            PoolMode::Session => self.pool.begin().await,
            PoolMode::Transaction => self.pool.begin_with(BEGIN_CLEAN).await,
        }
    }

    /// A pool of sessions of one's own (`DATABASE_LISTEN_URL`), for `LISTEN` and
    /// session advisory locks; nothing else should use it.
    pub fn direct(&self) -> &PgPool {
        &self.direct
    }

    /// The main pool, for reading its size (`db_pool_connections`). Queries go
    /// through [`Db`] itself, which knows the pool mode.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes both pools, waiting for their connections to end.
    pub async fn close(&self) {
        self.pool.close().await;
        self.direct.close().await;
    }
}

/// Every statement through a [`Db`] in session mode goes straight to the pool; in
/// transaction mode it runs in a transaction of its own, committed before the caller
/// sees the result (buffered: the crate's queries read bounded result sets).
impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self.mode {
            PoolMode::Session => (&self.pool).fetch_many(query),
            PoolMode::Transaction => Box::pin(
                async move {
                    let mut tx = self.begin().await?;
                    let steps: Vec<_> = tx.fetch_many(query).try_collect().await?;
                    tx.commit().await?;
                    let steps = steps.into_iter().map(Ok::<_, sqlx::Error>);
                    Ok::<_, sqlx::Error>(futures_util::stream::iter(steps))
                }
                .try_flatten_stream(),
            ),
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self.mode {
            PoolMode::Session => (&self.pool).fetch_optional(query),
            PoolMode::Transaction => Box::pin(async move {
                let mut tx = self.begin().await?;
                let row = tx.fetch_optional(query).await?;
                tx.commit().await?;
                Ok(row)
            }),
        }
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        (&self.pool).prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        (&self.pool).describe(sql)
    }
}

/// `application_name` is the binary's unless the URL names one. sqlx's
/// `extra_float_digits` start-up parameter is not sent: PgBouncer, in either mode,
/// refuses a connection that sends it unless told to ignore it, and PostgreSQL's default
/// since 12 writes floats exactly anyway (the schema has none).
fn named(options: PgConnectOptions, settings: &PoolSettings) -> PgConnectOptions {
    let options = options.extra_float_digits(None);
    match options.get_application_name() {
        Some(_) => options,
        None => options.application_name(settings.application_name),
    }
}

fn pool_options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        // By default sqlx pings every connection it hands out: a round trip before
        // every query, on top of the query's own and the ping sqlx always makes when a
        // connection comes back. A connection idle for less than TRUSTED_IDLE answered
        // that release ping less than TRUSTED_IDLE ago, so it is handed out unchecked,
        // as HikariCP does (`aliveBypassWindowMs`); one that sat idle longer is still
        // pinged. What a PostgreSQL restart can cost is the requests that pick up,
        // within that second, a connection it has just cut: they fail with 503.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for < TRUSTED_IDLE {
                    return Ok(true);
                }
                Ok(connection.ping().await.is_ok())
            })
        })
}

/// A connection idle for less than this is handed out without a ping.
const TRUSTED_IDLE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use mobile_testkit::TestDb;

    use super::*;

    /// The `application_name` of the pools these tests make.
    const TEST_APP: &str = "mobile-db-test";

    /// The backends serving `pool`'s connections, ended from another session, as a
    /// PostgreSQL restart or a proxy's idle cut would end them.
    async fn cut_connections(db: &TestDb) -> u64 {
        let admin = db.pool().await;
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name = $1",
        )
        .bind(TEST_APP)
        .fetch_all(&admin)
        .await
        .unwrap();
        admin.close().await;
        cut.len() as u64
    }

    #[tokio::test]
    async fn a_connection_cut_while_idle_is_replaced_not_handed_out() {
        let db = TestDb::new().await;
        let pool = Db::connect_lazy(db.url(), &PoolSettings::new(TEST_APP, 1)).unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(one, 1);
        assert_eq!(cut_connections(&db).await, 1);

        // Idle past the trusted window: the pool pings it, finds it dead, reconnects.
        tokio::time::sleep(TRUSTED_IDLE + Duration::from_millis(200)).await;
        let two: i32 = sqlx::query_scalar("SELECT 2")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(two, 2);
    }
}

#[cfg(test)]
mod through_pgbouncer {
    use mobile_domain::{DisplayName, Email};
    use mobile_testkit::{PgBouncer, TestDb};

    use super::*;
    use crate::users::{self, InsertUser};

    /// A [`Db`] in transaction mode through a PgBouncer in transaction mode with one
    /// server connection, so every client shares it between statements: what breaks
    /// there breaks at once.
    fn through_bouncer(db: &TestDb, bouncer: &PgBouncer) -> Db {
        let settings = PoolSettings {
            mode: PoolMode::Transaction,
            direct_url: Some(db.url().to_owned()),
            ..PoolSettings::new("mobile-db-test", 8)
        };
        Db::connect_lazy(&bouncer.url(db.name()), &settings).unwrap()
    }

    fn bouncer_for(db: &TestDb) -> PgBouncer {
        let server: PgConnectOptions = db.url().parse().unwrap();
        PgBouncer::start(server.get_host(), server.get_port(), 1)
    }

    /// Statements, failed statements and explicit transactions from eight connections
    /// at once: in session mode the second connection meets the first one's prepared
    /// statement on the shared server ("prepared statement \"sqlx_s_1\" already
    /// exists"), or runs its own `Bind` where another client's statement is.
    #[tokio::test]
    async fn concurrent_statements_and_transactions_share_one_server_connection() {
        let test_db = TestDb::new().await;
        let bouncer = bouncer_for(&test_db);
        let db = through_bouncer(&test_db, &bouncer);
        let name = DisplayName::parse("Pooled").unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let db = db.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    for n in 0..20 {
                        let email = Email::parse(&format!("u{task}-{n}@example.com")).unwrap();
                        let InsertUser::Inserted(user) =
                            users::insert_user(&db, &email, "hash", &name).await?
                        else {
                            panic!("a fresh address is not taken");
                        };
                        // A statement that fails, then more on a fresh transaction.
                        assert!(matches!(
                            users::insert_user(&db, &email, "hash", &name).await?,
                            InsertUser::EmailTaken
                        ));
                        let found = users::find_user(&db, user.id).await?;
                        assert_eq!(found.as_ref(), Some(&user));
                        let renamed =
                            sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                                .bind("rehashed")
                                .bind(user.id)
                                .execute(&db)
                                .await?;
                        assert_eq!(renamed.rows_affected(), 1);
                        assert!(
                            crate::devices::list_devices(&db, user.id, None, 10)
                                .await?
                                .is_empty()
                        );
                        let mut tx = db.begin().await?;
                        let locked = users::find_user_for_update(&mut *tx, user.id).await?;
                        assert_eq!(locked.as_ref(), Some(&user));
                        tx.commit().await?;
                    }
                    Ok::<_, sqlx::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let direct = test_db.pool().await;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
            .fetch_one(&direct)
            .await
            .unwrap();
        assert_eq!(count, 160);
    }

    /// Through PgBouncer in session mode a connection is a session: the pool needs no
    /// setting, and PgBouncer accepts its start-up parameters (it refuses
    /// `extra_float_digits`, which sqlx sends unless told not to).
    #[tokio::test]
    async fn session_mode_through_pgbouncer_needs_nothing() {
        let test_db = TestDb::new().await;
        let server: PgConnectOptions = test_db.url().parse().unwrap();
        let bouncer = PgBouncer::start_in("session", server.get_host(), server.get_port(), 2);
        let db = Db::connect_lazy(
            &bouncer.url(test_db.name()),
            &PoolSettings::new("mobile-db-test", 4),
        )
        .unwrap();
        let email = Email::parse("session@example.com").unwrap();
        let name = DisplayName::parse("Session").unwrap();
        let InsertUser::Inserted(user) = users::insert_user(&db, &email, "hash", &name)
            .await
            .unwrap()
        else {
            panic!("a fresh address is not taken");
        };
        assert_eq!(users::find_user(&db, user.id).await.unwrap(), Some(user));
    }

    /// A write through the pooler is committed before the caller hears of it, so a
    /// reader elsewhere sees it at once; and `LISTEN` on the direct connection hears
    /// what a transaction through the pooler notified.
    #[tokio::test]
    async fn writes_are_committed_on_return_and_notifications_reach_the_direct_listener() {
        let test_db = TestDb::new().await;
        let bouncer = bouncer_for(&test_db);
        let db = through_bouncer(&test_db, &bouncer);
        let mut listener = sqlx::postgres::PgListener::connect_with(db.direct())
            .await
            .unwrap();
        listener.listen("jobs").await.unwrap();
        let direct = test_db.pool().await;
        for n in 0..20 {
            let email = Email::parse(&format!("w{n}@example.com")).unwrap();
            let name = DisplayName::parse("W").unwrap();
            users::insert_user(&db, &email, "hash", &name)
                .await
                .unwrap();
            let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE email = $1")
                .bind(email.as_str())
                .fetch_one(&direct)
                .await
                .unwrap();
            assert_eq!(seen, 1, "write {n} is visible as soon as it returned");
        }
        let job = crate::jobs::NewJob::new(
            mobile_domain::JobKind::PushSend,
            serde_json::json!({ "n": 1 }),
        );
        crate::jobs::enqueue(&db, &job).await.unwrap();
        let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("the notification arrives")
            .unwrap();
        assert_eq!(heard.payload(), "push.send");
    }
}

//! `mobile-api migrate`: create the database if it is missing, then apply migrations.
//!
//! Safe to run twice and from two pods at once: creating an existing database is
//! treated as success, and sqlx holds a PostgreSQL advisory lock while it migrates, so a
//! second migrator waits and then finds nothing left to do.

use sqlx::{
    Connection, Executor, PgConnection,
    migrate::{MigrateError, Migrator},
    postgres::PgConnectOptions,
};

/// The migrations in the workspace's top-level `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Errors from [`migrate`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot create database {name:?}: {source}")]
    CreateDatabase { name: String, source: sqlx::Error },
    #[error("migration failed: {0}")]
    Migrate(#[from] MigrateError),
}

/// Creates the database named in `database_url` if needed, then runs every pending
/// migration. Returns the number of migrations applied by this call.
pub async fn migrate(database_url: &str) -> Result<usize, Error> {
    let options: PgConnectOptions = database_url.parse().map_err(Error::Connect)?;
    create_database_if_missing(&options).await?;

    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(Error::Connect)?;
    let before = applied_count(&mut conn).await;
    MIGRATOR.run(&mut conn).await?;
    let after = applied_count(&mut conn).await;
    conn.close().await.map_err(Error::Connect)?;
    Ok(after.saturating_sub(before))
}

async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), Error> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    // Connect to the maintenance database of the same server to issue CREATE DATABASE.
    let admin = options.clone().database("postgres");
    let mut conn = PgConnection::connect_with(&admin)
        .await
        .map_err(Error::Connect)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .map_err(Error::Connect)?;
    if !exists {
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match conn.execute(statement.as_str()).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another migrator created it between our check and our CREATE: 42P04
            // (duplicate_database), or 23505 when both inserts into pg_database race.
            Err(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(source) => return Err(Error::CreateDatabase { name, source }),
        }
    }
    conn.close().await.map_err(Error::Connect)?;
    Ok(())
}

/// How many migrations the database records as applied (0 before the first run).
async fn applied_count(conn: &mut PgConnection) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(conn)
        .await
        .map(|n| usize::try_from(n).unwrap_or(0))
        .unwrap_or(0)
}

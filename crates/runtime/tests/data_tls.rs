//! TLS to PostgreSQL and Redis, as managed services serve it: against servers started
//! by the tests with certificates of a CA made by the tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mobile_db::PoolSettings;
use mobile_runtime::redis::Redis;
use mobile_testkit::{PgServer, RedisServer, TestCa};

/// Whether a connection made from `url` is encrypted, and the name it gave itself; or
/// why it could not be made.
async fn connect(url: &str) -> Result<(bool, String), String> {
    let pool = mobile_db::Db::connect_lazy(url, &PoolSettings::new("tls-test", 1))
        .map_err(|e| e.to_string())?;
    let row: Result<(bool, String), _> = sqlx::query_as(
        "SELECT s.ssl, a.application_name FROM pg_stat_ssl s
         JOIN pg_stat_activity a USING (pid) WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await;
    pool.close().await;
    row.map_err(|e| format!("{e}"))
}

#[tokio::test]
async fn postgres_speaks_tls_as_libpq_reads_sslmode_and_sslrootcert() {
    let ca = TestCa::new();
    let other_ca = TestCa::new();
    let server = PgServer::start_tls(&ca).await;
    let root = ca.ca_file().display().to_string();
    let localhost = server.url("localhost");
    let loopback = server.url("127.0.0.1");

    // verify-full: the CA and the host name checked.
    let full = format!("{localhost}?sslmode=verify-full&sslrootcert={root}");
    assert_eq!(connect(&full).await, Ok((true, "tls-test".to_owned())));
    // The certificate names localhost, not 127.0.0.1: verify-full refuses.
    let wrong_host = format!("{loopback}?sslmode=verify-full&sslrootcert={root}");
    let error = connect(&wrong_host).await.unwrap_err();
    assert!(error.contains("not valid for name"), "{error}");
    // verify-ca checks the CA; libpq would not check the name, but sqlx 0.8 with this
    // rustls does (launchbadge/sqlx#3793): stricter, so safe, and documented
    // (docs/deployment.md). With the name the certificate carries, it connects.
    let ca_only = format!("{loopback}?sslmode=verify-ca&sslrootcert={root}");
    assert!(connect(&ca_only).await.is_err());
    let ca_only = format!("{localhost}?sslmode=verify-ca&sslrootcert={root}");
    assert_eq!(connect(&ca_only).await.map(|r| r.0), Ok(true));
    // Another CA's certificate is refused.
    let other = other_ca.ca_file().display().to_string();
    let error = connect(&format!(
        "{localhost}?sslmode=verify-full&sslrootcert={other}"
    ))
    .await
    .unwrap_err();
    assert!(
        error.contains("certificate") || error.contains("issuer"),
        "{error}"
    );
    // Without a CA of its own, verify-full trusts the system's roots, which do not
    // know this CA.
    assert!(
        connect(&format!("{localhost}?sslmode=verify-full"))
            .await
            .is_err()
    );
    // require: encrypted, unchecked (as libpq, without a root certificate).
    assert_eq!(
        connect(&format!("{loopback}?sslmode=require"))
            .await
            .map(|r| r.0),
        Ok(true)
    );
    // disable: plain; and a name in the URL wins over the binary's.
    assert_eq!(
        connect(&format!("{loopback}?sslmode=disable&application_name=ops")).await,
        Ok((false, "ops".to_owned()))
    );
}

#[tokio::test]
async fn redis_speaks_tls_with_a_private_ca_and_checks_the_host_name() {
    let ca = TestCa::new();
    let other_ca = TestCa::new();
    let server = RedisServer::start_tls(&ca).await;
    let url = server.url();
    assert!(url.starts_with("rediss://localhost:"), "{url}");
    let pem = |ca: &TestCa| Some(std::fs::read(ca.ca_file()).unwrap());
    let ping = |url: String, root: Option<Vec<u8>>| async move {
        let redis = Redis::connect_lazy_trusting(&url, "tls-test:", root).unwrap();
        tokio::time::timeout(Duration::from_secs(5), redis.ping())
            .await
            .expect("an answer or an error within 5 s")
    };

    ping(url.clone(), pem(&ca))
        .await
        .expect("verified with the CA");
    // A Pub/Sub connection is made the same way.
    let redis = Redis::connect_lazy_trusting(&url, "tls-test:", pem(&ca)).unwrap();
    redis.pubsub().await.expect("a Pub/Sub connection over TLS");

    assert!(
        ping(url.clone(), pem(&other_ca)).await.is_err(),
        "another CA"
    );
    assert!(ping(url.clone(), None).await.is_err(), "the system's roots");
    let by_address = format!("rediss://127.0.0.1:{}", server.port());
    assert!(
        ping(by_address, pem(&ca)).await.is_err(),
        "the certificate names localhost, not 127.0.0.1"
    );
}

//! The Redis command metrics count what failed, per feature, and nothing else: a
//! script's first run on a Redis that has not cached it (NOSCRIPT, which the client
//! answers by loading it) is not a failure; an error reply is.

#![allow(clippy::unwrap_used)] // a test: a failure is the panic

use mobile_runtime::redis::{Feature, Redis};
use mobile_testkit::{RedisServer, api::sample};
use prometheus_client::registry::Registry;

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test]
async fn a_scripts_first_run_is_not_an_error_and_an_error_reply_is() {
    // A Redis of its own: the script is certainly not cached there yet.
    let server = RedisServer::start().await;
    let redis = Redis::connect_lazy(&server.url(), "metrics-test:").unwrap();
    let mut registry = Registry::default();
    redis.register_metrics(&mut registry);

    let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
    let counted: i64 = script
        .key(redis.key("counter"))
        .invoke_async(&mut redis.conn(Feature::RateLimit))
        .await
        .unwrap();
    assert_eq!(counted, 1);
    let text = metrics_text(&registry);
    assert!(
        sample(
            &text,
            r#"redis_command_duration_seconds_count{feature="rate_limit"}"#
        )
        .unwrap_or(0.0)
            >= 2.0,
        "the miss and the run are both timed: {text}"
    );
    assert_eq!(
        sample(&text, r#"redis_command_errors_total{feature="rate_limit"}"#).unwrap_or(0.0),
        0.0,
        "{text}"
    );

    // INCR on a value that is not a number: Redis answers with an error.
    let _: () = redis::cmd("SET")
        .arg(redis.key("name"))
        .arg("ada")
        .query_async(&mut redis.conn(Feature::Presence))
        .await
        .unwrap();
    let refused: Result<i64, _> = redis::cmd("INCR")
        .arg(redis.key("name"))
        .query_async(&mut redis.conn(Feature::Presence))
        .await;
    assert!(refused.is_err());
    let text = metrics_text(&registry);
    assert_eq!(
        sample(&text, r#"redis_command_errors_total{feature="presence"}"#),
        Some(1.0),
        "{text}"
    );
}

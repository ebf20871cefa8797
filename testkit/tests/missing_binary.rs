//! A missing server binary is an error that names the `apt-get install` command.
//!
//! This file holds a single test because it changes the process environment, which would race
//! with other tests of the same binary.

use signal_testkit::{ClickHouseCluster, ClickHouseServer, Error, NatsServer, RedisServer};

#[test]
fn missing_binaries_name_the_install_command() {
    let missing = "/nonexistent/signal-testkit/server";
    // SAFETY: this test binary runs no other test, so no thread reads the environment meanwhile.
    unsafe {
        std::env::set_var("SIGNAL_TEST_NATS_SERVER", missing);
        std::env::set_var("SIGNAL_TEST_CLICKHOUSE_SERVER", missing);
        std::env::set_var("SIGNAL_TEST_REDIS_SERVER", missing);
        std::env::set_var("SIGNAL_TEST_JAVA", missing);
    }
    let errors = [
        ("apt-get install -y nats-server", NatsServer::start().err()),
        (
            "apt-get install -y clickhouse-server",
            ClickHouseServer::start().err(),
        ),
        (
            "apt-get install -y redis-server",
            RedisServer::start().err(),
        ),
        (
            "apt-get install -y --no-install-recommends zookeeper default-jre-headless",
            ClickHouseCluster::start(2).err(),
        ),
    ];
    for (install, error) in errors {
        let error = error.expect("start must fail when the binary is missing");
        assert!(matches!(error, Error::BinaryNotFound { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains(install), "{message}");
        assert!(message.contains(missing), "{message}");
    }
}

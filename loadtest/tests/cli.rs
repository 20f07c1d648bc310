//! `mobile-loadtest`'s arguments, without running a scenario.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mobile-loadtest");

#[test]
fn help_prints_the_usage_and_exits_0() {
    for flag in ["--help", "-h"] {
        let output = Command::new(BIN).arg(flag).output().expect("run");
        assert!(output.status.success(), "{flag}: {output:?}");
        let usage = String::from_utf8_lossy(&output.stdout);
        assert!(usage.starts_with("usage: mobile-loadtest ws"), "{usage}");
    }
}

#[test]
fn an_unknown_scenario_is_refused_with_the_usage() {
    let output = Command::new(BIN).arg("nonsense").output().expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown scenario"));
}

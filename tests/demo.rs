//! `palisade demo` is the newcomer's first command: it must pass, fast, and show what it claims.

use std::time::{Duration, Instant};

#[test]
fn demo_runs_the_whole_mesh_and_shows_allow_deny_policy_change_and_rotation() {
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(60), "demo took {:?}", started.elapsed());
    for expected in [
        "ALLOWED 200: orders saw caller \"spiffe://cluster.local/ns/demo/sa/web\"",
        "DENIED 403 by no-allow-matched",
        "DENIED 403 by demo/change-freeze",
        "freeze removed: POST /orders allowed again",
        "web rotated: serial",
        ", 0 failed",
        "SIDECARS (3)",
        "spiffe://cluster.local/ns/demo/sa/web          -> spiffe://cluster.local/ns/demo/sa/orders",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

//! Issue 18: the CA's private keys protected at rest. Real control-plane processes and a real
//! SQLite store; the tests attack the files the keys live in.

mod ca_support;
mod common;

use std::time::Duration;

use base64::Engine;
use ca_support::*;
use common::*;
use palisade::control::ca_set;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_kek_no_file_of_the_state_directory_holds_a_ca_key_in_clear() {
    let dir = tempdir("kek-grep");
    let kek = kek_file(&dir, "kek", 0x11);
    let cp = ControlPlane::start(&dir, &["--ca-kek-file", &arg(&kek), "--cert-ttl", "3s"]).await;
    assert!(cp.proc.log_text().contains("ca_keys_sealed=true"), "{}", cp.proc.log_text());
    let chain = certify(&cp, &id("web")).await;
    // A second generation from the offline CLI, the KEK given through the environment.
    let env_kek = base64::engine::general_purpose::STANDARD.encode([0x11u8; 32]);
    let out = palisade(&["control", "ca", "rotate", "--state-dir", &arg(&cp.state)], &[("PALISADE_CA_KEK", &env_kek)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The rotation runs: generation 2 signs once it has propagated.
    let store = palisade::control::Store::open(&cp.state).unwrap();
    wait_for("generation 2 signs", Duration::from_secs(30), || {
        let active = store.ca_generations().unwrap().iter().any(|g| g.generation == 2 && g.state == "active");
        async move { active }
    })
    .await;
    let chain2 = certify(&cp, &id("api")).await;
    assert_ne!(chain[1], chain2[1], "the new generation's intermediate signs");
    let roots = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    verify_chain(&chain2, &roots).unwrap();

    let opened = ca_set::opened_generations(&store, &custody(0x11)).unwrap();
    assert_eq!(opened.len(), 2);
    assert!(opened.iter().all(|g| g.material.root_key_pem.contains("PRIVATE KEY")), "the test sees the keys");
    // While the control plane runs (the WAL is live), and after it stopped.
    assert_no_clear_key(&cp.state, &opened);
    drop(store);
    let ControlPlane { mut proc, state, .. } = cp;
    proc.terminate(Duration::from_secs(10));
    assert_no_clear_key(&state, &opened);
    // And the stored values are sealed, not merely encoded.
    for g in generations(&state) {
        assert!(g.material.root_key_pem.starts_with("palisade-sealed-v1:"));
        assert!(g.material.intermediate_key_pem.starts_with("palisade-sealed-v1:"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_without_a_kek_is_sealed_in_place_and_keeps_its_ca() {
    let dir = tempdir("kek-migrate");
    let mut cp = ControlPlane::start(&dir, &[]).await;
    assert!(cp.proc.log_text().contains("stored in clear"), "a warning says the keys are in clear");
    let before = certify(&cp, &id("web")).await;
    let root_before = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    cp.proc.terminate(Duration::from_secs(10));
    let listen = cp.listen;
    let clear = generations(&cp.state);
    // The attack works on a store without a KEK: the keys are there for anyone to read.
    assert!(files(&cp.state).iter().any(|(_, b)| contains(b, b"PRIVATE KEY")));
    drop(cp);

    let kek = kek_file(&dir, "kek", 0x22);
    let cp = ControlPlane::start_at(&dir, listen, &["--ca-kek-file", &arg(&kek)]).await;
    assert!(cp.proc.log_text().contains("sealed in place"), "{}", cp.proc.log_text());
    assert_no_clear_key(&cp.state, &clear);
    let after = certify(&cp, &id("web")).await;
    assert_eq!(before[1], after[1], "the same intermediate signs");
    assert_eq!(std::fs::read_to_string(cp.root_pem_path()).unwrap(), root_before, "the same root");
    verify_chain(&after, &root_before).unwrap();
    let ControlPlane { mut proc, state, .. } = cp;
    proc.terminate(Duration::from_secs(10));
    assert_no_clear_key(&state, &clear);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_kek_fails_start_clearly_and_changes_no_byte() {
    let dir = tempdir("kek-wrong");
    let kek = kek_file(&dir, "kek", 0x33);
    let mut cp = ControlPlane::start(&dir, &["--ca-kek-file", &arg(&kek)]).await;
    certify(&cp, &id("web")).await;
    cp.proc.terminate(Duration::from_secs(10));
    checkpoint(&cp.state);
    let snapshot = files(&cp.state);

    let wrong = kek_file(&dir, "wrong", 0x44);
    let err = failed_start(&dir, &["--ca-kek-file", &arg(&wrong)]);
    let expected = format!(
        "the CA key-encryption key does not open generation 1 (its root key); is --ca-kek-file {} the one this store was sealed with?",
        wrong.display()
    );
    assert!(err.contains(&expected), "{err}");
    assert_eq!(files(&cp.state), snapshot, "a failed start changed the state directory");

    let err = failed_start(&dir, &[]);
    assert!(err.contains("the stored CA keys are sealed (generation 1) and no key-encryption key was given"), "{err}");
    assert_eq!(files(&cp.state), snapshot, "a failed start changed the state directory");

    // The offline rotation refuses the wrong key too, and writes no generation.
    let out =
        palisade(&["control", "ca", "rotate", "--state-dir", &arg(&cp.state), "--ca-kek-file", &arg(&wrong)], &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("does not open generation 1"));
    let out = palisade(&["control", "ca", "rotate", "--state-dir", &arg(&cp.state)], &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no key-encryption key"));
    assert_eq!(generations(&cp.state).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_key_copied_into_another_generation_is_refused() {
    let dir = tempdir("kek-swap");
    let kek = kek_file(&dir, "kek", 0x55);
    let mut cp = ControlPlane::start(&dir, &["--ca-kek-file", &arg(&kek)]).await;
    let out = palisade(&["control", "ca", "rotate", "--state-dir", &arg(&cp.state), "--ca-kek-file", &arg(&kek)], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cp.proc.terminate(Duration::from_secs(10));
    // The same key restarts cleanly before the attack: the refusal below is the swap's doing.
    let mut again = ControlPlane::start_at(&dir, cp.listen, &["--ca-kek-file", &arg(&kek)]).await;
    again.proc.terminate(Duration::from_secs(10));

    let conn = rusqlite::Connection::open(cp.state.join("state.db")).unwrap();
    let changed = conn
        .execute(
            "UPDATE ca SET intermediate_key_pem = (SELECT intermediate_key_pem FROM ca WHERE generation = 1) WHERE generation = 2",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let err = failed_start(&dir, &["--ca-kek-file", &arg(&kek)]);
    assert!(err.contains("does not open generation 2 (its intermediate key)"), "{err}");
}

//! The command line: unbuilt commands say so and fail; `certs dev` writes usable certificates.

mod common;

use common::{BIN, tempdir};
use palisade::identity::SpiffeId;

#[test]
fn unbuilt_subcommands_fail_loudly_instead_of_pretending() {
    for cmd in [&["init"][..], &["inject"], &["demo"], &["k8s"]] {
        let out = std::process::Command::new(BIN).args(cmd).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"), "{cmd:?}");
        assert!(out.stdout.is_empty(), "{cmd:?} printed pretend output");
    }
}

#[test]
fn certs_dev_writes_a_chain_that_verifies_to_its_root() {
    palisade::tls::install_crypto_provider();
    let dir = tempdir("certs-dev");
    let out = std::process::Command::new(BIN).args(["certs", "dev", "--out"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(dir.join("README.md")).unwrap().contains("local experiments only"));
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let bundle = palisade::tls::TrustBundle::from_pem(&root).unwrap();
    for sa in ["web", "orders"] {
        let chain =
            palisade::tls::certs_from_pem(&std::fs::read_to_string(dir.join(format!("{sa}.pem"))).unwrap()).unwrap();
        let expected: SpiffeId = format!("spiffe://cluster.local/ns/demo/sa/{sa}").parse().unwrap();
        let verifier = palisade::tls::verify::SpiffeServerVerifier::new(bundle.clone(), Some(expected));
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &palisade::tls::config::sni(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{sa}.pem does not verify: {e}"));
        assert!(std::fs::read_to_string(dir.join(format!("{sa}.key"))).unwrap().contains("PRIVATE KEY"));
    }
}

//! The command line: `k8s crds` prints what `deploy/crds` holds; `certs dev` writes usable certificates;
//! `inject` injects files and refuses bad input by name; `control` refuses a state dir it cannot keep private.

mod common;

use common::{BIN, tempdir};
use palisade::identity::SpiffeId;

#[test]
fn k8s_crds_prints_every_crd_as_committed_in_deploy_crds() {
    let out = std::process::Command::new(BIN).args(["k8s", "crds"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let names: Vec<&str> = docs.iter().map(|d| d["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "authorizationpolicies.palisade.io",
            "peerauthentications.palisade.io",
            "requestauthentications.palisade.io",
            "ratelimitpolicies.palisade.io",
            "workloadsecurities.palisade.io"
        ]
    );
    for (doc, name) in docs.iter().zip(&names) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("deploy/crds/{name}.yaml"));
        let committed: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(doc, &committed, "{name}");
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

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers: [{name: app, image: shop/web:1}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80}]
";

/// `palisade inject` with the dev root as the CA bundle, `input` as the file (or stdin with `-`).
fn inject(dir: &std::path::Path, input: &str, extra: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let root = dir.join("root.pem");
    if !root.exists() {
        let out = std::process::Command::new(BIN).args(["certs", "dev", "--out"]).arg(dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let file = dir.join("in.yaml");
    std::fs::write(&file, input).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["inject", "--ca-bundle"])
        .arg(&root)
        .arg("-f")
        .arg(if stdin.is_some() { std::path::PathBuf::from("-") } else { file })
        .args(extra)
        .env("PALISADE_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

#[test]
fn inject_adds_the_sidecar_to_a_deployment_and_passes_the_service_through() {
    let dir = tempdir("inject");
    let root_pem = |dir: &std::path::Path| std::fs::read_to_string(dir.join("root.pem")).unwrap();
    for stdin in [None, Some(DEPLOYMENT)] {
        let out = inject(
            &dir,
            DEPLOYMENT,
            &["--image", "registry.local/palisade:dev", "--trust-domain", "prod.example"],
            stdin,
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let docs: Vec<serde_yaml::Value> =
            serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        assert_eq!(docs.len(), 2, "{text}");

        let template = &docs[0]["spec"]["template"];
        let init = template["spec"]["initContainers"].as_sequence().unwrap();
        let names: Vec<_> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["palisade-init", "palisade-proxy"], "{text}");
        let proxy = &init[1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["image"], "registry.local/palisade:dev");
        let args: Vec<_> = proxy["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.windows(2).any(|w| w == ["--trust-domain", "prod.example"]), "{args:?}");
        let env = |name: &str| {
            proxy["env"].as_sequence().unwrap().iter().find(|e| e["name"] == name).map(|e| e["value"].clone())
        };
        assert_eq!(env("PALISADE_CA_BUNDLE_PEM"), Some(serde_yaml::Value::from(root_pem(&dir))));
        assert_eq!(env("PALISADE_LABELS"), Some(serde_yaml::Value::from("app=web")));
        assert_eq!(template["metadata"]["annotations"]["palisade.io/status"], "injected");
        assert_eq!(docs[1]["kind"], "Service");
        assert!(docs[1].get("spec").unwrap().get("template").is_none());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Deployment shop/web: injected"), "{stderr}");
    }
}

#[test]
fn inject_refuses_bad_input_with_exit_1_naming_the_problem() {
    let dir = tempdir("inject-bad");
    let bad_annotation = DEPLOYMENT.replace(
        "labels: {app: web}\n    spec:",
        "labels: {app: web}\n      annotations: {palisade.io/exclude-inbound-ports: \"80,http\"}\n    spec:",
    );
    assert_ne!(bad_annotation, DEPLOYMENT);
    for (input, says) in [
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n", "document 1: not valid YAML"),
        (
            bad_annotation.as_str(),
            "document 1 (Deployment shop/web): annotation palisade.io/exclude-inbound-ports=\"80,http\"",
        ),
    ] {
        let out = inject(&dir, input, &[], None);
        assert_eq!(out.status.code(), Some(1), "{input}");
        assert!(out.stdout.is_empty(), "nothing half-injected on stdout");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }

    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let out =
        std::process::Command::new(BIN).args(["inject", "-f", "-", "--ca-bundle"]).arg(&not_pem).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn palisade_proxy_takes_the_flags_of_palisade_proxy_and_refuses_zero_workers() {
    let help = |cmd: &mut std::process::Command| {
        let out = cmd.arg("--help").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        // The flag lines, without the usage line that names the program (and `--version`, which
        // only a top-level command has).
        text.lines()
            .filter(|l| l.trim_start().starts_with('-') && !l.contains("--version"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let sidecar_only = help(&mut std::process::Command::new(common::PROXY_BIN));
    let subcommand = help(std::process::Command::new(BIN).arg("proxy"));
    assert!(sidecar_only.iter().any(|l| l.contains("--workers")), "{sidecar_only:?}");
    assert_eq!(sidecar_only, subcommand);

    let out = std::process::Command::new(common::PROXY_BIN)
        .args(["--workers", "0", "--ca-bundle", "/nonexistent", "--token-file", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers") && err.contains("0"), "{err}");
}

#[test]
fn a_state_dir_the_control_plane_cannot_keep_private_is_refused_saying_why() {
    // A volume's root owned by root, as an emptyDir is; the control plane runs as 65534 here
    // (setpriv), so it can neither own nor chmod it.
    assert!(
        std::process::Command::new("id").arg("-u").output().unwrap().stdout.starts_with(b"0\n"),
        "this test switches users with setpriv: run it as root (CI does)"
    );
    let volume = tempdir("state-volume");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", BIN, "control", "--state-dir"])
        .arg(&volume)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must be private (0700) and this user does not own it"), "{stderr}");
    assert_eq!(stderr.matches("Operation not permitted").count(), 1, "the cause once: {stderr}");
    assert_eq!(std::fs::read_dir(&volume).unwrap().count(), 0, "nothing written");

    // A subdirectory it may create is fine: it owns it and makes it 0700.
    let mut sub = std::fs::metadata(&volume).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut sub, 0o777);
    std::fs::set_permissions(&volume, sub).unwrap();
    let state = volume.join("state");
    let mut control = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", BIN, "control", "--state-dir"])
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(control.stderr.take().unwrap()));
    let started =
        lines.by_ref().map_while(Result::ok).find(|l| l.contains("control plane started") || l.contains("error"));
    let _ = control.kill();
    let _ = control.wait();
    assert!(started.as_deref().is_some_and(|l| l.contains("control plane started")), "{started:?}");
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o700);
}

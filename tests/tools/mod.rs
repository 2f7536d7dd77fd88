//! The external tools integration tests run, each found or installed the way CI installs it, so
//! that `cargo test` on a machine with only the Rust and Go toolchains runs every test binary.
//!
//! A tool is `$PALISADE_<TOOL>` when set, else what its `.ci/install-*` script prints: the OPA
//! CLI, Helm and the Kubernetes binaries are built once through the Go module proxy (the Gateway
//! API CRDs fetched from it) into `~/.cache/palisade-tools` (or `$PALISADE_TOOL_CACHE`) and
//! reused; the network-namespace tools are Debian packages. Each script runs at most once per test process, however many tests ask,
//! and its progress goes straight to the terminal (not to the test's captured output), so a
//! first run that builds for minutes says what it is building.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;

/// The OPA CLI (`$PALISADE_OPA`, else `.ci/install-opa`).
pub fn opa() -> &'static Path {
    static OPA: OnceLock<PathBuf> = OnceLock::new();
    OPA.get_or_init(|| from_env_or_script("PALISADE_OPA", "install-opa"))
}

/// The Helm CLI (`$PALISADE_HELM`, else `.ci/install-helm`).
pub fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| from_env_or_script("PALISADE_HELM", "install-helm"))
}

/// promtool (`$PALISADE_PROMTOOL`, else `.ci/install-promtool`).
pub fn promtool() -> &'static Path {
    static PROMTOOL: OnceLock<PathBuf> = OnceLock::new();
    PROMTOOL.get_or_init(|| from_env_or_script("PALISADE_PROMTOOL", "install-promtool"))
}

/// The directory holding kube-apiserver, etcd and kubectl (`$PALISADE_K8S_BIN`, else
/// `.ci/install-k8s`).
pub fn k8s_bin_dir() -> &'static Path {
    static K8S: OnceLock<PathBuf> = OnceLock::new();
    K8S.get_or_init(|| from_env_or_script("PALISADE_K8S_BIN", "install-k8s"))
}

/// The official Gateway API CRDs of the standard channel, one YAML file each
/// (`$PALISADE_GATEWAY_API_CRDS`, else `.ci/install-gateway-api`, which takes them from the Go
/// module `sigs.k8s.io/gateway-api`).
pub fn gateway_api_crds() -> &'static Path {
    static CRDS: OnceLock<PathBuf> = OnceLock::new();
    CRDS.get_or_init(|| from_env_or_script("PALISADE_GATEWAY_API_CRDS", "install-gateway-api"))
}

/// PostgreSQL's bin directory (`$PALISADE_PG_BIN`, else `.ci/install-postgres`, which installs
/// Debian's `postgresql` when missing and prints its bin directory).
pub fn postgres_bin_dir() -> &'static Path {
    static PG: OnceLock<PathBuf> = OnceLock::new();
    PG.get_or_init(|| from_env_or_script("PALISADE_PG_BIN", "install-postgres"))
}

/// cargo-cyclonedx (`$PALISADE_CYCLONEDX`, else `.ci/install-cyclonedx`, built once from
/// crates.io).
pub fn cyclonedx() -> &'static Path {
    static CYCLONEDX: OnceLock<PathBuf> = OnceLock::new();
    CYCLONEDX.get_or_init(|| from_env_or_script("PALISADE_CYCLONEDX", "install-cyclonedx"))
}

/// Installs SoftHSM2 (Debian's `softhsm2`) with `.ci/install-softhsm` when missing.
pub fn softhsm() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        run_script("install-softhsm", "");
    });
}

/// Installs whichever of the network-namespace tests' commands (`ip`, `iptables`, `tcpdump`,
/// `curl`, `python3`, `setpriv`) are missing, with `.ci/install-netns-tools` (as root; the
/// packages `.ci/run` installs). Fails the test, saying what to install, where it cannot.
pub fn netns_tools() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        run_script("install-netns-tools", "");
    });
}

/// Installs what a real node needs besides the kubelet (containerd, runc, the CNI plugins,
/// iptables) with `.ci/install-node-tools`, as root; fails the test saying what is missing
/// where it cannot.
pub fn node_tools() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        run_script("install-node-tools", "");
    });
}

/// Starts `bin args` under a shell that kills it when our end of its stdin closes, which
/// happens when this test process exits, however it exits.
pub fn spawn_tied(bin: &Path, args: &[String], log: &Path) -> (Child, ChildStdin) {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(concat!(
            r#"exec 3<&0; "$@" </dev/null 3<&- & c=$!; "#,
            r#"{ read -r _ <&3; kill $c 2>/dev/null; sleep 1; kill -9 $c 2>/dev/null; } & "#,
            r#"wait $c"#
        ))
        .arg("tied")
        .arg(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

fn from_env_or_script(var: &str, script: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(run_script(script, &format!("; set {var} to use one you already have")).trim()),
    }
}

/// Runs `.ci/<script>` with its progress on the terminal, and returns what it printed on stdout.
fn run_script(script: &str, hint: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci").join(script);
    // Straight to stderr: the test harness would hold an `eprintln!` back until the test ends.
    let _ = writeln!(std::io::stderr(), "tests: running .ci/{script} (installs on first use, then reuses it){hint}");
    let out = Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", path.display()));
    assert!(out.status.success(), ".ci/{script} failed ({}); its output is above", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

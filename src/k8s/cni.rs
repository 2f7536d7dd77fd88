//! `palisade cni`: the CNI mode, in which injected pods need no NET_ADMIN.
//!
//! Three parts, all in the one binary:
//! - the plugin (`palisade cni`, no subcommand): chained after the pod network's own plugin,
//!   run by the container runtime as root on the node for every pod sandbox. On `ADD` it looks
//!   the pod up in the API server and, for a pod the injector gave a sidecar in CNI mode,
//!   enters the pod's network namespace and installs the same rules `palisade init` would
//!   (derived by [`crate::k8s::inject::cni_redirect_args`], never taken from the pod as flags);
//!   it passes the previous plugin's result on unchanged. Any other pod is passed through.
//! - the installer (`palisade cni install`, the node DaemonSet, as Istio CNI and Linkerd CNI do
//!   it): puts the plugin into the host's CNI binary directory (the binary with the exact shared
//!   libraries it runs with, behind a small launcher, so it runs whatever the host's libc),
//!   writes the plugin's kubeconfig from its own service-account token (kept current as the
//!   token rotates), adds the plugin to the first network configuration list and keeps it
//!   there; on SIGTERM it takes all of that out again.
//! - the validator (`palisade cni validate`, the `palisade-validate` init container): checks from
//!   inside the pod, unprivileged, that the redirect is in place. A pod that was set up while
//!   the plugin was missing fails there, so it never runs unmeshed.
//!
//! The plugin fails closed: when it cannot read the pod (API server unreachable) it answers
//! CNI error 11 ("try again later") and the kubelet retries the sandbox.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

/// The plugin's `type` in a network configuration, and its file name in the CNI binary dir.
pub const PLUGIN_TYPE: &str = "palisade-cni";
/// The directory next to the launcher that holds the binary and its libraries.
const PAYLOAD_DIR: &str = "palisade-cni.d";
/// The plugin's kubeconfig, in the CNI configuration directory.
const KUBECONFIG: &str = "palisade-cni.kubeconfig";
/// CNI versions the plugin speaks (its result is the previous plugin's, passed through).
const VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long the plugin waits for the API server before it asks the runtime to retry.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// `palisade cni` subcommands; none runs the plugin.
#[derive(clap::Subcommand, Debug)]
pub enum CniCommand {
    /// Put the plugin on this node and keep it there (the DaemonSet's container).
    Install(InstallArgs),
    /// Exit 0 when the plugin is installed in the first network configuration (readiness).
    Check(CheckArgs),
    /// Check, inside a pod, that its outbound TCP is redirected to the sidecar.
    Validate(ValidateArgs),
}

/// Flags of `palisade cni install`.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The host's CNI binary directory, as mounted in this container.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The same directory as the container runtime sees it on the host.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub host_bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted in this container.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The same directory as the host sees it.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub host_conf_dir: PathBuf,
    /// Service-account directory (`token`, `ca.crt`) the plugin's kubeconfig is written from.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    pub token_dir: PathBuf,
    /// API server URL the plugin dials from the host (default: the in-cluster
    /// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`).
    #[arg(long)]
    pub api_server: Option<String>,
    /// How often the token, the launcher and the configuration list are checked again.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

/// Flags of `palisade cni check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The host's CNI configuration directory, as mounted in this container.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
}

/// Flags of `palisade cni validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// The sidecar's outbound port: the validator listens there, as the sidecar will.
    #[arg(long, default_value_t = crate::ports::SIDECAR_OUTBOUND)]
    pub outbound_port: u16,
    /// An address no route leads to; only the redirect can bring a connection to it here.
    #[arg(long)]
    pub probe: SocketAddr,
    /// How long the connection may take.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs a `palisade cni` subcommand.
pub fn run(command: CniCommand) -> anyhow::Result<()> {
    match command {
        CniCommand::Install(args) => install(args),
        CniCommand::Check(args) => match installed_in(&args.conf_dir)? {
            Some(list) => {
                println!("{PLUGIN_TYPE} is in {}", list.display());
                Ok(())
            }
            None => {
                anyhow::bail!("{PLUGIN_TYPE} is not in the first network configuration of {}", args.conf_dir.display())
            }
        },
        CniCommand::Validate(args) => validate(&args),
    }
}

// ---------------------------------------------------------------------------------------------
// The plugin

/// A CNI error: the code the spec gives it, and what a person reading the kubelet's events needs.
#[derive(Debug)]
pub struct CniError {
    /// 4 invalid environment, 6 decode failure, 7 invalid network config, 11 try again later,
    /// 100 and up: this plugin's own.
    pub code: u32,
    /// One line.
    pub msg: String,
    /// The cause chain.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl std::fmt::Display) -> CniError {
        CniError { code, msg: msg.into(), details: details.to_string() }
    }
}

/// The plugin's input: the `CNI_*` environment and the network configuration on stdin.
#[derive(Debug, Default)]
pub struct Invocation {
    /// `CNI_COMMAND`: ADD, DEL, CHECK, VERSION (GC and STATUS are answered as no-ops).
    pub command: String,
    /// `CNI_NETNS`: the pod's network namespace.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`, parsed (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, …).
    pub args: BTreeMap<String, String>,
    /// The network configuration (with `prevResult` when chained).
    pub config: Vec<u8>,
}

impl Invocation {
    /// Reads the environment and stdin.
    pub fn from_process() -> Invocation {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut config = Vec::new();
        // VERSION may come with an empty stdin; a read error is a config error below.
        let _ = std::io::stdin().take(1 << 20).read_to_end(&mut config);
        Invocation {
            command: var("CNI_COMMAND").unwrap_or_default(),
            netns: var("CNI_NETNS").map(PathBuf::from),
            args: parse_cni_args(&var("CNI_ARGS").unwrap_or_default()),
            config,
        }
    }
}

/// `CNI_ARGS`: `K=V;K=V`.
pub fn parse_cni_args(text: &str) -> BTreeMap<String, String> {
    text.split(';').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Runs the plugin for the process's invocation; writes the result or the error to stdout as
/// the CNI spec asks, and returns the exit code.
pub fn plugin_main() -> std::process::ExitCode {
    let invocation = Invocation::from_process();
    let answer = handle(&invocation, &lookup_pod, &install_rules);
    let mut out = std::io::stdout().lock();
    match answer {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code, msg = %e.msg, details = %e.details, "palisade-cni failed");
            let version = serde_json::from_slice::<Value>(&invocation.config)
                .ok()
                .and_then(|c| c["cniVersion"].as_str().map(String::from))
                .unwrap_or_else(|| "1.0.0".to_string());
            let _ =
                writeln!(out, "{}", json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reads a pod through a kubeconfig: `Ok(None)` when it does not exist.
pub type PodLookup<'a> = dyn Fn(&Path, &str, &str) -> Result<Option<k8s_openapi::api::core::v1::Pod>, CniError> + 'a;
/// Installs `palisade init` flags' rules in a network namespace.
pub type RuleInstaller<'a> = dyn Fn(&Path, &[String]) -> Result<(), CniError> + 'a;

/// The plugin's decision, apart from the process: what to print on stdout, or the error.
pub fn handle(inv: &Invocation, lookup: &PodLookup<'_>, rules: &RuleInstaller<'_>) -> Result<Option<String>, CniError> {
    match inv.command.as_str() {
        "VERSION" => {
            return Ok(Some(json!({"cniVersion": "1.0.0", "supportedVersions": VERSIONS}).to_string()));
        }
        // Nothing of ours outlives the network namespace, and the rules are checked from inside
        // the pod by the validator.
        "DEL" | "CHECK" | "GC" | "STATUS" => return Ok(None),
        "ADD" => {}
        other => {
            return Err(CniError::new(
                4,
                format!("unknown CNI_COMMAND {other:?}"),
                "expected ADD, DEL, CHECK or VERSION",
            ));
        }
    }
    let config: Value = serde_json::from_slice(&inv.config)
        .map_err(|e| CniError::new(6, "the network configuration on stdin is not JSON", e))?;
    let version = config["cniVersion"].as_str().unwrap_or_default().to_string();
    if !VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            1,
            format!("cniVersion {version:?} is not supported"),
            format!("supported: {VERSIONS:?}"),
        ));
    }
    let Some(prev) = config.get("prevResult").filter(|p| p.is_object()) else {
        return Err(CniError::new(
            7,
            format!("{PLUGIN_TYPE} must be chained after the pod network's plugin"),
            "no prevResult in the configuration: add it at the end of a .conflist's plugins",
        ));
    };
    let mut result = prev.clone();
    result["cniVersion"] = Value::String(version);
    let passed_through = Ok(Some(result.to_string()));

    let (Some(namespace), Some(name)) = (inv.args.get("K8S_POD_NAMESPACE"), inv.args.get("K8S_POD_NAME")) else {
        return passed_through; // not a Kubernetes pod
    };
    let Some(kubeconfig) = config["kubeconfig"].as_str() else {
        return Err(CniError::new(
            7,
            "the configuration names no kubeconfig",
            "set \"kubeconfig\" in the plugin's entry",
        ));
    };
    let Some(pod) = lookup(Path::new(kubeconfig), namespace, name)? else {
        return Err(CniError::new(11, format!("pod {namespace}/{name} not found"), "it may not be visible yet; retry"));
    };
    let Some(spec) = &pod.spec else { return passed_through };
    let args = crate::k8s::inject::cni_redirect_args(&pod.metadata, spec)
        .map_err(|e| CniError::new(100, format!("pod {namespace}/{name}: cannot derive its redirect"), e))?;
    let Some(args) = args else { return passed_through };
    let netns = inv
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(4, "CNI_NETNS is not set", "ADD needs the pod's network namespace"))?;
    rules(netns, &args)?;
    tracing::info!(pod = %format!("{namespace}/{name}"), "redirect installed");
    passed_through
}

/// Reads the pod through the kubeconfig the configuration names.
fn lookup_pod(path: &Path, namespace: &str, name: &str) -> Result<Option<k8s_openapi::api::core::v1::Pod>, CniError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(100, "cannot start a runtime", e))?;
    let found = runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| CniError::new(7, format!("cannot read kubeconfig {}", path.display()), e))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| CniError::new(7, format!("unusable kubeconfig {}", path.display()), e))?;
        let client = kube::Client::try_from(config).map_err(|e| CniError::new(7, "cannot build an API client", e))?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, namespace);
        match tokio::time::timeout(LOOKUP_TIMEOUT, pods.get_opt(name)).await {
            Err(_) => Err(CniError::new(11, "the API server did not answer", format!("within {LOOKUP_TIMEOUT:?}"))),
            Ok(Err(e)) => Err(CniError::new(11, format!("cannot read pod {namespace}/{name}"), e)),
            Ok(Ok(pod)) => Ok(pod),
        }
    });
    // Threads the runtime started stay in the host's namespace; this one moves next.
    drop(runtime);
    found
}

/// Enters the network namespace on this (the main) thread and runs `palisade init` there:
/// iptables, started from this thread, inherits the namespace.
fn install_rules(netns: &Path, args: &[String]) -> Result<(), CniError> {
    use clap::Parser;
    #[derive(Parser)]
    struct Init {
        #[command(flatten)]
        args: crate::init::InitArgs,
    }
    let parsed = Init::try_parse_from(std::iter::once("init".to_string()).chain(args.iter().cloned()))
        .map_err(|e| CniError::new(100, "the derived redirect flags do not parse", e))?;
    enter_netns(netns)
        .map_err(|e| CniError::new(100, format!("cannot enter {}", netns.display()), format!("{e:#}")))?;
    crate::init::run(parsed.args).map_err(|e| CniError::new(100, "installing the redirect failed", format!("{e:#}")))
}

fn enter_netns(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
        .context("setns(CLONE_NEWNET)")
}

// ---------------------------------------------------------------------------------------------
// The validator

fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    let listen = SocketAddr::from(([127, 0, 0, 1], args.outbound_port));
    let listener = TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let refused = |why: String| {
        anyhow::anyhow!(
            "outbound TCP of this pod is not redirected to the sidecar ({why}): the palisade CNI plugin did not \
             set up this pod's network. Is the palisade-cni DaemonSet ready on this node? Delete the pod once it is; \
             it is kept from starting unmeshed"
        )
    };
    let stream = TcpStream::connect_timeout(&args.probe, args.timeout)
        .map_err(|e| refused(format!("connecting to {} failed: {e}", args.probe)))?;
    listener.set_nonblocking(true)?;
    match listener.accept() {
        Ok((_, peer)) if Some(peer) == stream.local_addr().ok() => {
            println!(
                "outbound TCP to {} reaches 127.0.0.1:{}: the redirect is in place",
                args.probe, args.outbound_port
            );
            Ok(())
        }
        Ok((_, peer)) => Err(refused(format!("an unexpected connection from {peer} arrived instead"))),
        Err(e) => {
            Err(refused(format!("{} answered, but not through 127.0.0.1:{} ({e})", args.probe, args.outbound_port)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The installer

/// The network configuration the runtime uses, the first `.conflist` or `.conf` by name, and
/// its content.
fn first_config(conf_dir: &Path) -> anyhow::Result<Option<(PathBuf, Value)>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
        .collect();
    names.sort();
    let Some(path) = names.into_iter().next() else { return Ok(None) };
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(Some((path, config)))
}

/// The first configuration, when it chains the plugin.
fn installed_in(conf_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    Ok(first_config(conf_dir)?.filter(|(_, config)| has_plugin(config)).map(|(path, _)| path))
}

fn has_plugin(config: &Value) -> bool {
    config["plugins"].as_array().is_some_and(|p| p.iter().any(|p| p["type"] == PLUGIN_TYPE))
}

/// The configuration with the plugin chained last: a `.conf` (one plugin) becomes a list.
pub fn with_plugin(config: &Value, kubeconfig: &Path) -> anyhow::Result<Value> {
    let mut list = if config.get("plugins").is_some() {
        config.clone()
    } else {
        let mut single = config.clone();
        let object = single.as_object_mut().context("the network configuration is not a JSON object")?;
        let version = object.get("cniVersion").cloned().unwrap_or(Value::Null);
        let name = object.remove("name").unwrap_or(Value::Null);
        object.remove("cniVersion");
        json!({"cniVersion": version, "name": name, "plugins": [single]})
    };
    let plugins = list["plugins"].as_array_mut().context("`plugins` is not a list")?;
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.push(json!({"type": PLUGIN_TYPE, "kubeconfig": kubeconfig}));
    Ok(list)
}

/// The configuration without the plugin.
pub fn without_plugin(config: &Value) -> Value {
    let mut list = config.clone();
    if let Some(plugins) = list["plugins"].as_array_mut() {
        plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    }
    list
}

/// Where a file comes from: bytes, or another file (streamed: a debug build of the binary is
/// larger than the installer's memory limit).
enum Content<'a> {
    Bytes(&'a [u8]),
    CopyOf(&'a Path),
}

/// Writes a file whole or not at all (a temporary file renamed over it): a runtime reading it
/// never sees half of it.
fn write_atomic(path: &Path, content: Content<'_>, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension(format!("palisade-tmp-{}", std::process::id()));
    match content {
        Content::Bytes(bytes) => std::fs::write(&tmp, bytes).map(drop),
        Content::CopyOf(from) => std::fs::copy(from, &tmp).map(drop),
    }
    .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// This process's executable and every shared object it has mapped (its loader among them).
fn payload() -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let exe = std::fs::read_link("/proc/self/exe").context("reading /proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    let mut libs: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .filter(|p| p != &exe && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".so")))
        .collect();
    libs.sort();
    libs.dedup();
    Ok((exe, libs))
}

fn is_loader(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl") || n.starts_with("ld64.so"))
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// Copies the binary and its libraries, then (last, atomically) the launcher the runtime runs.
fn install_binary(args: &InstallArgs) -> anyhow::Result<()> {
    let (exe, libs) = payload()?;
    let dir = args.bin_dir.join(PAYLOAD_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in std::iter::once(&exe).chain(&libs) {
        let name = if file == &exe {
            "palisade".into()
        } else {
            file.file_name().context("a library without a name")?.to_owned()
        };
        write_atomic(&dir.join(name), Content::CopyOf(file), 0o755)?;
    }
    let host_dir = args.host_bin_dir.join(PAYLOAD_DIR);
    let binary = shell_quote(&host_dir.join("palisade"));
    let exec = match libs.iter().find(|l| is_loader(l)) {
        Some(loader) => format!(
            "exec {} --library-path {} {binary} cni \"$@\"",
            shell_quote(&host_dir.join(loader.file_name().unwrap())),
            shell_quote(&host_dir)
        ),
        None => format!("exec {binary} cni \"$@\""),
    };
    let launcher = format!(
        "#!/bin/sh\n# Installed by `palisade cni install`: the palisade binary, run with the libraries it was built with.\n{exec}\n"
    );
    write_atomic(&args.bin_dir.join(PLUGIN_TYPE), Content::Bytes(launcher.as_bytes()), 0o755)
}

/// The plugin's kubeconfig, from this pod's service-account token and CA.
fn kubeconfig(args: &InstallArgs) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    let token = std::fs::read_to_string(args.token_dir.join("token"))
        .with_context(|| format!("reading {}/token", args.token_dir.display()))?;
    let ca = std::fs::read(args.token_dir.join("ca.crt"))
        .with_context(|| format!("reading {}/ca.crt", args.token_dir.display()))?;
    let server = match &args.api_server {
        Some(s) => s.clone(),
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST")
                .context("KUBERNETES_SERVICE_HOST is not set; pass --api-server")?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            format!("https://{host}:{port}")
        }
    };
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "palisade-cni",
        "clusters": [{"name": "cluster", "cluster": {
            "server": server,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
        }}],
        "users": [{"name": "palisade-cni", "user": {"token": token.trim()}}],
        "contexts": [{"name": "palisade-cni", "context": {"cluster": "cluster", "user": "palisade-cni"}}],
    });
    Ok(serde_json::to_vec_pretty(&config)?)
}

/// One pass: everything in place, rewriting only what differs. Returns what it changed.
fn reconcile(args: &InstallArgs) -> anyhow::Result<Vec<String>> {
    let mut changed = Vec::new();
    let kubeconfig_path = args.conf_dir.join(KUBECONFIG);
    let wanted = kubeconfig(args)?;
    if std::fs::read(&kubeconfig_path).ok().as_deref() != Some(&wanted[..]) {
        write_atomic(&kubeconfig_path, Content::Bytes(&wanted), 0o600)?;
        changed.push(format!("wrote {}", kubeconfig_path.display()));
    }
    if !args.bin_dir.join(PLUGIN_TYPE).exists() {
        install_binary(args)?;
        changed.push(format!("installed {}", args.bin_dir.join(PLUGIN_TYPE).display()));
    }
    let Some((path, config)) = first_config(&args.conf_dir)? else {
        anyhow::bail!(
            "no network configuration in {} yet (the pod network's plugin writes one)",
            args.conf_dir.display()
        );
    };
    let host_kubeconfig = args.host_conf_dir.join(KUBECONFIG);
    let updated = with_plugin(&config, &host_kubeconfig)?;
    if updated != config {
        let target = path.with_extension("conflist");
        write_atomic(&target, Content::Bytes(&serde_json::to_vec_pretty(&updated)?), 0o644)?;
        if target != path {
            std::fs::remove_file(&path)?;
        }
        changed.push(format!("chained {PLUGIN_TYPE} into {}", target.display()));
    }
    Ok(changed)
}

/// Takes the plugin out of the configuration and removes its files.
fn uninstall(args: &InstallArgs) -> anyhow::Result<()> {
    // The files go whatever the configuration holds: a launcher left behind would outlive its
    // token.
    let unchained = match first_config(&args.conf_dir) {
        Ok(Some((path, config))) if has_plugin(&config) => {
            write_atomic(&path, Content::Bytes(&serde_json::to_vec_pretty(&without_plugin(&config))?), 0o644)
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(args.bin_dir.join(PLUGIN_TYPE));
    let _ = std::fs::remove_dir_all(args.bin_dir.join(PAYLOAD_DIR));
    let _ = std::fs::remove_file(args.conf_dir.join(KUBECONFIG));
    unchained
}

fn install(args: InstallArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // A new version of the binary replaces the old one once per start.
        install_binary(&args)?;
        tracing::info!(bin_dir = %args.bin_dir.display(), "palisade-cni installed");
        let mut tick = tokio::time::interval(args.interval);
        let mut last_error = String::new();
        loop {
            tokio::select! {
                _ = tick.tick() => match reconcile(&args) {
                    Ok(changed) => {
                        last_error.clear();
                        for what in changed {
                            tracing::info!("{what}");
                        }
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        if e != last_error {
                            tracing::warn!(error = %e, "cannot install the plugin yet");
                            last_error = e;
                        }
                    }
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        tracing::info!("stopping: taking palisade-cni out of the network configuration");
        uninstall(&args)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> k8s_openapi::api::core::v1::Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    const INJECTED: &str = r#"
metadata: {name: web, namespace: shop, annotations: {palisade.io/status: injected, palisade.io/exclude-outbound-ports: "5432"}}
spec:
  initContainers:
    - {name: palisade-validate, image: x}
    - {name: palisade-proxy, image: x, securityContext: {runAsUser: 1337}}
  containers: [{name: app, image: y}]
"#;

    fn add(config: Value) -> Invocation {
        Invocation {
            command: "ADD".into(),
            netns: Some("/var/run/netns/test".into()),
            args: parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
            config: config.to_string().into_bytes(),
        }
    }

    fn chained() -> Value {
        json!({"cniVersion": "0.4.0", "name": "k8s", "type": PLUGIN_TYPE, "kubeconfig": "/x",
               "prevResult": {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.5/24"}]}})
    }

    #[test]
    fn an_injected_pod_gets_the_rules_its_validated_annotations_give_and_the_result_passes_through() {
        let installed = std::cell::RefCell::new(Vec::new());
        let out = handle(&add(chained()), &|_, _, _| Ok(Some(pod(INJECTED))), &|netns, args| {
            installed.borrow_mut().push((netns.to_path_buf(), args.to_vec()));
            Ok(())
        })
        .unwrap()
        .unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out["ips"][0]["address"], "10.0.0.5/24");
        assert_eq!(out["cniVersion"], "0.4.0");
        let installed = installed.into_inner();
        assert_eq!(installed.len(), 1);
        assert_eq!(installed[0].0, Path::new("/var/run/netns/test"));
        let args = installed[0].1.join(" ");
        assert!(args.starts_with("--proxy-uid 1337 --inbound-port 15006 --outbound-port 15001"), "{args}");
        assert!(args.contains("--exclude-outbound-ports 5432"), "{args}");
    }

    #[test]
    fn settings_resolved_against_the_injectors_configuration_do_not_stop_the_redirect() {
        // Admitted by an injector whose memory limit is 512Mi; the node knows only the default
        // (128Mi), and must not judge the sidecar's resources again.
        let roomy = INJECTED.replace(
            "palisade.io/status: injected,",
            "palisade.io/status: injected, palisade.io/proxy-memory: 256Mi, palisade.io/proxy-image: \"\",",
        );
        let installed = std::cell::Cell::new(false);
        handle(&add(chained()), &|_, _, _| Ok(Some(pod(&roomy))), &|_, _| {
            installed.set(true);
            Ok(())
        })
        .unwrap();
        assert!(installed.get(), "the rules were installed");
    }

    #[test]
    fn pods_without_a_cni_mode_sidecar_are_passed_through_untouched() {
        let plain = "metadata: {name: web, namespace: shop}\nspec: {containers: [{name: app, image: y}]}\n";
        let init_mode = INJECTED.replace("palisade-validate", "palisade-init");
        let host = INJECTED.replace("spec:\n", "spec:\n  hostNetwork: true\n");
        let forged = INJECTED.replace("palisade.io/status: injected, ", "");
        for yaml in [plain, &init_mode, &host, &forged] {
            let out = handle(&add(chained()), &|_, _, _| Ok(Some(pod(yaml))), &|_, _| panic!("no rules for\n{yaml}"));
            assert!(out.unwrap().is_some());
        }
        let mut no_pod = add(chained());
        no_pod.args.clear();
        assert!(handle(&no_pod, &|_, _, _| panic!("no lookup"), &|_, _| panic!("no rules")).unwrap().is_some());
    }

    #[test]
    fn nothing_from_the_pod_reaches_the_rules_as_a_flag() {
        // An annotation that would be a flag of `palisade init` if passed through is either
        // refused by the injector's checks or has no way in.
        let evil = INJECTED.replace("\"5432\"", "\"5432 --iptables /tmp/x\"");
        let err = handle(&add(chained()), &|_, _, _| Ok(Some(pod(&evil))), &|_, _| panic!("no rules")).unwrap_err();
        assert_eq!(err.code, 100);
        assert!(err.details.contains("palisade.io/exclude-outbound-ports"), "{}", err.details);
        let root = INJECTED.replace("runAsUser: 1337", "runAsUser: 0");
        let err = handle(&add(chained()), &|_, _, _| Ok(Some(pod(&root))), &|_, _| panic!("no rules")).unwrap_err();
        assert!(err.details.contains("runAsUser"), "{}", err.details);
    }

    #[test]
    fn bad_invocations_get_the_cni_error_codes() {
        let ok = |_: &Path, _: &str, _: &str| Ok(Some(pod(INJECTED)));
        let none = |_: &Path, _: &[String]| Ok(());
        let mut unchained = chained();
        unchained.as_object_mut().unwrap().remove("prevResult");
        assert_eq!(handle(&add(unchained), &ok, &none).unwrap_err().code, 7);
        let mut garbage = add(chained());
        garbage.config = b"{not json".to_vec();
        assert_eq!(handle(&garbage, &ok, &none).unwrap_err().code, 6);
        let mut old = chained();
        old["cniVersion"] = json!("0.1.0");
        assert_eq!(handle(&add(old), &ok, &none).unwrap_err().code, 1);
        let down = |_: &Path, _: &str, _: &str| Err(CniError::new(11, "the API server did not answer", "10s"));
        assert_eq!(handle(&add(chained()), &down, &none).unwrap_err().code, 11, "fails closed, to be retried");
        let mut anonymous = chained();
        anonymous.as_object_mut().unwrap().remove("kubeconfig");
        assert_eq!(handle(&add(anonymous), &ok, &none).unwrap_err().code, 7, "no kubeconfig to read the pod with");
        let mut weird = add(chained());
        weird.command = "FROB".into();
        assert_eq!(handle(&weird, &ok, &none).unwrap_err().code, 4);
        let version = Invocation { command: "VERSION".into(), ..Default::default() };
        let v: Value = serde_json::from_str(&handle(&version, &ok, &none).unwrap().unwrap()).unwrap();
        assert!(v["supportedVersions"].as_array().unwrap().contains(&json!("0.4.0")));
        let del = Invocation { command: "DEL".into(), ..Default::default() };
        assert_eq!(handle(&del, &|_, _, _| panic!(), &|_, _| panic!()).unwrap(), None);
    }

    #[test]
    fn the_plugin_is_chained_last_once_and_taken_out_again() {
        let list = json!({"cniVersion": "0.4.0", "name": "k8s", "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
        let with = with_plugin(&list, Path::new("/etc/cni/net.d/palisade-cni.kubeconfig")).unwrap();
        let types: Vec<&str> =
            with["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["bridge", "portmap", PLUGIN_TYPE]);
        assert_eq!(
            with_plugin(&with, Path::new("/etc/cni/net.d/palisade-cni.kubeconfig")).unwrap(),
            with,
            "idempotent"
        );
        assert_eq!(without_plugin(&with), list);
        let single = json!({"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "bridge": "cni0"});
        let converted = with_plugin(&single, Path::new("/k")).unwrap();
        assert_eq!(converted["name"], "k8s");
        assert_eq!(converted["plugins"][0], json!({"type": "bridge", "bridge": "cni0"}));
        assert_eq!(converted["plugins"][1]["type"], PLUGIN_TYPE);
    }
}

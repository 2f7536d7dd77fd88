//! The `palisade` command line. Parsing only; everything else lives in the library.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use palisade::control::admin_client::{self, ServerArgs};
use palisade::control::{self, ControlArgs, Store};
use palisade::identity::SpiffeId;
use palisade::k8s::inject::InjectConfig;
use palisade::proxy::{self, ProxyArgs};

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Zero-trust service-mesh sidecar: SPIFFE identities, mTLS everywhere, per-request policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The control plane: CA, issuance, policy push, telemetry, admin API.
    #[command(args_conflicts_with_subcommands = true)]
    Control {
        #[command(subcommand)]
        command: Option<ControlCommand>,
        #[command(flatten)]
        args: Box<ControlArgs>,
    },
    /// The sidecar proxy.
    Proxy(Box<ProxyArgs>),
    /// Install iptables rules for transparent interception (init container).
    Init(palisade::init::InitArgs),
    /// The CNI mode: with no subcommand, the chained CNI plugin the container runtime runs
    /// (`CNI_*` environment, configuration on stdin); `install` is the node DaemonSet.
    Cni {
        #[command(subcommand)]
        command: Option<palisade::k8s::cni::CniCommand>,
    },
    /// Inject the sidecar into Kubernetes YAML (the webhook's code, on files).
    ///
    /// Every pod template is injected unless it says `palisade.io/inject: disabled`; other objects
    /// pass through.
    Inject(InjectArgs),
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Offline policy tools: eval, explain, check.
    Policy {
        #[command(subcommand)]
        command: palisade::policy::PolicyCommand,
    },
    /// What the control plane knows: sidecars, config versions and ACKs, the traffic graph
    /// (through the management API: `--server`, default 127.0.0.1:15010, and a credential).
    #[command(args_conflicts_with_subcommands = true)]
    Status {
        #[command(subcommand)]
        command: Option<StatusCommand>,
        #[command(flatten)]
        server: ServerArgs,
        /// Output format: `table` or `json`.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Posture report: where the mesh is weaker than it looks, each finding with its fix.
    Audit(palisade::audit::AuditArgs),
    /// The whole mesh on one machine, no root, no Kubernetes.
    Demo(palisade::demo::DemoArgs),
    /// Kubernetes helpers.
    K8s {
        #[command(subcommand)]
        command: K8sCommand,
    },
}

#[derive(Subcommand)]
enum K8sCommand {
    /// Print the CustomResourceDefinitions (or write one file per CRD with `--out DIR`).
    Crds {
        /// Directory to write `<name>.yaml` files into (what `deploy/crds/` holds).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct InjectArgs {
    /// Multi-document YAML to inject; `-` reads standard input. The result goes to standard output.
    #[arg(short = 'f', long)]
    filename: PathBuf,
    /// Mesh trust roots (PEM) the sidecar anchors on (the control plane's CA bundle).
    #[arg(long)]
    ca_bundle: PathBuf,
    /// Sidecar image.
    #[arg(long, default_value_t = InjectConfig::default().image)]
    image: String,
    /// The control plane's gRPC address, as sidecars reach it.
    #[arg(long, default_value_t = InjectConfig::default().control_addr)]
    control: String,
    /// Trust domain of the mesh.
    #[arg(long, default_value_t = InjectConfig::default().trust_domain)]
    trust_domain: String,
    /// Inject for the CNI mode (the node's `palisade cni` plugin installs the redirect).
    #[arg(long)]
    cni: bool,
}

#[derive(Subcommand)]
enum ControlCommand {
    /// Join tokens for standalone workloads.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Revoke an identity or one certificate: pushed to every sidecar, which refuses new
    /// handshakes from it and closes its open connections. With `--server`, through the
    /// management API; otherwise in the state directory of a control plane on this machine.
    Revoke {
        #[arg(long, env = "PALISADE_STATE_DIR", default_value = "palisade-state")]
        state_dir: PathBuf,
        #[command(flatten)]
        store: control::store::StoreArgs,
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        identity: Option<SpiffeId>,
        /// Certificate serial, hex.
        #[arg(long)]
        serial: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List what is revoked (through the management API).
    Revocations {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Redeem an administrator's join token (`token create --admin`) at the control plane and
    /// write the credentials directory the `--server` forms use.
    Login {
        /// The control plane's gRPC address.
        #[arg(long, env = "PALISADE_SERVER")]
        server: String,
        /// The join token (or set PALISADE_JOIN_TOKEN).
        #[arg(long, env = "PALISADE_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The mesh's CA bundle (PEM), e.g. `STATE_DIR/ca/root.pem`.
        #[arg(long)]
        ca_bundle: PathBuf,
        /// Where to write `cert.pem`, `key.pem` and `bundle.pem`.
        #[arg(long, env = "PALISADE_CREDENTIALS", default_value = "palisade-admin")]
        credentials: PathBuf,
    },
    /// CA operations.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a single-use join token bound to one identity.
    Create {
        #[arg(long, env = "PALISADE_STATE_DIR", default_value = "palisade-state")]
        state_dir: PathBuf,
        #[command(flatten)]
        store: control::store::StoreArgs,
        /// The identity the token yields, whatever the CSR asks for.
        #[arg(long)]
        identity: SpiffeId,
        /// An administrator's token: the identity must be `spiffe://TD/admin/NAME`, and its
        /// certificate may call the management API. Without it, such an identity is refused.
        #[arg(long)]
        admin: bool,
        /// How long the token stays redeemable.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// An address the identity may register in discovery besides the source address of its
        /// own connection: an IP (any port; the pod IP of transparent mode) or IP:PORT.
        /// Repeatable or comma-separated. It stays bound to the identity for its renewals.
        #[arg(long = "address", value_delimiter = ',')]
        addresses: Vec<palisade::control::address_proof::AddressBinding>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Start an overlapping root rotation; the running control plane carries it through.
    Rotate {
        #[arg(long, env = "PALISADE_STATE_DIR", default_value = "palisade-state")]
        state_dir: PathBuf,
        #[command(flatten)]
        store: Box<control::store::StoreArgs>,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[command(flatten)]
        server: ServerArgs,
        /// Where the CA's private keys are kept: the same flags as `palisade control`'s.
        #[command(flatten)]
        ca_keys: control::ca_keys::CaKeyArgs,
    },
    /// Where a rotation stands: each generation, its state and its next step (management API).
    Status {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a dev root, intermediate and two workload certificates (local experiments only).
    Dev {
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum StatusCommand {
    /// The certificate ledger, newest first: with `--server` through the management API,
    /// otherwise from a state directory on this machine.
    Certs {
        #[arg(long, env = "PALISADE_STATE_DIR", default_value = "palisade-state")]
        state_dir: PathBuf,
        #[command(flatten)]
        store: control::store::StoreArgs,
        #[command(flatten)]
        server: ServerArgs,
        /// Only this identity.
        #[arg(long)]
        identity: Option<String>,
        /// Only certificates issued within this long (e.g. `1h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Output format: `table` or `json`.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
}

/// `palisade status certs`: the certificate ledger, from the management API or the local store.
fn status_certs(command: StatusCommand) -> anyhow::Result<()> {
    let StatusCommand::Certs { state_dir, store, server, identity, since, limit, output } = command;
    let after = since.map(|d| palisade::clock::now_unix() - d.as_secs() as i64);
    let rows = if server.server.is_some() {
        runtime()?.block_on(admin_client::ledger(&server, identity, after, limit))?
    } else {
        let store = Store::open_with(&state_dir, &store)?;
        let query = control::store::LedgerQuery { identity, issued_after: after, limit, ..Default::default() };
        store.ledger_page(&query)?.into_iter().map(|(row, _)| row).collect()
    };
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<34} {:<52} {:<13} {:<8} NOT AFTER", "SERIAL", "IDENTITY", "CREDENTIAL", "REVOKED");
        for r in rows {
            println!(
                "{:<34} {:<52} {:<13} {:<8} {}",
                r.serial,
                r.spiffe_id,
                r.credential,
                r.revoked,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(r.not_after.max(0) as u64)
                )
            );
        }
    }
    Ok(())
}

/// `palisade control revoke`: through the management API, or in the local store.
fn revoke(
    state_dir: &Path,
    store: &control::store::StoreArgs,
    identity: Option<SpiffeId>,
    serial: Option<String>,
    server: ServerArgs,
) -> anyhow::Result<()> {
    let serial = match serial {
        Some(s) => Some(
            palisade::identity::revocation::normalize_serial(&s)
                .with_context(|| format!("--serial {s:?} is not a hex serial number"))?,
        ),
        None => None,
    };
    if server.server.is_some() {
        let id = identity.as_ref().map(|i| i.to_string());
        runtime()?.block_on(admin_client::revoke(&server, id, serial.clone()))?;
        println!("revoked {}", identity.map(|i| i.to_string()).or(serial).unwrap_or_default());
        return Ok(());
    }
    let store = Store::open_with(state_dir, store)?;
    store.revoke(identity.as_ref().map(|i| i.as_str()), serial.as_deref())?;
    println!("revoked {}", identity.map(|i| i.to_string()).or(serial).unwrap_or_default());
    Ok(())
}

/// `palisade k8s crds`: the CRDs, as files in `out` or on stdout.
fn write_crds(out: Option<PathBuf>) -> anyhow::Result<()> {
    let crds = palisade::k8s::crd::crds();
    match out {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in &crds {
                let path = dir.join(palisade::k8s::crd::file_name(crd));
                std::fs::write(&path, palisade::k8s::crd::to_yaml(crd))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("wrote {} CRDs to {}", crds.len(), dir.display());
        }
        None => {
            let docs: Vec<String> = crds.iter().map(palisade::k8s::crd::to_yaml).collect();
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}

fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let ca_bundle_pem = std::fs::read_to_string(&args.ca_bundle)
        .with_context(|| format!("reading --ca-bundle {}", args.ca_bundle.display()))?;
    let roots = palisade::tls::certs_from_pem(&ca_bundle_pem)
        .with_context(|| format!("--ca-bundle {}: not PEM", args.ca_bundle.display()))?;
    anyhow::ensure!(!roots.is_empty(), "--ca-bundle {}: holds no certificate", args.ca_bundle.display());
    let cfg = InjectConfig {
        image: args.image,
        control_addr: args.control,
        trust_domain: args.trust_domain,
        cni: args.cni,
        ca_bundle_pem,
        ..InjectConfig::default()
    };
    let input = if args.filename.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.filename).with_context(|| format!("reading {}", args.filename.display()))?
    };
    let output = palisade::k8s::inject::inject_yaml(&input, &cfg)
        .with_context(|| format!("cannot inject {}", args.filename.display()))?;
    print!("{output}");
    Ok(())
}

fn main() -> ExitCode {
    palisade::telemetry::init_tracing();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Control { command: None, args } => runtime()?.block_on(control::run(*args))?,
        Command::Control {
            command:
                Some(ControlCommand::Token {
                    command: TokenCommand::Create { state_dir, store, identity, ttl, admin, addresses },
                }),
            ..
        } => {
            let is_admin = control::admin_api::is_admin_identity(&identity, identity.trust_domain());
            if admin && !is_admin {
                anyhow::bail!(
                    "--admin needs an administrator's identity: spiffe://{}/admin/NAME",
                    identity.trust_domain()
                );
            }
            if !admin && identity.path().starts_with(control::admin_api::ADMIN_PATH_PREFIX) {
                anyhow::bail!("{identity} is an administrator's identity: make its token with --admin");
            }
            let store = Store::open_with(&state_dir, &store)?;
            let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
            let token = store.create_bound_join_token(&identity, ttl, &addresses)?;
            println!("{token}");
        }
        Command::Control {
            command: Some(ControlCommand::Ca { command: CaCommand::Rotate { server, .. } }), ..
        } if server.server.is_some() => {
            print!("{}", runtime()?.block_on(admin_client::rotate_ca(&server, false))?);
        }
        Command::Control { command: Some(ControlCommand::Ca { command: CaCommand::Status { server } }), .. } => {
            print!("{}", runtime()?.block_on(admin_client::rotate_ca(&server, true))?);
        }
        Command::Control { command: Some(ControlCommand::Revocations { server }), .. } => {
            let (ids, serials) = runtime()?.block_on(admin_client::revocations(&server))?;
            for id in ids {
                println!("identity {id}");
            }
            for serial in serials {
                println!("serial   {serial}");
            }
        }
        Command::Control { command: Some(ControlCommand::Login { server, token, ca_bundle, credentials }), .. } => {
            let id = runtime()?.block_on(admin_client::login(&server, &token, &ca_bundle, &credentials))?;
            println!("logged in as {id}; credentials in {}", credentials.display());
        }
        Command::Control {
            command:
                Some(ControlCommand::Ca { command: CaCommand::Rotate { state_dir, store, trust_domain, ca_keys, .. } }),
            ..
        } => {
            let store = Store::open_with(&state_dir, &store)?;
            let custody = runtime()?.block_on(ca_keys.custody(None))?;
            let generation = control::ca_set::start_rotation(&store, &trust_domain, &custody)?;
            println!(
                "CA generation {generation} created and added to the trust bundle; the running control plane switches signing once it has reached every sidecar"
            );
        }
        Command::Control {
            command: Some(ControlCommand::Revoke { state_dir, store, identity, serial, server }),
            ..
        } => revoke(&state_dir, &store, identity, serial, server)?,
        Command::Proxy(args) => args.runtime()?.block_on(proxy::run(*args))?,
        Command::Certs { command: CertsCommand::Dev { out } } => {
            let files = palisade::identity::dev::write_dev_certs(&out, Duration::from_secs(30 * 24 * 3600))
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} files to {} (local experiments only; see its README.md)", files.len(), out.display());
        }
        Command::Status { command: None, server, output } => {
            let report = runtime()?.block_on(async {
                let mut client = admin_client::connect(&server).await?;
                control::status::fetch(&mut client).await
            })?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", control::status::render(&report));
            }
        }
        Command::Status { command: Some(command), .. } => status_certs(command)?,
        Command::Init(args) => palisade::init::run(args)?,
        Command::Cni { command: None } => return Ok(palisade::k8s::cni::plugin_main()),
        Command::Cni { command: Some(command) } => palisade::k8s::cni::run(command)?,
        Command::Inject(args) => inject(args)?,
        Command::Policy { command } => return palisade::policy::run(command, palisade::guard::jwt::verify_offline),
        Command::Audit(args) => return palisade::audit::cli::run(&args),
        Command::Demo(args) => runtime()?.block_on(palisade::demo::run(args))?,
        Command::K8s { command: K8sCommand::Crds { out } } => write_crds(out)?,
    }
    Ok(ExitCode::SUCCESS)
}

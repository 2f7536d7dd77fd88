//! `palisade control`: the standalone control plane process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use http::StatusCode;
use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::proto::identity::identity_server::IdentityServer;
use crate::telemetry::admin::{self, AdminRequest};
use crate::tls::{CertStore, TrustBundle, config};

use super::address_proof::AddressProver;
use super::admin_api::{AdminService, AuditLog, Authorizer};
use super::ca_set::{self, CaSet};
use super::discovery::{DiscoveryGrpc, DiscoveryService, MeshSettings, MeshState};
use super::identity_service::IdentityService;
use super::jwks::{JwksInputs, JwksRefetch, JwksStatuses};
use super::shared_ca::SharedCa;
use super::source::{self, ResourceError, Sink};
use super::store::{CredentialKind, Store};
use super::telemetry::{TelemetryService, TrafficGraph};
use crate::identity::SpiffeId;
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::telemetry::telemetry_server::TelemetryServer;

/// Flags of `palisade control`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Directory holding the CA, the certificate ledger and join tokens (created if absent).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = "palisade-state")]
    pub state_dir: PathBuf,
    /// gRPC listen address (TLS).
    #[arg(long, env = "PALISADE_LISTEN", default_value_t = SocketAddr::from(([127, 0, 0, 1], crate::ports::CONTROL_GRPC)))]
    pub listen: SocketAddr,
    /// Admin HTTP listen address: `/ready`, `/live` and `/metrics`, nothing private (the
    /// management API is on the gRPC port, authenticated).
    #[arg(long, env = "PALISADE_ADMIN", default_value_t = SocketAddr::from(([127, 0, 0, 1], crate::ports::CONTROL_ADMIN)))]
    pub admin: SocketAddr,
    /// Trust domain of every identity this control plane issues.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of workload certificates. Below 5 minutes is for testing only.
    #[arg(long, env = "PALISADE_CERT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// Directory of YAML manifests (AuthorizationPolicy, PeerAuthentication, ...), watched.
    #[arg(long, env = "PALISADE_RESOURCES", conflicts_with = "kubernetes")]
    pub resources: Option<PathBuf>,
    /// Kubernetes mode: resources from the CRDs, Pods and Services; the CA from a Secret shared
    /// by every replica; workload identity from service-account tokens (TokenReview); CRD
    /// status written by the leader. The API server is found as kubectl finds it (KUBECONFIG,
    /// else in-cluster).
    #[arg(long, env = "PALISADE_KUBERNETES")]
    pub kubernetes: bool,
    /// Namespace of the control plane (its CA Secret and leader Lease live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "palisade-system")]
    pub namespace: String,
    /// Name of the Secret holding the CA.
    #[arg(long, env = "PALISADE_CA_SECRET", default_value = "palisade-ca")]
    pub ca_secret: String,
    /// This replica's name in the leader election (its pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// How long the leader's Lease lasts without renewal; a dead leader is replaced after it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// HTTPS listener of the sidecar-injection webhook (Kubernetes mode).
    #[arg(long, env = "PALISADE_WEBHOOK")]
    pub webhook: Option<SocketAddr>,
    /// The MutatingWebhookConfiguration whose caBundle this control plane keeps current.
    #[arg(long, default_value = "palisade-sidecar-injector")]
    pub webhook_config: String,
    /// The Service in front of the replicas: named in the webhook's serving certificate.
    #[arg(long, default_value = "palisade-control")]
    pub service_name: String,
    /// Image of the injected init container and sidecar.
    #[arg(long, env = "PALISADE_PROXY_IMAGE", default_value = concat!("ghcr.io/palisade-mesh/palisade:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// Control-plane address injected sidecars dial (default: the Service).
    #[arg(long, env = "PALISADE_INJECT_CONTROL")]
    pub inject_control: Option<String>,
    /// Inject for the CNI mode: the node's `palisade cni` plugin installs the redirect, so
    /// pods get an unprivileged validator instead of the NET_ADMIN init container.
    #[arg(long, env = "PALISADE_INJECT_CNI")]
    pub inject_cni: bool,
    /// What a workload with no ALLOW policy does: `deny` (zero trust), `allow-authenticated`
    /// (any mesh identity), or `allow`.
    #[arg(long, env = "PALISADE_DEFAULT_POLICY", default_value = "deny",
          value_parser = ["deny", "allow-authenticated", "allow"])]
    pub default_policy: String,
    /// Destinations outside the mesh: `allow` (plain TCP pass-through) or `deny`.
    #[arg(long, env = "PALISADE_EGRESS", default_value = "allow", value_parser = ["allow", "deny"])]
    pub egress: String,
    /// Path normalization before any decision (see docs/security.md): `NONE`, `BASE`,
    /// `MERGE_SLASHES` or `DECODE_AND_MERGE_SLASHES`. Below the last, encoded slashes and
    /// backslashes are refused with 400.
    #[arg(long, env = "PALISADE_PATH_NORMALIZATION", default_value = "MERGE_SLASHES",
          value_parser = clap::value_parser!(crate::guard::path::Normalization))]
    pub path_normalization: crate::guard::path::Normalization,
    /// PEM roots trusted for `jwksUri` fetches besides the system's (repeatable).
    #[arg(long)]
    pub jwks_ca: Vec<PathBuf>,
    /// How often each `jwksUri` in force is fetched again (key rotations at the issuer reach
    /// sidecars within this; a token naming an unknown `kid` fetches at once, at most once per
    /// 30 s per uri).
    #[arg(long, env = "PALISADE_JWKS_REFRESH", default_value = "5m", value_parser = humantime::parse_duration)]
    pub jwks_refresh: Duration,
    /// Changes are batched for this long before they are pushed.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,
    /// Where every management API call is recorded, one JSON object per line (default:
    /// `STATE_DIR/audit.log`). Each is also logged as a `palisade::audit` event.
    #[arg(long, env = "PALISADE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// How long a disconnected sidecar's endpoints stay in the table.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub endpoint_grace: Duration,
    /// Where the CA's private keys are kept (KEK, PKCS#11 token).
    #[command(flatten)]
    pub ca_keys: super::ca_keys::CaKeyArgs,
    /// Where the state lives: SQLite in the state directory, or PostgreSQL shared by replicas.
    #[command(flatten)]
    pub store: super::store::StoreArgs,
}

/// Lifetime of the control plane's own serving certificate; it renews at half of it.
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The control plane's inputs, built once by [`run`] and handed to each worker.
struct ControlInputs {
    args: ControlArgs,
    store: Arc<Store>,
    /// Where the CA's private keys are kept.
    custody: crate::identity::KeyCustody,
    /// The CA generations in force; written only by the CA worker.
    ca: Arc<ArcSwap<CaSet>>,
    /// The roots the gRPC listener verifies clients against; written only by the CA worker.
    bundle: Arc<TrustBundle>,
    own_id: SpiffeId,
    /// The serving certificate of gRPC and the webhook.
    serving: Arc<CertStore>,
    serving_names: Vec<String>,
    mesh: Arc<MeshState>,
    graph: Arc<TrafficGraph>,
    resource_errors: Arc<ArcSwap<Vec<ResourceError>>>,
    kube: Option<kube::Client>,
    /// The TLS client of `jwksUri` fetches.
    jwks_tls: Arc<rustls::ClientConfig>,
    jwks_status: JwksStatuses,
    /// Unknown-`kid` hints from sidecars' reports, for the JWKS worker.
    jwks_refetch: Arc<JwksRefetch>,
    /// Wakes the CA worker; with `ca_reload` set, it reloads the CA and revocations from the
    /// store even though no other process wrote it (the admin API did).
    ca_wake: Arc<tokio::sync::Notify>,
    ca_reload: Arc<std::sync::atomic::AtomicBool>,
    /// Kubernetes: the CA generations shared through the CA Secret (the truth the store mirrors).
    shared_ca: Option<Arc<SharedCa>>,
    audit: Arc<AuditLog>,
    /// What the admin port's `/metrics` serves.
    metrics: Arc<super::metrics::ControlMetrics>,
    /// This replica among the others sharing its store.
    replicas: Arc<super::replicas::Replicas>,
}

/// Runs the control plane until SIGTERM or Ctrl-C.
pub async fn run(args: ControlArgs) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let inputs = Arc::new(ControlInputs::build(args).await?);
    let args = &inputs.args;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin).await.with_context(|| format!("binding {}", args.admin))?;
    tracing::info!(listen = %args.listen, admin = %args.admin, state_dir = %args.state_dir.display(),
        store = %inputs.store.describe(), trust_domain = %args.trust_domain, cert_ttl = ?args.cert_ttl, "control plane started");
    let serving_not_after = issue_serving_cert(&inputs)?;
    tokio::spawn(inputs.mesh.clone().run());
    tokio::spawn(inputs.replicas.clone().publish());
    let leading = start_source(&inputs).await?;
    tokio::spawn(super::jwks::run(JwksInputs {
        mesh: inputs.mesh.clone(),
        refresh: args.jwks_refresh,
        tls: inputs.jwks_tls.clone(),
        status: inputs.jwks_status.clone(),
        refetch: inputs.jwks_refetch.clone(),
        metrics: inputs.metrics.clone(),
    }));
    start_webhook(&inputs).await?;
    serve_admin(&inputs, admin_listener)?;
    tokio::spawn(run_ca(inputs.clone(), serving_not_after));
    if let Some(leading) = leading {
        tokio::spawn(run_ca_leader(inputs.clone(), leading));
    }
    serve_grpc(&inputs, listener).await?;
    tracing::info!("control plane stopped");
    Ok(())
}

impl ControlInputs {
    /// Opens the store, loads (or creates, or on Kubernetes adopts) the CA, and builds the
    /// mesh state. Nothing is bound yet.
    async fn build(args: ControlArgs) -> anyhow::Result<Self> {
        if args.cert_ttl < Duration::from_secs(2) {
            anyhow::bail!("--cert-ttl {:?} is too short to renew in time; use at least 2s", args.cert_ttl);
        }
        if args.cert_ttl < Duration::from_secs(300) {
            tracing::warn!(cert_ttl = ?args.cert_ttl, "certificate lifetime under 5 minutes: for testing only");
        }
        if args.webhook.is_some() && !args.kubernetes {
            anyhow::bail!("--webhook needs --kubernetes: injection reads namespace labels from the API server");
        }
        let own_id = SpiffeId::control_plane(&args.trust_domain)
            .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
        let store = Arc::new(Store::open_with(&args.state_dir, &args.store)?);
        let (ca_wake, ca_reload) =
            (Arc::new(tokio::sync::Notify::new()), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let (kube, custody, shared_revocations, shared_ca) = if args.kubernetes {
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API server")?;
            let custody = args.ca_keys.custody(Some((&client, &args.namespace))).await?;
            let generations = crate::k8s::ca_secret::load_or_create(
                client.clone(),
                &args.namespace,
                &args.ca_secret,
                &args.trust_domain,
                &custody,
            )
            .await
            .context("loading the CA Secret")?;
            // The Secret's generations as they stand: a restart never undoes a rotation.
            super::shared_ca::adopt(&store, &generations, &custody)?;
            // Every replica's revocations, before this one issues anything.
            let revoked = crate::k8s::revocations::read(&client, &args.namespace).await?;
            let shared_ca = SharedCa::new(
                client.clone(),
                args.namespace.clone(),
                args.ca_secret.clone(),
                custody.clone(),
                ca_wake.clone(),
                ca_reload.clone(),
            );
            (Some(client), custody, Some(revoked), Some(Arc::new(shared_ca)))
        } else {
            (None, args.ca_keys.custody(None).await?, None, None)
        };
        let ca_set = CaSet::load_or_init(&store, &args.trust_domain, &custody)?;
        ca_set.export_bundle(&args.state_dir)?;
        let bundle = TrustBundle::from_pem(ca_set.bundle_pem())?;
        let ca = Arc::new(ArcSwap::from_pointee(ca_set));
        // The same certificate serves gRPC (checked by SPIFFE ID) and the webhook (checked by the
        // API server by DNS name or address).
        let svc = format!("{}.{}.svc", args.service_name, args.namespace);
        let serving_names =
            vec![svc.clone(), format!("{svc}.cluster.local"), "localhost".into(), "127.0.0.1".into(), "::1".into()];
        let settings = MeshSettings {
            trust_domain: args.trust_domain.clone(),
            default_policy: args.default_policy.clone(),
            egress: args.egress.clone(),
            path_normalization: args.path_normalization,
            debounce: args.debounce,
            endpoint_grace: args.endpoint_grace,
        };
        if args.jwks_refresh < Duration::from_secs(1) {
            anyhow::bail!("--jwks-refresh {:?} is too short; use at least 1s", args.jwks_refresh);
        }
        let jwks_tls = super::jwks::client_config(&args.jwks_ca)?;
        let mesh = MeshState::new(settings, ca.clone(), store.clone());
        let (shared_ids, shared_serials) = shared_revocations.unwrap_or_default();
        mesh.adopt_revocations(&shared_ids, &shared_serials)?;
        let audit =
            Arc::new(AuditLog::open(&args.audit_log.clone().unwrap_or_else(|| args.state_dir.join("audit.log")))?);
        let graph = Arc::new(TrafficGraph::default());
        let replicas = Arc::new(super::replicas::Replicas {
            name: replica_name(&args),
            store: store.clone(),
            mesh: mesh.clone(),
            graph: graph.clone(),
        });
        Ok(ControlInputs {
            args,
            store,
            custody,
            ca,
            bundle,
            own_id,
            serving: CertStore::new(),
            serving_names,
            mesh,
            graph,
            resource_errors: Arc::new(ArcSwap::from_pointee(Vec::new())),
            kube,
            jwks_tls,
            jwks_status: Default::default(),
            jwks_refetch: Default::default(),
            ca_wake,
            ca_reload,
            shared_ca,
            audit,
            metrics: Default::default(),
            replicas,
        })
    }
}

/// This replica's name among the others: its pod name, else its host name and gRPC port.
fn replica_name(args: &ControlArgs) -> String {
    if let Some(pod) = &args.pod_name {
        return pod.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", args.listen.port())
}

/// Reads the configuration source (a resources directory, or the Kubernetes API with leader
/// election for CRD status and CA rotation steps) before anything is served, then follows it;
/// on Kubernetes, also watches the shared revocations and CA Secret. Returns whether this
/// replica leads (Kubernetes only).
async fn start_source(inputs: &ControlInputs) -> anyhow::Result<Option<tokio::sync::watch::Receiver<bool>>> {
    let sink = Sink { mesh: inputs.mesh.clone(), errors: inputs.resource_errors.clone() };
    let args = &inputs.args;
    if let Some(client) = &inputs.kube {
        let identity =
            args.pod_name.clone().unwrap_or_else(|| format!("palisade-control-{:08x}", rand::random::<u32>()));
        let leader = crate::k8s::lease::Election {
            namespace: args.namespace.clone(),
            name: "palisade-control-leader".into(),
            identity: identity.clone(),
            lease_duration: args.lease_duration,
        }
        .spawn(client.clone());
        let mesh = inputs.mesh.clone();
        tokio::spawn(crate::k8s::revocations::watch(client.clone(), args.namespace.clone(), move |(ids, serials)| {
            // A few rows written at most, and only for a revocation this replica had not seen.
            if let Err(e) = mesh.adopt_revocations(&ids, &serials) {
                tracing::error!(error = %e, "cannot record the revocations shared by the other replicas");
            }
        }));
        if let Some(shared) = inputs.shared_ca.clone() {
            let (ns, name, custody) = (shared.namespace.clone(), shared.name.clone(), shared.custody.clone());
            let offer = shared.clone();
            tokio::spawn(crate::k8s::ca_secret::watch(client.clone(), ns, name, custody, move |generations| {
                offer.offer(generations)
            }));
        }
        let kube = source::kubernetes::KubeSource::new(client.clone(), args.trust_domain.clone(), leader.clone());
        let (crds, crds_changed) = kube.crds();
        tokio::spawn(source::kube_rollout::run(client.clone(), identity, crds, crds_changed, inputs.mesh.clone()));
        source::start(kube, sink).await?;
        return Ok(Some(leader));
    } else if let Some(dir) = &args.resources {
        let files = source::file::FileSource::new(dir).with_context(|| format!("--resources {}", dir.display()))?;
        source::start(files, sink).await.with_context(|| format!("reading --resources {}", dir.display()))?;
    }
    Ok(None)
}

/// The sidecar-injection webhook, and the keeper of its configuration's caBundle.
async fn start_webhook(inputs: &ControlInputs) -> anyhow::Result<()> {
    let args = &inputs.args;
    let (Some(addr), Some(client)) = (args.webhook, &inputs.kube) else { return Ok(()) };
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding webhook {addr}"))?;
    let inject = crate::k8s::inject::InjectConfig {
        image: args.proxy_image.clone(),
        control_addr: args
            .inject_control
            .clone()
            .unwrap_or_else(|| format!("{}.{}.svc:{}", args.service_name, args.namespace, args.listen.port())),
        trust_domain: args.trust_domain.clone(),
        cni: args.inject_cni,
        ..Default::default()
    };
    // The current trust bundle, read where it is used: injected pods get the roots of the
    // moment, and the keeper writes them into the webhook configuration's caBundle.
    let ca = inputs.ca.clone();
    let roots: crate::k8s::webhook::Roots = Arc::new(move || ca.load().bundle_pem().to_string());
    tokio::spawn(crate::k8s::webhook::serve(listener, inputs.serving.clone(), client.clone(), inject, roots.clone()));
    tokio::spawn(crate::k8s::webhook::keep_ca_bundle(client.clone(), args.webhook_config.clone(), roots));
    tracing::info!(%addr, "sidecar-injection webhook listening");
    Ok(())
}

/// The admin HTTP port, on its own runtime.
fn serve_admin(inputs: &Arc<ControlInputs>, listener: TcpListener) -> anyhow::Result<()> {
    let inputs = inputs.clone();
    admin::spawn_on_own_runtime(listener, move |req: AdminRequest| {
        let inputs = inputs.clone();
        async move { admin_answer(&inputs, &req).await }
    })?;
    Ok(())
}

/// The admin HTTP port holds nothing private: health and metrics. Everything else is on the
/// authenticated management API (`palisade.admin.v1.Admin`, on the gRPC port).
async fn admin_answer(inputs: &ControlInputs, req: &AdminRequest) -> admin::AdminResponse {
    match req.path.as_str() {
        "/ready" | "/live" => admin::respond(StatusCode::OK, "text/plain", "ok\n"),
        "/metrics" => {
            inputs.metrics.set_ca_roots(&inputs.ca.load().root_validity());
            inputs.metrics.set_ledger_commits(inputs.store.ledger_commits());
            admin::respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                inputs.metrics.render(),
            )
        }
        _ => admin::respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Most connections the gRPC port holds at once (each sidecar holds one), lowered to fit the
/// descriptor limit; `PALISADE_GRPC_MAX_CONNECTIONS` sets it.
const GRPC_MAX_CONNECTIONS: usize = 16_384;
/// An idle gRPC connection is pinged this often; one that does not answer is closed.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(30);
/// Most concurrent streams one gRPC connection may open.
const GRPC_MAX_STREAMS: u32 = 32;
/// How long calls in flight may take to finish once the control plane is asked to stop.
const GRPC_DRAIN: Duration = Duration::from_secs(3);

/// Accepts TLS connections for the gRPC services until shutdown.
async fn serve_grpc(inputs: &ControlInputs, listener: TcpListener) -> anyhow::Result<()> {
    let tls = TlsAcceptor::from(config::server_config(
        inputs.serving.clone(),
        inputs.bundle.clone(),
        false,
        &[config::ALPN_H2],
    ));
    // Every connection holds a place under the cap from accept to close (half-sent handshakes
    // too), must finish its TLS handshake and send its HTTP/2 preface within the header
    // timeout, and is closed once silent for the idle timeout: HTTP/2 keepalive pings an idle
    // client every GRPC_KEEPALIVE, so a live one is never silent that long.
    let limits = crate::listener::ListenerLimits::from_env("grpc", GRPC_MAX_CONNECTIONS);
    let limits =
        crate::listener::ListenerLimits { idle_timeout: limits.idle_timeout.max(GRPC_KEEPALIVE * 3), ..limits };
    let listener = Arc::new(crate::listener::Listener::new(listener, "grpc", limits));
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, remote, admitted) = listener.accept().await;
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let conn_tx = conn_tx.clone();
            let listener = listener.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.header_timeout, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(listener.deadline(stream, admitted))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%remote, error = %e,
                        reason = crate::tls::handshake_failure_reason(&e), "control-plane TLS handshake refused"),
                    Err(_) => tracing::info!(%remote, "control-plane TLS handshake timed out"),
                }
            });
        }
    });
    let identity = IdentityService {
        store: inputs.store.clone(),
        ca: inputs.ca.clone(),
        cert_ttl: inputs.args.cert_ttl,
        attestor: inputs.kube.clone().map(|c| crate::k8s::attest::Attestor::new(c, &inputs.args.trust_domain)),
        metrics: inputs.metrics.clone(),
        mesh: inputs.mesh.clone(),
    };
    let identity = super::metrics::MeteredIdentity { inner: identity, metrics: inputs.metrics.clone() };
    let (stop_tx, mut stopping) = tokio::sync::watch::channel(false);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // A sidecar uses three streams (Certify, Discovery, Telemetry).
        .max_concurrent_streams(Some(GRPC_MAX_STREAMS))
        .http2_max_header_list_size(Some(16 * 1024))
        .http2_max_pending_accept_reset_streams(Some(20))
        .add_service(IdentityServer::new(identity))
        .add_service(DiscoveryGrpc(Arc::new(DiscoveryService {
            mesh: inputs.mesh.clone(),
            metrics: inputs.metrics.clone(),
            prover: Arc::new(AddressProver {
                store: inputs.store.clone(),
                kubernetes: inputs.kube.is_some(),
                serving: inputs.serving.clone(),
                trust: inputs.bundle.clone(),
            }),
        })))
        .add_service(AdminServer::new(admin_service(inputs)))
        .add_service(TelemetryServer::new(TelemetryService {
            graph: inputs.graph.clone(),
            store: inputs.store.clone(),
            jwks_refetch: inputs.jwks_refetch.clone(),
        }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(conn_rx), async move {
            crate::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.context("gRPC server"),
        _ = stopping.wait_for(|stop| *stop) => {}
    }
    // Graceful shutdown waits for every open stream, and a sidecar's discovery and telemetry
    // streams never end by themselves: calls in flight get GRPC_DRAIN, then the streams are cut
    // and their sidecars resume at another replica (or at this one when it is back).
    match tokio::time::timeout(GRPC_DRAIN, server).await {
        Ok(result) => result.context("gRPC server"),
        Err(_) => {
            tracing::info!(drain = ?GRPC_DRAIN, "shutdown: closing the sidecars' open streams");
            Ok(())
        }
    }
}

/// The management API's service, authorizing by RBAC on Kubernetes and by administrators'
/// certificates standalone.
fn admin_service(inputs: &ControlInputs) -> AdminService {
    let authorizer = match &inputs.kube {
        Some(client) => Authorizer::kubernetes(client.clone(), &inputs.args.namespace),
        None => Authorizer::Standalone { trust_domain: inputs.args.trust_domain.clone() },
    };
    let (wake, reload) = (inputs.ca_wake.clone(), inputs.ca_reload.clone());
    AdminService {
        shared_ca: inputs.shared_ca.clone(),
        authorizer,
        audit: inputs.audit.clone(),
        mesh: inputs.mesh.clone(),
        store: inputs.store.clone(),
        ca: inputs.ca.clone(),
        graph: inputs.graph.clone(),
        resource_errors: inputs.resource_errors.clone(),
        jwks_status: inputs.jwks_status.clone(),
        ca_changed: Arc::new(move || {
            reload.store(true, std::sync::atomic::Ordering::SeqCst);
            wake.notify_one();
        }),
        propagation: propagation(&inputs.args),
        shared_revocations: inputs.kube.clone().map(|c| (c, inputs.args.namespace.clone())),
        custody: inputs.custody.clone(),
        cert_ttl: inputs.args.cert_ttl,
        replicas: inputs.replicas.clone(),
    }
}

/// How long a new root takes to reach every sidecar: each renews within 60% of a lifetime,
/// and its fresh certificate carries the new bundle.
fn propagation(args: &ControlArgs) -> Duration {
    args.cert_ttl + Duration::from_secs(2)
}

/// The CA worker, the only writer of the CA view and the serving trust bundle: it takes CA and
/// revocation changes the CLI writes to the store (woken by a watch on the state directory, not
/// by polling), advances rotations when their time comes, and renews the serving certificate.
async fn run_ca(inputs: Arc<ControlInputs>, mut serving_not_after: i64) {
    let changed = inputs.ca_wake.clone();
    let _watcher = match inputs.store.watch(changed.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the store: changes made elsewhere reach this process at CA steps only");
            None
        }
    };
    loop {
        let step = {
            let inputs = inputs.clone();
            tokio::task::spawn_blocking(move || ca_step(&inputs, serving_not_after)).await
        };
        let wake_at = match step {
            Ok(Ok(step)) => {
                serving_not_after = step.serving_not_after;
                step.wake_at
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "CA maintenance failed; retrying");
                crate::clock::now_unix() + 1
            }
            Err(e) => {
                tracing::error!(error = %e, "CA maintenance panicked; retrying");
                crate::clock::now_unix() + 1
            }
        };
        let wait = Duration::from_secs((wake_at - crate::clock::now_unix()).max(0) as u64);
        tracing::debug!(?wait, "CA worker waits for a store change or its next step");
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Kubernetes: while this replica leads, it advances a rotation in the shared CA Secret when
/// its steps come due (woken by the Secret's watch, a change of leadership, or the step's
/// time); every replica, this one included, takes the result from its watch.
async fn run_ca_leader(inputs: Arc<ControlInputs>, mut leading: tokio::sync::watch::Receiver<bool>) {
    let Some(shared) = inputs.shared_ca.clone() else { return };
    let propagation = propagation(&inputs.args);
    let idle = Duration::from_secs(3600);
    loop {
        let leads = *leading.borrow_and_update();
        let wait = if leads {
            match shared.advance(propagation, inputs.args.cert_ttl).await {
                Ok(Some(at)) => Duration::from_secs((at - crate::clock::now_unix()).max(0) as u64),
                Ok(None) => idle,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot advance the CA rotation in the shared Secret; retrying");
                    Duration::from_secs(1)
                }
            }
        } else {
            idle
        };
        // Never spin, whatever the clocks say.
        let deadline = tokio::time::Instant::now() + wait.max(Duration::from_millis(200));
        loop {
            tokio::select! {
                // The election reports every renewal; only a change of leadership matters.
                changed = leading.changed() => match changed {
                    Err(_) => return,
                    Ok(()) if *leading.borrow() != leads => break,
                    Ok(()) => {}
                },
                _ = shared.poke.notified() => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
}

/// What one pass of the CA worker decided.
struct CaStep {
    serving_not_after: i64,
    /// When to look again without being woken (Unix seconds).
    wake_at: i64,
}

/// One pass of the CA worker (blocking: it reads and writes the store).
fn ca_step(inputs: &ControlInputs, serving_not_after: i64) -> anyhow::Result<CaStep> {
    let args = &inputs.args;
    let changed_elsewhere =
        inputs.store.changed_elsewhere()? | inputs.ca_reload.swap(false, std::sync::atomic::Ordering::SeqCst);
    tracing::debug!(changed_elsewhere, "CA worker woken");
    // A new root must reach every sidecar before it signs.
    let propagation = propagation(args);
    let advanced = match &inputs.shared_ca {
        // Kubernetes: the leader advances the shared Secret; this store mirrors what it says.
        Some(shared) => match shared.take_pending() {
            Some(generations) => super::shared_ca::adopt(&inputs.store, &generations, &inputs.custody)?,
            None => false,
        },
        None => ca_set::advance_rotation(&inputs.store, propagation, args.cert_ttl)?,
    };
    let cur = inputs.ca.load_full();
    let mut signer_changed = false;
    if changed_elsewhere || advanced {
        let fresh = CaSet::load_or_init(&inputs.store, &args.trust_domain, &inputs.custody)?;
        signer_changed = fresh.active_generation() != cur.active_generation();
        if fresh.fingerprint() != cur.fingerprint() {
            inputs.bundle.set_roots(fresh.bundle_pem())?;
            fresh.export_bundle(&args.state_dir)?;
            tracing::info!(active = fresh.active_generation(), "CA state changed; trust bundle updated");
            inputs.ca.store(Arc::new(fresh));
            inputs.mesh.mark_dirty();
        }
        let (ids, serials) = inputs.store.revocations()?;
        inputs.mesh.set_revocations(ids, serials);
    }
    let renew_at = serving_not_after - (SERVING_CERT_LIFETIME / 2).as_secs() as i64;
    let now = crate::clock::now_unix();
    let serving_not_after =
        if signer_changed || now >= renew_at { issue_serving_cert(inputs)? } else { serving_not_after };
    let renew_at = serving_not_after - (SERVING_CERT_LIFETIME / 2).as_secs() as i64;
    let wake_at = inputs.ca.load().next_step_at(propagation).map_or(renew_at, |t| t.min(renew_at));
    Ok(CaStep { serving_not_after, wake_at })
}

/// Signs the control plane's own serving certificate and installs it.
fn issue_serving_cert(inputs: &ControlInputs) -> anyhow::Result<i64> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca = inputs.ca.load();
    let issued = ca.signer().sign_workload(&inputs.own_id, &key, SERVING_CERT_LIFETIME, &inputs.serving_names)?;
    inputs.store.record_certificate(&issued, CredentialKind::ControlPlane)?;
    let chain = crate::tls::certs_from_pem(&issued.chain_pem)?;
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))?;
    inputs.serving.set(Arc::new(CertifiedKey::new(chain, signing_key)), issued.not_after);
    Ok(issued.not_after)
}

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

use super::ca_set::{self, CaSet};
use super::discovery::{DiscoveryService, MeshSettings, MeshState};
use super::identity_service::{IdentityService, control_plane_identity};
use super::resources::{FileSource, ResourceError};
use super::store::{CredentialKind, Store};
use super::telemetry::{TelemetryService, TrafficGraph};
use crate::proto::discovery::discovery_server::DiscoveryServer;
use crate::proto::telemetry::telemetry_server::TelemetryServer;

/// Flags of `palisade control`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Directory holding the CA, the certificate ledger and join tokens (created if absent).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = "palisade-state")]
    pub state_dir: PathBuf,
    /// gRPC listen address (TLS).
    #[arg(long, env = "PALISADE_LISTEN", default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (`/ready`, `/metrics`).
    #[arg(long, env = "PALISADE_ADMIN", default_value = "127.0.0.1:15014")]
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
    #[arg(long, env = "PALISADE_PROXY_IMAGE", default_value = "ghcr.io/palisade-mesh/palisade:0.1.0")]
    pub proxy_image: String,
    /// Control-plane address injected sidecars dial (default: the Service).
    #[arg(long, env = "PALISADE_INJECT_CONTROL")]
    pub inject_control: Option<String>,
    /// What a workload with no ALLOW policy does: `deny` (zero trust), `allow-authenticated`
    /// (any mesh identity), or `allow`.
    #[arg(long, env = "PALISADE_DEFAULT_POLICY", default_value = "deny",
          value_parser = ["deny", "allow-authenticated", "allow"])]
    pub default_policy: String,
    /// Destinations outside the mesh: `allow` (plain TCP pass-through) or `deny`.
    #[arg(long, env = "PALISADE_EGRESS", default_value = "allow", value_parser = ["allow", "deny"])]
    pub egress: String,
    /// Changes are batched for this long before they are pushed.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,
    /// How long a disconnected sidecar's endpoints stay in the table.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub endpoint_grace: Duration,
}

/// Lifetime of the control plane's own serving certificate; it renews at half of it.
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Runs the control plane until SIGTERM or Ctrl-C.
pub async fn run(args: ControlArgs) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    if args.cert_ttl < Duration::from_secs(2) {
        anyhow::bail!("--cert-ttl {:?} is too short to renew in time; use at least 2s", args.cert_ttl);
    }
    if args.cert_ttl < Duration::from_secs(300) {
        tracing::warn!(cert_ttl = ?args.cert_ttl, "certificate lifetime under 5 minutes: for testing only");
    }
    let store = Arc::new(Store::open(&args.state_dir)?);
    let kube = if args.kubernetes {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API server")?;
        let material =
            crate::k8s::ca_secret::load_or_create(client.clone(), &args.namespace, &args.ca_secret, &args.trust_domain)
                .await
                .context("loading the CA Secret")?;
        CaSet::adopt(&store, &material)?;
        Some(client)
    } else {
        None
    };
    let ca_set = CaSet::load_or_init(&store, &args.trust_domain)?;
    ca_set.export_bundle(&args.state_dir)?;
    let bundle = TrustBundle::from_pem(ca_set.bundle_pem())?;
    let ca = Arc::new(ArcSwap::from_pointee(ca_set));

    let own_id = control_plane_identity(&args.trust_domain);
    let serving = CertStore::new();
    // The same certificate serves gRPC (checked by SPIFFE ID) and the webhook (checked by the API
    // server by DNS name or address).
    let svc = format!("{}.{}.svc", args.service_name, args.namespace);
    let serving_names: Vec<String> =
        vec![svc.clone(), format!("{svc}.cluster.local"), "localhost".into(), "127.0.0.1".into(), "::1".into()];
    let mut serving_not_after = issue_serving_cert(&store, &ca.load(), &own_id, &serving, &serving_names)?;

    let tls = TlsAcceptor::from(config::server_config(serving.clone(), bundle.clone(), false, &[config::ALPN_H2]));
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin).await.with_context(|| format!("binding {}", args.admin))?;
    tracing::info!(listen = %args.listen, admin = %args.admin, state_dir = %args.state_dir.display(),
        trust_domain = %args.trust_domain, cert_ttl = ?args.cert_ttl, "control plane started");

    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%remote, error = %e,
                        reason = crate::tls::handshake_failure_reason(&e), "control-plane TLS handshake refused"),
                    Err(_) => tracing::info!(%remote, "control-plane TLS handshake timed out"),
                }
            });
        }
    });

    let mesh = MeshState::new(
        MeshSettings {
            trust_domain: args.trust_domain.clone(),
            default_policy: args.default_policy.clone(),
            egress: args.egress.clone(),
            debounce: args.debounce,
            endpoint_grace: args.endpoint_grace,
        },
        ca.clone(),
        store.clone(),
    );
    tokio::spawn(mesh.clone().run());
    let graph = Arc::new(TrafficGraph::default());
    let resource_errors = Arc::new(ArcSwap::from_pointee(Vec::<ResourceError>::new()));
    if let Some(client) = &kube {
        let identity =
            args.pod_name.clone().unwrap_or_else(|| format!("palisade-control-{:08x}", rand::random::<u32>()));
        let leader = crate::k8s::lease::Election {
            namespace: args.namespace.clone(),
            name: "palisade-control-leader".into(),
            identity,
            lease_duration: args.lease_duration,
        }
        .spawn(client.clone());
        crate::k8s::source::KubeSource {
            client: client.clone(),
            trust_domain: args.trust_domain.clone(),
            mesh: mesh.clone(),
            errors: resource_errors.clone(),
            leader: leader.clone(),
        }
        .start()
        .await?;
    }
    if let Some(addr) = args.webhook {
        let Some(client) = &kube else {
            anyhow::bail!("--webhook needs --kubernetes: injection reads namespace labels from the API server");
        };
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding webhook {addr}"))?;
        let inject = crate::k8s::inject::InjectConfig {
            image: args.proxy_image.clone(),
            control_addr: args.inject_control.clone().unwrap_or_else(|| format!("{svc}:{}", args.listen.port())),
            trust_domain: args.trust_domain.clone(),
            ..Default::default()
        };
        // The current trust bundle, read where it is used: injected pods get the roots of the
        // moment, and the keeper writes them into the webhook configuration's caBundle.
        let ca = ca.clone();
        let roots: crate::k8s::webhook::Roots = Arc::new(move || ca.load().bundle_pem().to_string());
        tokio::spawn(crate::k8s::webhook::serve(listener, serving.clone(), client.clone(), inject, roots.clone()));
        tokio::spawn(crate::k8s::webhook::keep_ca_bundle(client.clone(), args.webhook_config.clone(), roots));
        tracing::info!(%addr, "sidecar-injection webhook listening");
    }
    if let Some(dir) = args.resources.clone() {
        if !dir.is_dir() {
            anyhow::bail!("--resources {}: not a directory", dir.display());
        }
        let mesh = mesh.clone();
        let errors = resource_errors.clone();
        let mut source = FileSource::new(&dir);
        source.load_initial().with_context(|| format!("reading --resources {}", dir.display()))?;
        mesh.set_resources(source.resources());
        errors.store(Arc::new(source.errors()));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FileSource::INTERVAL);
            loop {
                tick.tick().await;
                match source.poll() {
                    Ok(true) => {
                        mesh.set_resources(source.resources());
                        errors.store(Arc::new(source.errors()));
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(dir = %dir.display(), error = %e, "cannot read resources directory"),
                }
            }
        });
    }

    {
        let (mesh, store, errors, graph) = (mesh.clone(), store.clone(), resource_errors.clone(), graph.clone());
        admin::spawn_on_own_runtime(admin_listener, move |req: AdminRequest| {
            let (mesh, store, errors, graph) = (mesh.clone(), store.clone(), errors.clone(), graph.clone());
            async move {
                match req.path.as_str() {
                    "/ready" | "/live" => admin::respond(StatusCode::OK, "text/plain", "ok\n"),
                    "/v1/sidecars" => admin::json(StatusCode::OK, &mesh.sidecars()),
                    "/v1/resources/errors" => {
                        let errs: Vec<String> = errors.load().iter().map(|e| e.to_string()).collect();
                        admin::json(StatusCode::OK, &errs)
                    }
                    "/v1/certificates" => match tokio::task::spawn_blocking(move || store.certificates(None, 1000))
                        .await
                    {
                        Ok(Ok(rows)) => admin::json(StatusCode::OK, &rows),
                        _ => admin::respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "ledger unavailable\n"),
                    },
                    "/v1/mesh" => admin::json(StatusCode::OK, &mesh.settings),
                    "/v1/traffic" => admin::json(StatusCode::OK, &graph.edges()),
                    "/v1/events" => admin::json(StatusCode::OK, &graph.events()),
                    _ => admin::respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
                }
            }
        })?;
    }

    // Keeps the CA view in step with the store (the CLI may start a rotation while we run),
    // advances rotations, and renews the serving certificate.
    {
        let store = store.clone();
        let ca = ca.clone();
        let bundle = bundle.clone();
        let state_dir = args.state_dir.clone();
        let ttl = args.cert_ttl;
        let trust_domain = args.trust_domain.clone();
        let mesh = mesh.clone();
        tokio::spawn(async move {
            // Fast enough that a revocation made with the CLI is pushed well within a second.
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let res: anyhow::Result<()> = (|| {
                    // A new root must reach every sidecar before it signs: each renews within
                    // 60% of a lifetime, and its fresh certificate carries the new bundle.
                    ca_set::advance_rotation(&store, ttl + Duration::from_secs(2), ttl)?;
                    let fresh = CaSet::load_or_init(&store, &trust_domain)?;
                    let cur = ca.load();
                    let signer_changed = fresh.active_generation() != cur.active_generation();
                    if fresh.fingerprint() != cur.fingerprint() {
                        bundle.set_roots(fresh.bundle_pem())?;
                        fresh.export_bundle(&state_dir)?;
                        tracing::info!(active = fresh.active_generation(), "CA state changed; trust bundle updated");
                        ca.store(Arc::new(fresh));
                        mesh.mark_dirty();
                    }
                    let (ids, serials) = store.revocations()?;
                    mesh.set_revocations(ids, serials);
                    let half_life = (SERVING_CERT_LIFETIME / 2).as_secs() as i64;
                    if signer_changed || crate::clock::now_unix() >= serving_not_after - half_life {
                        serving_not_after = issue_serving_cert(&store, &ca.load(), &own_id, &serving, &serving_names)?;
                    }
                    Ok(())
                })();
                if let Err(e) = res {
                    tracing::error!(error = %e, "CA maintenance failed");
                }
            }
        });
    }

    let service = IdentityService {
        store: store.clone(),
        ca: ca.clone(),
        cert_ttl: args.cert_ttl,
        attestor: kube.clone().map(|c| crate::k8s::attest::Attestor::new(c, &args.trust_domain)),
    };
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(service))
        .add_service(DiscoveryServer::new(DiscoveryService { mesh: mesh.clone() }))
        .add_service(TelemetryServer::new(TelemetryService { graph: graph.clone() }))
        .serve_with_incoming_shutdown(incoming, crate::shutdown_signal())
        .await
        .context("gRPC server")?;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Signs the control plane's own serving certificate and installs it.
fn issue_serving_cert(
    store: &Store,
    ca: &CaSet,
    id: &crate::identity::SpiffeId,
    serving: &CertStore,
    names: &[String],
) -> anyhow::Result<i64> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued = ca.signer().sign_workload(id, &key, SERVING_CERT_LIFETIME, names)?;
    store.record_certificate(&issued, CredentialKind::ControlPlane)?;
    let chain = crate::tls::certs_from_pem(&issued.chain_pem)?;
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))?;
    serving.set(Arc::new(CertifiedKey::new(chain, signing_key)), issued.not_after);
    Ok(issued.not_after)
}

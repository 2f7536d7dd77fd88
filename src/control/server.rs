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
use super::identity_service::{IdentityService, control_plane_identity};
use super::store::{CredentialKind, Store};

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
}

/// Lifetime of the control plane's own serving certificate; it renews at half of it.
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Runs the control plane until SIGTERM or Ctrl-C.
pub async fn run(args: ControlArgs) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    if args.cert_ttl < Duration::from_secs(2) {
        anyhow::bail!(
            "--cert-ttl {:?} is too short to renew in time; use at least 2s",
            args.cert_ttl
        );
    }
    if args.cert_ttl < Duration::from_secs(300) {
        tracing::warn!(cert_ttl = ?args.cert_ttl, "certificate lifetime under 5 minutes: for testing only");
    }
    let store = Arc::new(Store::open(&args.state_dir)?);
    let ca_set = CaSet::load_or_init(&store, &args.trust_domain)?;
    ca_set.export_bundle(&args.state_dir)?;
    let bundle = TrustBundle::from_pem(ca_set.bundle_pem())?;
    let ca = Arc::new(ArcSwap::from_pointee(ca_set));

    let own_id = control_plane_identity(&args.trust_domain);
    let serving = CertStore::new();
    let mut serving_not_after = issue_serving_cert(&store, &ca.load(), &own_id, &serving)?;

    let tls = TlsAcceptor::from(config::server_config(
        serving.clone(),
        bundle.clone(),
        false,
        &[config::ALPN_H2],
    ));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding {}", args.admin))?;
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
                        reason = crate::proxy::inbound::handshake_failure_reason(&e), "control-plane TLS handshake refused"),
                    Err(_) => tracing::info!(%remote, "control-plane TLS handshake timed out"),
                }
            });
        }
    });

    tokio::spawn(admin::serve(
        admin_listener,
        |req: AdminRequest| async move {
            match req.path.as_str() {
                "/ready" | "/live" => admin::respond(StatusCode::OK, "text/plain", "ok\n"),
                _ => admin::respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            }
        },
    ));

    // Keeps the CA view in step with the store (the CLI may start a rotation while we run),
    // advances rotations, and renews the serving certificate.
    {
        let store = store.clone();
        let ca = ca.clone();
        let bundle = bundle.clone();
        let state_dir = args.state_dir.clone();
        let ttl = args.cert_ttl;
        let trust_domain = args.trust_domain.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
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
                        tracing::info!(
                            active = fresh.active_generation(),
                            "CA state changed; trust bundle updated"
                        );
                        ca.store(Arc::new(fresh));
                    }
                    let half_life = (SERVING_CERT_LIFETIME / 2).as_secs() as i64;
                    if signer_changed
                        || crate::identity::ca::now_unix() >= serving_not_after - half_life
                    {
                        serving_not_after =
                            issue_serving_cert(&store, &ca.load(), &own_id, &serving)?;
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
    };
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(service))
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
) -> anyhow::Result<i64> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued =
        ca.signer()
            .sign_workload(id, &key, SERVING_CERT_LIFETIME, &["localhost".to_string()])?;
    store.record_certificate(&issued, CredentialKind::ControlPlane)?;
    let chain = crate::tls::certs_from_pem(&issued.chain_pem)?;
    let signing_key =
        crate::tls::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))?;
    serving.set(
        Arc::new(CertifiedKey::new(chain, signing_key)),
        issued.not_after,
    );
    Ok(issued.not_after)
}

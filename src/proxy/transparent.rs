//! Transparent outbound (15001): connections the app made to anywhere, redirected here by
//! `palisade init`. The original destination decides everything: a meshed address gets mTLS to
//! the identity the endpoint table names for it; anything else passes through as plain TCP, or
//! is refused when egress is `deny`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

use super::limits::{Drain, Limits};
use super::outbound::{Outbound, Route};
use super::view::MeshView;
use crate::identity::SpiffeId;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{PolicyLabel, ProxyMetrics};
use crate::tls::{CertStore, TrustBundle, config};

/// Shared state of the transparent outbound listener.
pub struct Transparent {
    pub view: Arc<ArcSwap<MeshView>>,
    pub certs: Arc<CertStore>,
    pub bundle: Arc<TrustBundle>,
    pub metrics: Arc<ProxyMetrics>,
    pub limits: Limits,
    pub drain: Arc<Drain>,
    pub access_log: AccessLog,
    /// One pooled upstream per (destination, identity); dropped whole on revocation changes.
    upstreams: Mutex<HashMap<(SocketAddr, SpiffeId), Arc<Outbound>>>,
    listen: SocketAddr,
}

impl Transparent {
    /// State for a listener bound at `listen`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        listen: SocketAddr,
        view: Arc<ArcSwap<MeshView>>,
        certs: Arc<CertStore>,
        bundle: Arc<TrustBundle>,
        metrics: Arc<ProxyMetrics>,
        limits: Limits,
        drain: Arc<Drain>,
        access_log: AccessLog,
    ) -> Arc<Self> {
        Arc::new(Transparent {
            view,
            certs,
            bundle,
            metrics,
            limits,
            drain,
            access_log,
            upstreams: Mutex::new(HashMap::new()),
            listen,
        })
    }

    /// Forgets every pooled upstream (after a revocation, so peers are judged afresh).
    pub fn reset(&self) {
        self.upstreams.lock().clear();
    }

    fn upstream(&self, dst: SocketAddr, id: &SpiffeId) -> Arc<Outbound> {
        let mut map = self.upstreams.lock();
        map.entry((dst, id.clone()))
            .or_insert_with(|| {
                let tls = config::client_config(
                    self.certs.clone(),
                    self.bundle.clone(),
                    Some(id.clone()),
                    &[config::ALPN_H2],
                );
                let tcp_tls = config::client_config(
                    self.certs.clone(),
                    self.bundle.clone(),
                    Some(id.clone()),
                    &[config::ALPN_TCP],
                );
                Arc::new(Outbound::new(
                    Route { listen: self.listen, target: dst.to_string(), identity: id.clone() },
                    tls,
                    tcp_tls,
                    self.metrics.clone(),
                    self.limits.clone(),
                    self.drain.clone(),
                    self.access_log.clone(),
                ))
            })
            .clone()
    }
}

/// Serves redirected connections until draining starts.
pub async fn serve(listener: TcpListener, t: Arc<Transparent>) {
    let (drain, metrics) = (t.drain.clone(), t.metrics.clone());
    super::limits::accept_loop(listener, drain, metrics, "outbound", move |tcp, remote| {
        let t = t.clone();
        async move { connection(&t, tcp, remote).await }
    })
    .await
}

async fn connection(t: &Transparent, mut tcp: TcpStream, remote: SocketAddr) {
    let dst = match super::original_dst::original_dst(&tcp) {
        Ok(dst) if dst != t.listen && dst.port() != t.listen.port() => dst,
        Ok(_) | Err(_) => {
            tracing::warn!(%remote, "connection to the outbound port that was not redirected: closed");
            return;
        }
    };
    let view = t.view.load_full();
    if let Some(id) = view.identity_for(dst) {
        let out = t.upstream(dst, id);
        return super::outbound::connection(&out, tcp, remote, dst.port()).await;
    }
    if !view.egress_allowed {
        tracing::info!(%remote, %dst, "egress refused: destination is outside the mesh and egress is deny");
        if let Some(r) = t.access_log.access("outbound") {
            t.access_log.write(r.tcp().destination(dst).denied_by(PolicyLabel::Fixed("egress-deny")));
        }
        return;
    }
    // Outside the mesh: plain TCP, as the app asked. The sidecar's own UID is exempt from the
    // redirect, so this connection goes straight out.
    let mut upstream = match super::tcp::connect(dst, t.limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%dst, error = %e, "pass-through: destination unreachable");
            return;
        }
    };
    let (sent, received) = super::tcp::splice(&mut tcp, &mut upstream, t.limits.idle_timeout).await;
    t.metrics.record_tcp_bytes("outbound", sent, received);
    if let Some(r) = t.access_log.access("outbound") {
        t.access_log.write(r.tcp().destination(dst).outside_mesh().bytes(sent, received));
    }
}

//! Transparent outbound (15001): connections the app made to anywhere, redirected here by
//! `palisade init`. The original destination decides everything: a service's address (a
//! ClusterIP and one of its ports) is balanced per request across the service's endpoints, each
//! over mTLS to its own identity; another meshed address gets mTLS to the identity the endpoint
//! table names for it; anything else passes through as plain TCP, or is refused when egress is
//! `deny`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

use super::DataPlane;
use super::balance::Decay;
use super::limits::{Drain, Limits};
use super::outbound::{Outbound, Route};
use super::service::ServiceRoute;
use super::service_route::ServiceOutbound;
use super::view::SharedView;
use crate::identity::SpiffeId;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{PolicyLabel, ProxyMetrics};

/// A service and the port of its address a connection was made to.
type ServicePort = (Arc<str>, u16);

/// Shared state of the transparent outbound listener.
pub struct Transparent {
    pub view: Arc<SharedView>,
    pub metrics: Arc<ProxyMetrics>,
    pub limits: Limits,
    pub drain: Arc<Drain>,
    pub access_log: AccessLog,
    /// What each upstream is built from.
    dp: DataPlane,
    /// One pooled upstream per (destination, identity); dropped whole on revocation changes.
    upstreams: Mutex<HashMap<(SocketAddr, SpiffeId), Arc<Outbound>>>,
    /// One balancer per (service, port the app dialled), kept across connections so every
    /// connection to a service shares its endpoints' pools and latency estimates.
    services: Mutex<HashMap<ServicePort, Arc<ServiceOutbound>>>,
    decay: Decay,
    listen: SocketAddr,
}

impl Transparent {
    /// State for a listener bound at `listen`.
    pub fn new(listen: SocketAddr, dp: &DataPlane, decay: Decay) -> Arc<Self> {
        Arc::new(Transparent {
            view: dp.view.clone(),
            metrics: dp.metrics.clone(),
            limits: dp.limits.clone(),
            drain: dp.drain.clone(),
            access_log: dp.access_log.clone(),
            dp: dp.clone(),
            upstreams: Mutex::new(HashMap::new()),
            services: Mutex::new(HashMap::new()),
            decay,
            listen,
        })
    }

    /// Forgets every pooled upstream (after a revocation, so peers are judged afresh).
    pub fn reset(&self) {
        self.upstreams.lock().clear();
        for s in self.services.lock().values() {
            s.reset_pools();
        }
    }

    fn service(&self, service: &Arc<str>, port: u16) -> Arc<ServiceOutbound> {
        let mut map = self.services.lock();
        let key = (service.clone(), port);
        if let Some(out) = map.get(&key) {
            return out.clone();
        }
        // Before adding one: a service no longer in the view keeps no balancer (its pools
        // close with their last connection).
        let view = self.view.load();
        map.retain(|(name, _), _| view.services.contains_key(&**name));
        let route = ServiceRoute { listen: self.listen, service: service.to_string() };
        let out = ServiceOutbound::new(route, Some(port), &self.dp, self.decay);
        map.insert(key, out.clone());
        out
    }

    fn upstream(&self, dst: SocketAddr, id: &SpiffeId) -> Arc<Outbound> {
        let mut map = self.upstreams.lock();
        map.entry((dst, id.clone()))
            .or_insert_with(|| {
                let route = Route { listen: self.listen, target: dst.to_string(), identity: id.clone() };
                Arc::new(Outbound::new(route, &self.dp))
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
    if let Some(service) = view.service_addresses.at.get(&dst) {
        let out = t.service(service, dst.port());
        drop(view);
        return super::outbound::connection(&out, tcp, remote, dst.port()).await;
    }
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

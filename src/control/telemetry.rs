//! `Telemetry/Report`: aggregates what sidecars saw into the traffic graph, and passes their
//! unknown-`kid` hints to the JWKS worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::{Request, Response, Status, Streaming};

use super::jwks::JwksRefetch;
use crate::proto::telemetry::telemetry_server::Telemetry;
use crate::proto::telemetry::{ReportAck, TelemetryReport};

/// One edge of the traffic graph: requests `source` made to `destination`, as the destination
/// saw them (so denials count where they happened).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub requests: u64,
    pub errors: u64,
    pub denials: u64,
    pub handshake_failures: u64,
}

/// A certificate event as the control plane keeps it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertEvent {
    pub spiffe_id: String,
    pub kind: String,
    pub serial: String,
    pub not_after: i64,
    pub message: String,
    pub received_at: i64,
}

/// The aggregate.
#[derive(Default)]
pub struct TrafficGraph {
    edges: Mutex<BTreeMap<(String, String), Edge>>,
    events: Mutex<Vec<CertEvent>>,
}

impl TrafficGraph {
    /// Every edge.
    pub fn edges(&self) -> Vec<Edge> {
        self.edges.lock().values().cloned().collect()
    }

    /// The latest certificate events (newest last).
    pub fn events(&self) -> Vec<CertEvent> {
        self.events.lock().clone()
    }

    fn add(&self, report: &TelemetryReport, caller_identity: &str) {
        let mut edges = self.edges.lock();
        for p in &report.peers {
            // Inbound counts are authoritative for an edge; outbound adds only what the
            // destination could not see (handshakes that never completed).
            let (key, inbound) = match p.direction.as_str() {
                "inbound" => ((p.peer_spiffe_id.clone(), caller_identity.to_string()), true),
                _ => ((caller_identity.to_string(), p.peer_spiffe_id.clone()), false),
            };
            let e = edges.entry(key.clone()).or_insert_with(|| Edge {
                source: key.0,
                destination: key.1,
                ..Default::default()
            });
            if inbound {
                e.requests += p.requests;
                e.errors += p.errors;
                e.denials += p.denials;
            }
            e.handshake_failures += p.handshake_failures;
        }
        let mut events = self.events.lock();
        for ev in &report.certificate_events {
            events.push(CertEvent {
                spiffe_id: caller_identity.to_string(),
                kind: format!("{:?}", ev.kind()),
                serial: ev.serial.clone(),
                not_after: ev.not_after,
                message: ev.message.clone(),
                received_at: crate::clock::now_unix(),
            });
        }
        let excess = events.len().saturating_sub(1000);
        events.drain(..excess);
    }
}

/// Unknown-`kid` issuers taken from one report, at most; the rest are ignored.
pub const MAX_HINTS_PER_REPORT: usize = 4;

/// The gRPC service.
pub struct TelemetryService {
    pub graph: Arc<TrafficGraph>,
    /// Where unknown-`kid` hints go (the JWKS worker rate-limits the fetches).
    pub jwks_refetch: Arc<JwksRefetch>,
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn report(&self, request: Request<Streaming<TelemetryReport>>) -> Result<Response<ReportAck>, Status> {
        let certs = request.peer_certs();
        let (id, _) = crate::tls::peer_identity(certs.as_deref().map(|v| v.as_slice()))
            .map_err(|e| Status::unauthenticated(format!("telemetry needs the workload's mTLS certificate: {e}")))?;
        let mut stream = request.into_inner();
        while let Some(report) = stream.message().await? {
            // A sidecar reports for itself only, whatever the message says.
            self.graph.add(&report, id.as_str());
            // Only an authenticated sidecar gets here; still, a few issuers per report at most.
            for issuer in report.unknown_kid_issuers.iter().take(MAX_HINTS_PER_REPORT) {
                tracing::debug!(sidecar = %id, %issuer, "unknown-kid hint");
                self.jwks_refetch.request(issuer);
            }
        }
        Ok(Response::new(ReportAck {}))
    }
}

//! `Telemetry/Report`: aggregates what sidecars saw into the traffic graph, and passes their
//! unknown-`kid` hints to the JWKS worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::{Request, Response, Status, Streaming};

use super::jwks::JwksRefetch;
use super::store::Store;
use crate::identity::SpiffeId;
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

impl From<crate::proto::admin::Edge> for Edge {
    fn from(e: crate::proto::admin::Edge) -> Self {
        Edge {
            source: e.source,
            destination: e.destination,
            requests: e.requests,
            errors: e.errors,
            denials: e.denials,
            handshake_failures: e.handshake_failures,
        }
    }
}

impl From<Edge> for crate::proto::admin::Edge {
    fn from(e: Edge) -> Self {
        crate::proto::admin::Edge {
            source: e.source,
            destination: e.destination,
            requests: e.requests,
            errors: e.errors,
            denials: e.denials,
            handshake_failures: e.handshake_failures,
        }
    }
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

/// Most peer entries taken from one report; the rest are dropped.
pub const MAX_PEERS_PER_REPORT: usize = 1024;
/// Most distinct sources one destination may report; new ones beyond are dropped.
pub const MAX_SOURCES_PER_DESTINATION: usize = 1024;
/// Most edges the graph holds; new ones beyond are dropped.
pub const MAX_EDGES: usize = 65_536;
/// Most certificate events taken from one report.
pub const MAX_EVENTS_PER_REPORT: usize = 16;
/// Most events one reporter keeps in the shared list (its oldest make room for its newest, so
/// one reporter cannot push the others' out).
pub const MAX_EVENTS_PER_REPORTER: usize = 100;
/// Events the graph keeps in all.
const MAX_EVENTS: usize = 1000;
/// Longest event message kept, in bytes.
const MAX_MESSAGE_BYTES: usize = 512;
/// Longest source identity kept, in bytes (mesh identities are far shorter; SPIFFE allows 2048).
const MAX_SOURCE_BYTES: usize = 512;
/// Most reports one reporter may have taken per second (a sidecar sends one per interval,
/// 10 s by default); more are dropped whole.
pub const MAX_REPORTS_PER_SECOND: u32 = 20;

/// What the graph left out of reports, by why.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    /// Outbound entries naming an edge its destination never reported: the reporter cannot
    /// speak for another destination.
    pub foreign_destination: u64,
    /// Peer entries past [`MAX_PEERS_PER_REPORT`], [`MAX_SOURCES_PER_DESTINATION`] or
    /// [`MAX_EDGES`].
    pub over_bound: u64,
    /// Peer entries whose source is neither a SPIFFE ID nor `unauthenticated`.
    pub malformed: u64,
    /// Certificate events past [`MAX_EVENTS_PER_REPORT`], or naming a serial the ledger never
    /// issued to the reporter.
    pub events: u64,
    /// Whole reports past [`MAX_REPORTS_PER_SECOND`].
    pub reports: u64,
}

/// The aggregate.
///
/// Only what the reporting identity (its certificate's, not the message's) can vouch for is
/// recorded: requests it received, as their destination; handshake failures it met as a
/// source, on edges their destination reported; events about its own certificates. What one
/// reporter can add is bounded, so the graph stays bounded in memory.
#[derive(Default)]
pub struct TrafficGraph {
    edges: Mutex<BTreeMap<(String, String), Edge>>,
    /// Distinct sources per destination, to bound each reporter's share of `edges`.
    sources: Mutex<BTreeMap<String, usize>>,
    events: Mutex<Vec<CertEvent>>,
    dropped: Mutex<Dropped>,
    /// Reports taken per reporter in the current second: (second, count).
    rate: Mutex<BTreeMap<String, (i64, u32)>>,
    /// Reports per reporter per second; 0 means [`MAX_REPORTS_PER_SECOND`].
    reports_per_second: u32,
}

impl TrafficGraph {
    /// A graph taking at most `n` reports per reporter per second.
    pub fn with_report_rate(n: u32) -> TrafficGraph {
        TrafficGraph { reports_per_second: n, ..Default::default() }
    }

    /// What was left out so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped.lock().clone()
    }

    /// Every edge.
    pub fn edges(&self) -> Vec<Edge> {
        self.edges.lock().values().cloned().collect()
    }

    /// The latest certificate events (newest last).
    pub fn events(&self) -> Vec<CertEvent> {
        self.events.lock().clone()
    }

    /// Adds one report of `reporter` (the identity its certificate proves). `own_serial` says
    /// whether the ledger issued a serial to the reporter; events naming others are dropped.
    pub fn add(&self, report: &TelemetryReport, reporter: &str, own_serial: impl Fn(&str) -> bool) {
        let mut dropped = Dropped::default();
        if !self.within_rate(reporter) {
            dropped.reports += 1;
            return self.count_dropped(reporter, dropped);
        }
        {
            let mut edges = self.edges.lock();
            let mut sources = self.sources.lock();
            dropped.over_bound += report.peers.len().saturating_sub(MAX_PEERS_PER_REPORT) as u64;
            for p in report.peers.iter().take(MAX_PEERS_PER_REPORT) {
                if p.direction == "inbound" {
                    // The reporter is the destination: it saw these requests arrive.
                    if p.peer_spiffe_id.len() > MAX_SOURCE_BYTES
                        || (p.peer_spiffe_id != "unauthenticated" && p.peer_spiffe_id.parse::<SpiffeId>().is_err())
                    {
                        dropped.malformed += 1;
                        continue;
                    }
                    let key = (p.peer_spiffe_id.clone(), reporter.to_string());
                    let e = match edges.get_mut(&key) {
                        Some(e) => e,
                        None => {
                            let known = sources.entry(reporter.to_string()).or_default();
                            if *known >= MAX_SOURCES_PER_DESTINATION || edges.len() >= MAX_EDGES {
                                dropped.over_bound += 1;
                                continue;
                            }
                            *known += 1;
                            edges.entry(key.clone()).or_insert_with(|| Edge {
                                source: key.0,
                                destination: key.1,
                                ..Default::default()
                            })
                        }
                    };
                    e.requests = e.requests.saturating_add(p.requests);
                    e.errors = e.errors.saturating_add(p.errors);
                    e.denials = e.denials.saturating_add(p.denials);
                } else {
                    // The reporter is the source: it may add the handshakes that never
                    // completed (the destination could not see them), and only to an edge the
                    // destination itself reported.
                    match edges.get_mut(&(reporter.to_string(), p.peer_spiffe_id.clone())) {
                        Some(e) => e.handshake_failures = e.handshake_failures.saturating_add(p.handshake_failures),
                        None if p.handshake_failures == 0 && p.requests == 0 => {}
                        None => dropped.foreign_destination += 1,
                    }
                }
            }
        }
        {
            let mut events = self.events.lock();
            dropped.events += report.certificate_events.len().saturating_sub(MAX_EVENTS_PER_REPORT) as u64;
            for ev in report.certificate_events.iter().take(MAX_EVENTS_PER_REPORT) {
                if !ev.serial.is_empty() && !own_serial(&ev.serial) {
                    dropped.events += 1;
                    continue;
                }
                if events.iter().filter(|e| e.spiffe_id == reporter).count() >= MAX_EVENTS_PER_REPORTER
                    && let Some(oldest) = events.iter().position(|e| e.spiffe_id == reporter)
                {
                    events.remove(oldest);
                }
                let mut message = ev.message.clone();
                if message.len() > MAX_MESSAGE_BYTES {
                    let cut = (0..=MAX_MESSAGE_BYTES).rev().find(|i| message.is_char_boundary(*i)).unwrap_or(0);
                    message.truncate(cut);
                }
                events.push(CertEvent {
                    spiffe_id: reporter.to_string(),
                    kind: format!("{:?}", ev.kind()),
                    serial: ev.serial.clone(),
                    not_after: ev.not_after,
                    message,
                    received_at: crate::clock::now_unix(),
                });
            }
            let excess = events.len().saturating_sub(MAX_EVENTS);
            events.drain(..excess);
        }
        self.count_dropped(reporter, dropped);
    }

    /// Whether `reporter` is within [`MAX_REPORTS_PER_SECOND`]; counts this report.
    fn within_rate(&self, reporter: &str) -> bool {
        let now = crate::clock::now_unix();
        let mut rate = self.rate.lock();
        if let Some((second, count)) = rate.get_mut(reporter) {
            if *second != now {
                (*second, *count) = (now, 0);
            }
            *count += 1;
            let max = if self.reports_per_second == 0 { MAX_REPORTS_PER_SECOND } else { self.reports_per_second };
            return *count <= max;
        }
        // One entry per identity that ever reported; a stale one goes when the map grows.
        if rate.len() >= 65_536 {
            rate.retain(|_, (second, _)| *second >= now - 60);
        }
        rate.insert(reporter.to_string(), (now, 1));
        true
    }

    fn count_dropped(&self, reporter: &str, dropped: Dropped) {
        if dropped != Dropped::default() {
            tracing::warn!(%reporter, ?dropped, "telemetry the reporter cannot vouch for, or over its bounds, dropped");
            let mut total = self.dropped.lock();
            total.foreign_destination += dropped.foreign_destination;
            total.over_bound += dropped.over_bound;
            total.malformed += dropped.malformed;
            total.events += dropped.events;
            total.reports += dropped.reports;
        }
    }
}

/// Unknown-`kid` issuers taken from one report, at most; the rest are ignored.
pub const MAX_HINTS_PER_REPORT: usize = 4;

/// The gRPC service.
pub struct TelemetryService {
    pub graph: Arc<TrafficGraph>,
    /// The certificate ledger: a reporter's events may name only serials issued to it.
    pub store: Arc<Store>,
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
            let own_serials: Vec<String> = if report.certificate_events.iter().any(|e| !e.serial.is_empty()) {
                let (store, who) = (self.store.clone(), id.to_string());
                match tokio::task::spawn_blocking(move || store.certificates(Some(&who), 64)).await {
                    Ok(Ok(rows)) => rows.into_iter().map(|r| r.serial.to_lowercase()).collect(),
                    _ => Vec::new(),
                }
            } else {
                Vec::new()
            };
            self.graph.add(&report, id.as_str(), |serial| own_serials.contains(&serial.to_lowercase()));
            // Only an authenticated sidecar gets here; still, a few issuers per report at most.
            for issuer in report.unknown_kid_issuers.iter().take(MAX_HINTS_PER_REPORT) {
                tracing::debug!(sidecar = %id, %issuer, "unknown-kid hint");
                self.jwks_refetch.request(issuer);
            }
        }
        Ok(Response::new(ReportAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::telemetry::{CertificateEvent, PeerCounters, certificate_event::Kind};

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/reporter";
    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

    fn peer(id: &str, direction: &str, requests: u64, handshake_failures: u64) -> PeerCounters {
        PeerCounters {
            peer_spiffe_id: id.into(),
            direction: direction.into(),
            requests,
            handshake_failures,
            ..Default::default()
        }
    }

    #[test]
    fn a_reporter_records_only_edges_it_is_the_destination_of() {
        let graph = TrafficGraph::default();
        let report = TelemetryReport {
            spiffe_id: ORDERS.into(), // what the message says does not count
            peers: vec![
                peer(ORDERS, "inbound", 5, 0),            // orders -> me: mine to report
                peer(ORDERS, "outbound", 1000, 7),        // me -> orders: orders never said so
                peer("not a spiffe id", "inbound", 3, 0), // made up
                peer("unauthenticated", "inbound", 2, 0), // plaintext callers of a PERMISSIVE port
            ],
            ..Default::default()
        };
        graph.add(&report, ME, |_| true);
        let edges = graph.edges();
        assert_eq!(edges.len(), 2, "{edges:?}");
        assert!(edges.iter().all(|e| e.destination == ME), "{edges:?}");
        assert_eq!(graph.dropped().foreign_destination, 1);
        assert_eq!(graph.dropped().malformed, 1);

        // Once orders reports the edge me -> orders, my handshake failures on it count.
        graph.add(&TelemetryReport { peers: vec![peer(ME, "inbound", 1, 0)], ..Default::default() }, ORDERS, |_| true);
        graph.add(&TelemetryReport { peers: vec![peer(ORDERS, "outbound", 0, 3)], ..Default::default() }, ME, |_| true);
        let edge = graph.edges().into_iter().find(|e| e.source == ME && e.destination == ORDERS).unwrap();
        assert_eq!((edge.requests, edge.handshake_failures), (1, 3), "requests only as the destination saw them");
    }

    #[test]
    fn a_reporter_flooding_distinct_sources_is_held_to_its_bound() {
        let graph = TrafficGraph::with_report_rate(u32::MAX);
        let mut sent = 0;
        for batch in 0..100 {
            let peers = (0..1000)
                .map(|i| peer(&format!("spiffe://cluster.local/ns/x/sa/s{batch}-{i}"), "inbound", 1, 0))
                .collect();
            graph.add(&TelemetryReport { peers, ..Default::default() }, ME, |_| true);
            sent += 1000;
        }
        assert_eq!(sent, 100_000);
        assert_eq!(graph.edges().len(), MAX_SOURCES_PER_DESTINATION);
        assert_eq!(graph.dropped().over_bound, (100_000 - MAX_SOURCES_PER_DESTINATION) as u64);
        // An honest destination still gets its edges in, and known sources keep counting.
        graph.add(&TelemetryReport { peers: vec![peer(ME, "inbound", 4, 0)], ..Default::default() }, ORDERS, |_| true);
        let first = "spiffe://cluster.local/ns/x/sa/s0-0";
        graph.add(&TelemetryReport { peers: vec![peer(first, "inbound", 9, 0)], ..Default::default() }, ME, |_| true);
        let edges = graph.edges();
        assert!(edges.iter().any(|e| e.source == ME && e.destination == ORDERS && e.requests == 4));
        assert!(edges.iter().any(|e| e.source == first && e.requests == 10));
        // One report is bounded too.
        let huge = (0..MAX_PEERS_PER_REPORT + 10).map(|_| peer(ME, "inbound", 1, 0)).collect();
        graph.add(&TelemetryReport { peers: huge, ..Default::default() }, ORDERS, |_| true);
        let edge = graph.edges().into_iter().find(|e| e.source == ME && e.destination == ORDERS).unwrap();
        assert_eq!(edge.requests, 4 + MAX_PEERS_PER_REPORT as u64);
    }

    #[test]
    fn certificate_events_name_only_the_reporters_serials_and_cannot_crowd_out_others() {
        let graph = TrafficGraph::with_report_rate(u32::MAX);
        let event =
            |serial: &str| CertificateEvent { kind: Kind::Issued as i32, serial: serial.into(), ..Default::default() };
        graph.add(&TelemetryReport { certificate_events: vec![event("aa")], ..Default::default() }, ORDERS, |s| {
            s == "aa"
        });
        graph.add(
            &TelemetryReport { certificate_events: vec![event("aa"), event("bb")], ..Default::default() },
            ME,
            |s| s == "bb",
        );
        let events = graph.events();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events.iter().any(|e| e.spiffe_id == ME && e.serial == "bb"));
        assert_eq!(graph.dropped().events, 1, "orders' serial claimed by another reporter");
        for _ in 0..200 {
            let many = (0..100).map(|_| event("bb")).collect();
            graph.add(&TelemetryReport { certificate_events: many, ..Default::default() }, ME, |_| true);
        }
        let events = graph.events();
        assert_eq!(events.iter().filter(|e| e.spiffe_id == ME).count(), MAX_EVENTS_PER_REPORTER);
        assert!(events.iter().any(|e| e.spiffe_id == ORDERS), "another reporter's event survives the flood");
    }

    #[test]
    fn a_reporter_sending_reports_faster_than_its_rate_is_cut_off() {
        let graph = TrafficGraph::default();
        for _ in 0..100 {
            graph.add(
                &TelemetryReport { peers: vec![peer(ORDERS, "inbound", 1, 0)], ..Default::default() },
                ME,
                |_| true,
            );
        }
        // The loop may straddle one second boundary: at most two seconds' worth got in.
        let taken = graph.edges()[0].requests;
        assert!(taken <= 2 * u64::from(MAX_REPORTS_PER_SECOND), "{taken} reports taken");
        assert_eq!(graph.dropped().reports, 100 - taken);
        // Another reporter is not held back by it.
        graph.add(&TelemetryReport { peers: vec![peer(ME, "inbound", 1, 0)], ..Default::default() }, ORDERS, |_| true);
        assert!(graph.edges().iter().any(|e| e.destination == ORDERS));
    }
}

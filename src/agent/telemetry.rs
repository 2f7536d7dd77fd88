//! Reports what the sidecar saw to the control plane: per-peer deltas, certificate events and
//! the issuers whose tokens named an unknown `kid` (sent at once, not at the next interval, so
//! a key rotation at an issuer reaches this sidecar in seconds).
//!
//! Best effort by design: a report lost with a broken stream is not resent (counters on the
//! sidecar's own `/metrics` stay exact); the next report carries the deltas since the last
//! one that was handed to a live stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::ControlClient;
use crate::backoff::Backoff;
use crate::clock::now_unix;
use crate::identity::CertEvents;
use crate::proto::telemetry::telemetry_client::TelemetryClient;
use crate::proto::telemetry::{PeerCounters, TelemetryReport};
use crate::telemetry::peers::{PeerKey, PeerStats};
use crate::telemetry::unknown_kid::UnknownKidHints;

/// The reporter's inputs.
pub struct TelemetryInputs {
    pub control: ControlClient,
    pub spiffe_id: String,
    pub stats: Arc<PeerStats>,
    pub events: Arc<CertEvents>,
    /// Issuers to hint; a new one makes a report go at once.
    pub unknown_kids: Arc<UnknownKidHints>,
    pub interval: Duration,
}

/// Streams a report every `interval`, and at once when an unknown-`kid` issuer is recorded,
/// reconnecting with capped, jittered backoff.
pub async fn run(inputs: TelemetryInputs) {
    let TelemetryInputs { control, spiffe_id, stats, events, unknown_kids, interval } = inputs;
    let mut last: HashMap<PeerKey, [u64; 4]> = HashMap::new();
    let mut backoff = Backoff::new(interval.min(Duration::from_secs(1)), Duration::from_secs(5));
    loop {
        let (tx, rx) = mpsc::channel::<TelemetryReport>(4);
        let mut connected_at = None;
        let stream = async {
            let mut client = TelemetryClient::new(control.channel().await?);
            connected_at = Some(tokio::time::Instant::now());
            client.report(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        let feed = async {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = unknown_kids.recorded() => {}
                }
                let mut peers = Vec::new();
                let mut next = last.clone();
                for (key, totals) in stats.totals() {
                    let prev = last.get(&key).copied().unwrap_or_default();
                    let d: Vec<u64> = totals.iter().zip(prev).map(|(t, p)| t - p).collect();
                    if d.iter().any(|v| *v > 0) {
                        peers.push(PeerCounters {
                            peer_spiffe_id: key.0.to_string(),
                            direction: key.1.to_string(),
                            requests: d[0],
                            errors: d[1],
                            denials: d[2],
                            handshake_failures: d[3],
                        });
                    }
                    next.insert(key, totals);
                }
                let certificate_events = events.drain();
                let unknown_kid_issuers = unknown_kids.drain(std::time::Instant::now());
                let report = TelemetryReport {
                    spiffe_id: spiffe_id.clone(),
                    timestamp: now_unix(),
                    peers,
                    certificate_events,
                    unknown_kid_issuers,
                };
                if tx.send(report).await.is_err() {
                    return;
                }
                last = next;
            }
        };
        tokio::select! {
            res = stream => if let Err(e) = res { tracing::debug!(error = %e, "telemetry stream ended") },
            _ = feed => {}
        }
        // A stream that stayed up for a report interval worked: the next loss is a fresh one.
        if connected_at.is_some_and(|at| at.elapsed() >= interval) {
            backoff.reset();
        }
        backoff.wait().await;
    }
}

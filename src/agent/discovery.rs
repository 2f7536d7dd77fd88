//! The sidecar's discovery stream: receive snapshots, apply or refuse each, say which.
//!
//! The last good snapshot stays in force whatever happens to the stream: a NACKed snapshot, a
//! control plane that disappears, a reconnect. Reconnects resume from the version in force so
//! the control plane can skip a push that would change nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::ControlClient;
use crate::proto::discovery::discovery_client::DiscoveryClient;
use crate::proto::discovery::{DiscoveryRequest, ErrorDetail, Node, Snapshot};

/// Applies a snapshot to the data plane, or says why it cannot (the agent then NACKs).
pub type ApplyFn = Arc<dyn Fn(&str, &Snapshot) -> Result<(), String> + Send + Sync>;

/// State of the discovery stream, for readiness and `/config_dump`.
#[derive(Default)]
pub struct DiscoveryStatus {
    /// Whether any snapshot has been applied since start.
    pub has_snapshot: AtomicBool,
    /// Whether the stream is up right now.
    pub connected: AtomicBool,
    /// Version in force, and the last NACK message.
    pub version: ArcSwap<String>,
    pub last_nack: ArcSwap<String>,
}

/// Runs the stream for ever, reconnecting with capped, jittered backoff.
pub async fn run(control: ControlClient, node: Node, apply: ApplyFn, status: Arc<DiscoveryStatus>) {
    let mut delay = Duration::from_millis(100);
    let cap = Duration::from_secs(5);
    loop {
        match session(&control, &node, &apply, &status).await {
            Ok(()) => tracing::warn!("discovery stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "discovery stream failed; serving from the last good snapshot"),
        }
        status.connected.store(false, Ordering::Release);
        let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tokio::time::sleep(jittered).await;
        delay = (delay * 2).min(cap);
        if status.has_snapshot.load(Ordering::Acquire) && status.connected.load(Ordering::Acquire) {
            delay = Duration::from_millis(100);
        }
    }
}

async fn session(
    control: &ControlClient,
    node: &Node,
    apply: &ApplyFn,
    status: &DiscoveryStatus,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut client = DiscoveryClient::new(control.channel().await?);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node.clone()),
        version_info: status.version.load().to_string(),
        response_nonce: String::new(),
        error_detail: None,
    })
    .await?;
    let mut responses = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    status.connected.store(true, Ordering::Release);
    tracing::info!("discovery stream up");
    while let Some(resp) = responses.message().await? {
        let Some(snapshot) = resp.snapshot.as_ref() else { continue };
        let error_detail = match apply(&resp.version_info, snapshot) {
            Ok(()) => {
                status.version.store(Arc::new(resp.version_info.clone()));
                status.has_snapshot.store(true, Ordering::Release);
                tracing::info!(version = %resp.version_info, policies = snapshot.policies.len(),
                    endpoints = snapshot.endpoints.len(), "snapshot applied");
                None
            }
            Err(message) => {
                tracing::error!(version = %resp.version_info, error = %message, "snapshot refused; the previous one stays in force");
                status.last_nack.store(Arc::new(message.clone()));
                Some(ErrorDetail { message })
            }
        };
        tx.send(DiscoveryRequest {
            node: None,
            version_info: status.version.load().to_string(),
            response_nonce: resp.nonce,
            error_detail,
        })
        .await?;
    }
    Ok(())
}

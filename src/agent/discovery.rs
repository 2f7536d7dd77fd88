//! The sidecar's discovery stream: receive snapshots, apply or refuse each, say which.
//!
//! The last good snapshot stays in force whatever happens to the stream: a NACKed snapshot, a
//! control plane that disappears, a reconnect. Reconnects resume from the version in force so
//! the control plane can skip a push that would change nothing.
//!
//! Reconnects back off (capped, jittered) while attempts keep failing. A session that received
//! a snapshot, or stayed up for `STABLE_AFTER`, proves the control plane serves again, so the
//! backoff starts over: the next outage is met with a quick reconnect, not the cap.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ControlClient;
use crate::backoff::Backoff;
use crate::proto::discovery::discovery_client::DiscoveryClient;
use crate::proto::discovery::{DiscoveryRequest, ErrorDetail, Node, Snapshot};

/// Applies a snapshot to the data plane, or says why it cannot (the agent then NACKs).
pub type ApplyFn = Arc<dyn Fn(&str, &Snapshot) -> Result<(), String> + Send + Sync>;

/// First wait before reconnecting; it doubles while attempts fail.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait before reconnecting.
const RECONNECT_CAP: Duration = Duration::from_secs(5);
/// A stream up this long worked even without a snapshot (a resumed stream gets none when its
/// version is current). At least the cap, so resetting never reconnects more often than the
/// cap would.
const STABLE_AFTER: Duration = Duration::from_secs(30);

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
    let (control, node, apply, status) = (&control, &node, &apply, &*status);
    reconnect(Backoff::new(RECONNECT_INITIAL, RECONNECT_CAP), move || async move {
        let mut progress = Progress::default();
        match session(control, node, apply, status, &mut progress).await {
            Ok(()) => tracing::warn!("discovery stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "discovery stream failed; serving from the last good snapshot"),
        }
        status.connected.store(false, Ordering::Release);
        progress
    })
    .await
}

/// How far one session got: what decides whether the backoff starts over.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// When the stream came up, if it did.
    up_since: Option<Instant>,
    /// Whether a snapshot arrived, applied or refused: the control plane was serving.
    received_snapshot: bool,
}

impl Progress {
    /// Whether the control plane served this session, so the next failure is a fresh one.
    fn served(&self) -> bool {
        self.received_snapshot || self.up_since.is_some_and(|at| at.elapsed() >= STABLE_AFTER)
    }
}

/// Runs `session` for ever, waiting `backoff` between sessions and starting it over after one
/// that was [served](Progress::served).
async fn reconnect<F, Fut>(mut backoff: Backoff, mut session: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Progress>,
{
    loop {
        if session().await.served() {
            backoff.reset();
        }
        backoff.wait().await;
    }
}

async fn session(
    control: &ControlClient,
    node: &Node,
    apply: &ApplyFn,
    status: &DiscoveryStatus,
    progress: &mut Progress,
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
    progress.up_since = Some(Instant::now());
    status.connected.store(true, Ordering::Release);
    tracing::info!("discovery stream up");
    while let Some(resp) = responses.message().await? {
        let Some(snapshot) = resp.snapshot.as_ref() else { continue };
        progress.received_snapshot = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fake_control::{DEADLINE, FakeControl, SIDECAR_ID};
    use crate::proto::discovery::DiscoveryResponse;

    const MS: Duration = Duration::from_millis(1);

    /// One scripted session: how long its stream stayed up (`None`: it never came up), and
    /// whether a snapshot arrived.
    #[derive(Clone, Copy)]
    struct Scripted {
        up_for: Option<Duration>,
        snapshot: bool,
    }

    const FAILED: Scripted = Scripted { up_for: None, snapshot: false };

    fn up(up_for: Duration, snapshot: bool) -> Scripted {
        Scripted { up_for: Some(up_for), snapshot }
    }

    /// Runs [`reconnect`] over scripted sessions under paused time, and returns how long it
    /// waited after each before starting the next.
    async fn waits_after(script: Vec<Scripted>) -> Vec<Duration> {
        let sessions = script.len();
        let (starts, ends) =
            (Arc::new(parking_lot::Mutex::new(Vec::new())), Arc::new(parking_lot::Mutex::new(Vec::new())));
        let (started, ended) = (starts.clone(), ends.clone());
        let mut script = script.into_iter();
        let run = reconnect(Backoff::new(RECONNECT_INITIAL, RECONNECT_CAP), move || {
            started.lock().push(Instant::now());
            let (next, ended) = (script.next(), ended.clone());
            async move {
                let Some(Scripted { up_for, snapshot }) = next else { return std::future::pending().await };
                let up_since = up_for.map(|_| Instant::now());
                tokio::time::sleep(up_for.unwrap_or_default()).await;
                ended.lock().push(Instant::now());
                Progress { up_since, received_snapshot: snapshot }
            }
        });
        // Virtual time: the hour passes as soon as the script is done and the loop waits for ever.
        let _ = tokio::time::timeout(Duration::from_secs(3600), run).await;
        let (starts, ends) = (starts.lock(), ends.lock());
        assert_eq!(starts.len(), sessions + 1, "the loop went on after the script");
        ends.iter().zip(&starts[1..]).map(|(end, next)| *next - *end).collect()
    }

    /// Whether `wait` is a jittered step of `step_ms`: between half and all of it (and the
    /// millisecond the timer rounds up to).
    fn step_of(wait: Duration, step_ms: u32) -> bool {
        wait >= step_ms * MS / 2 && wait <= (step_ms + 1) * MS
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_backs_off_while_sessions_fail_and_starts_over_after_a_snapshot() {
        let mut script = vec![FAILED; 7];
        script.extend([up(2000 * MS, true), FAILED, FAILED]);
        let waits = waits_after(script).await;
        for (i, step) in [100, 200, 400, 800, 1600, 3200, 5000].into_iter().enumerate() {
            assert!(step_of(waits[i], step), "wait {i} is not a {step} ms step: {waits:?}");
        }
        assert!(step_of(waits[7], 100), "a session that received a snapshot starts the backoff over: {waits:?}");
        assert!(step_of(waits[8], 200) && step_of(waits[9], 400), "and it grows again: {waits:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_without_a_snapshot_starts_the_backoff_over_only_once_it_was_up_a_while() {
        let mut script = vec![FAILED; 5];
        script.extend([up(2000 * MS, false), FAILED, up(STABLE_AFTER, false)]);
        let waits = waits_after(script).await;
        assert!(step_of(waits[5], 3200), "up 2 s without a snapshot proves nothing: {waits:?}");
        assert!(step_of(waits[6], 5000), "{waits:?}");
        assert!(step_of(waits[7], 100), "up for {STABLE_AFTER:?}, the backoff starts over: {waits:?}");
    }

    fn node() -> Node {
        Node { spiffe_id: SIDECAR_ID.into(), addresses: vec!["127.0.0.1:15006".into()], ..Default::default() }
    }

    /// Applies every snapshot but those whose version starts with `bad`.
    fn apply() -> ApplyFn {
        Arc::new(|version: &str, _: &Snapshot| {
            if version.starts_with("bad") {
                return Err(format!("policy shop/broken in {version} does not compile"));
            }
            Ok(())
        })
    }

    fn snapshot(version: &str, nonce: &str) -> DiscoveryResponse {
        DiscoveryResponse { version_info: version.into(), nonce: nonce.into(), snapshot: Some(Snapshot::default()) }
    }

    fn reply(version: &str, nonce: &str, nack: Option<&str>) -> DiscoveryRequest {
        DiscoveryRequest {
            node: None,
            version_info: version.into(),
            response_nonce: nonce.into(),
            error_detail: nack.map(|m| ErrorDetail { message: m.into() }),
        }
    }

    /// A fake control plane and an agent streaming from it.
    async fn agent() -> (FakeControl, Arc<DiscoveryStatus>) {
        let control = FakeControl::start().await;
        let status = Arc::new(DiscoveryStatus::default());
        tokio::spawn(run(control.client.clone(), node(), apply(), status.clone()));
        (control, status)
    }

    #[tokio::test]
    async fn each_snapshot_is_acked_with_its_version_or_nacked_with_the_version_kept_and_why() {
        let (mut control, status) = agent().await;
        let mut stream = control.next_stream().await;
        let hello = stream.request().await;
        assert_eq!(hello, DiscoveryRequest { node: Some(node()), ..Default::default() }, "no version before the first");

        stream.push(snapshot("v1", "n1")).await;
        assert_eq!(stream.request().await, reply("v1", "n1", None));
        stream.push(snapshot("bad2", "n2")).await;
        let why = "policy shop/broken in bad2 does not compile";
        assert_eq!(stream.request().await, reply("v1", "n2", Some(why)), "a NACK names the version kept");
        assert_eq!((status.version.load().as_str(), status.last_nack.load().as_str()), ("v1", why));
        assert!(status.has_snapshot.load(Ordering::Acquire) && status.connected.load(Ordering::Acquire));

        stream.push(snapshot("v3", "n3")).await;
        assert_eq!(stream.request().await, reply("v3", "n3", None));
        assert_eq!(status.version.load().as_str(), "v3");
    }

    #[tokio::test]
    async fn a_broken_stream_reconnects_and_resumes_from_the_last_acked_version() {
        let (mut control, status) = agent().await;
        let mut stream = control.next_stream().await;
        stream.request().await;
        stream.push(snapshot("v1", "n1")).await;
        assert_eq!(stream.request().await, reply("v1", "n1", None));
        stream.push(snapshot("bad2", "n2")).await;
        assert!(stream.request().await.error_detail.is_some(), "bad2 was NACKed");
        stream.break_with(tonic::Status::unavailable("control plane shutting down")).await;

        let mut resumed = control.next_stream().await;
        let hello = resumed.request().await;
        assert_eq!(hello, DiscoveryRequest { node: Some(node()), version_info: "v1".into(), ..Default::default() });
        let deadline = Instant::now() + DEADLINE;
        while !status.connected.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the resumed stream never came up");
            tokio::time::sleep(10 * MS).await;
        }
        assert_eq!(status.version.load().as_str(), "v1", "the last good snapshot stayed in force");
        resumed.push(snapshot("v3", "n1")).await;
        assert_eq!(resumed.request().await, reply("v3", "n1", None));
    }
}

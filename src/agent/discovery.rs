//! The sidecar's discovery stream: receive snapshots, apply or refuse each, say which.
//!
//! The last good snapshot stays in force whatever happens to the stream: a NACKed snapshot, a
//! control plane that disappears, a reconnect. Reconnects resume from the version in force so
//! the control plane can skip a push that would change nothing.
//!
//! A delta is turned into the full snapshot it leads to ([`apply_delta`]) before anything is
//! applied, so the data plane sees one kind of snapshot and ends where a full push would put
//! it. A delta from a version other than the one in force, or that does not fit its table, is
//! NACKed: the control plane then sends the snapshot in full.
//!
//! Reconnects back off (capped, jittered) while attempts keep failing. A session that received
//! a snapshot, or stayed up for `STABLE_AFTER`, proves the control plane serves again, so the
//! backoff starts over: the next outage is met with a quick reconnect, not the cap.

use std::collections::BTreeMap;
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
use crate::proto::discovery::{
    DiscoveryRequest, DiscoveryResponse, Endpoint, ErrorDetail, Node, Snapshot, SnapshotDelta,
};

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

/// The snapshot in force and its version: what the next delta applies to. Kept across
/// reconnects, as the version the stream resumes from is.
type InForce = parking_lot::Mutex<Option<(String, Snapshot)>>;

/// Runs the stream for ever, reconnecting with capped, jittered backoff.
pub async fn run(control: ControlClient, node: Node, apply: ApplyFn, status: Arc<DiscoveryStatus>) {
    let in_force = InForce::default();
    let (control, node, apply, status, in_force) = (&control, &node, &apply, &*status, &in_force);
    reconnect(Backoff::new(RECONNECT_INITIAL, RECONNECT_CAP), move || async move {
        let mut progress = Progress::default();
        match session(control, node, apply, status, in_force, &mut progress).await {
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

/// The largest discovery response a sidecar takes (a full snapshot of about 400,000 endpoints).
const MAX_SNAPSHOT: usize = 64 << 20;

async fn session(
    control: &ControlClient,
    node: &Node,
    apply: &ApplyFn,
    status: &DiscoveryStatus,
    in_force: &InForce,
    progress: &mut Progress,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // A full snapshot carries the whole endpoint table, about 150 bytes an endpoint: gRPC's
    // default 4 MiB would refuse the table of a mesh past about 27,000 endpoints.
    let mut client = DiscoveryClient::new(control.channel().await?).max_decoding_message_size(MAX_SNAPSHOT);
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
        progress.received_snapshot = true;
        let DiscoveryResponse { version_info, nonce, snapshot, delta } = resp;
        let is_delta = delta.is_some();
        let next = match (snapshot, delta) {
            (Some(snapshot), None) => Ok(snapshot),
            (None, Some(delta)) => match &*in_force.lock() {
                Some((version, base)) => apply_delta(version, base, &delta),
                None => Err(format!("a delta from {} arrived, but no snapshot is in force", delta.base_version)),
            },
            _ => Err("a response must carry exactly one of a snapshot and a delta".to_string()),
        };
        let error_detail = match next.and_then(|snapshot| apply(&version_info, &snapshot).map(|()| snapshot)) {
            Ok(snapshot) => {
                status.version.store(Arc::new(version_info.clone()));
                status.has_snapshot.store(true, Ordering::Release);
                tracing::info!(version = %version_info, delta = is_delta, policies = snapshot.policies.len(),
                    endpoints = snapshot.endpoints.len(), "snapshot applied");
                *in_force.lock() = Some((version_info, snapshot));
                None
            }
            Err(message) => {
                tracing::error!(version = %version_info, error = %message, "snapshot refused; the previous one stays in force");
                status.last_nack.store(Arc::new(message.clone()));
                Some(ErrorDetail { message })
            }
        };
        tx.send(DiscoveryRequest {
            node: None,
            version_info: status.version.load().to_string(),
            response_nonce: nonce,
            error_detail,
        })
        .await?;
    }
    Ok(())
}

/// The snapshot `delta` leads to from `base`, the snapshot in force at `version`: the same
/// snapshot a full push of the new version carries, endpoints in the control plane's order
/// (address, then identity). Refused when the delta is from another version, or when it removes
/// an entry the table lacks or adds one it has: either means the two sides disagree, and only a
/// full snapshot can settle that.
pub fn apply_delta(version: &str, base: &Snapshot, delta: &SnapshotDelta) -> Result<Snapshot, String> {
    if delta.base_version != version {
        return Err(format!(
            "a delta from version {} does not apply to {version}, the version in force",
            delta.base_version
        ));
    }
    let mut table: BTreeMap<(&str, &str), &Endpoint> =
        base.endpoints.iter().map(|e| ((e.address.as_str(), e.spiffe_id.as_str()), e)).collect();
    for e in &delta.removed {
        if table.remove(&(e.address.as_str(), e.spiffe_id.as_str())) != Some(e) {
            return Err(format!("a delta removes {} ({}), which the table in force lacks", e.address, e.spiffe_id));
        }
    }
    for e in &delta.added {
        if table.insert((e.address.as_str(), e.spiffe_id.as_str()), e).is_some() {
            return Err(format!("a delta adds {} ({}), which the table in force has", e.address, e.spiffe_id));
        }
    }
    let config = delta.config.as_ref().unwrap_or(base);
    Ok(Snapshot {
        policies: config.policies.clone(),
        peer_authentication: config.peer_authentication.clone(),
        trust_bundle_pem: config.trust_bundle_pem.clone(),
        revocations: config.revocations.clone(),
        endpoints: table.into_values().cloned().collect(),
        mesh: config.mesh.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fake_control::{DEADLINE, FakeControl, SIDECAR_ID};

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
        DiscoveryResponse {
            version_info: version.into(),
            nonce: nonce.into(),
            snapshot: Some(Snapshot::default()),
            delta: None,
        }
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

    fn endpoint(address: &str, sa: &str) -> Endpoint {
        Endpoint {
            address: address.into(),
            spiffe_id: format!("spiffe://cluster.local/ns/t/sa/{sa}"),
            ..Default::default()
        }
    }

    fn with_endpoints(trust: &str, endpoints: &[Endpoint]) -> Snapshot {
        Snapshot { trust_bundle_pem: trust.into(), endpoints: endpoints.to_vec(), ..Default::default() }
    }

    fn delta(base: &str, removed: &[Endpoint], added: &[Endpoint]) -> SnapshotDelta {
        SnapshotDelta { base_version: base.into(), config: None, removed: removed.to_vec(), added: added.to_vec() }
    }

    #[test]
    fn a_delta_ends_where_the_full_snapshot_does() {
        let (a, b, c) = (endpoint("10.0.0.1:80", "a"), endpoint("10.0.0.2:80", "b"), endpoint("10.0.0.3:80", "c"));
        let base = with_endpoints("roots-1", &[a.clone(), c.clone()]);
        let joined = apply_delta("v1", &base, &delta("v1", &[], std::slice::from_ref(&b))).unwrap();
        assert_eq!(joined, with_endpoints("roots-1", &[a.clone(), b.clone(), c.clone()]), "in the table's order");
        let mut change = delta("v2", std::slice::from_ref(&a), &[]);
        change.config = Some(with_endpoints("roots-2", &[]));
        let left = apply_delta("v2", &joined, &change).unwrap();
        assert_eq!(left, with_endpoints("roots-2", &[b, c]), "the other parts replaced, the entry gone");
    }

    #[test]
    fn a_delta_from_another_version_or_that_does_not_fit_the_table_is_refused() {
        let (a, b) = (endpoint("10.0.0.1:80", "a"), endpoint("10.0.0.2:80", "b"));
        let base = with_endpoints("roots", std::slice::from_ref(&a));
        let err = apply_delta("v2", &base, &delta("v1", &[], std::slice::from_ref(&b))).unwrap_err();
        assert!(err.contains("from version v1 does not apply to v2"), "{err}");
        let err = apply_delta("v2", &base, &delta("v2", std::slice::from_ref(&b), &[])).unwrap_err();
        assert!(err.contains("removes 10.0.0.2:80"), "{err}");
        let relabelled = Endpoint { labels: [("app".into(), "x".into())].into(), ..a.clone() };
        assert!(apply_delta("v2", &base, &delta("v2", &[relabelled], &[])).is_err(), "labels must match too");
        let err = apply_delta("v2", &base, &delta("v2", &[], &[a])).unwrap_err();
        assert!(err.contains("adds 10.0.0.1:80"), "{err}");
    }

    #[tokio::test]
    async fn a_delta_the_sidecar_cannot_apply_is_nacked_and_the_version_in_force_stays() {
        let (mut control, status) = agent().await;
        let mut stream = control.next_stream().await;
        stream.request().await;
        let (a, b) = (endpoint("10.0.0.1:80", "a"), endpoint("10.0.0.2:80", "b"));
        let full = with_endpoints("roots", std::slice::from_ref(&a));
        stream
            .push(DiscoveryResponse {
                version_info: "v1".into(),
                nonce: "n1".into(),
                snapshot: Some(full),
                delta: None,
            })
            .await;
        assert_eq!(stream.request().await, reply("v1", "n1", None));
        let join = delta("v1", &[], std::slice::from_ref(&b));
        stream
            .push(DiscoveryResponse {
                version_info: "v2".into(),
                nonce: "n2".into(),
                snapshot: None,
                delta: Some(join),
            })
            .await;
        assert_eq!(stream.request().await, reply("v2", "n2", None), "a delta from the version in force applies");

        let stale = delta("v1", &[], &[endpoint("10.0.0.3:80", "c")]);
        stream
            .push(DiscoveryResponse {
                version_info: "v3".into(),
                nonce: "n3".into(),
                snapshot: None,
                delta: Some(stale),
            })
            .await;
        let nack = stream.request().await;
        assert_eq!((nack.version_info.as_str(), nack.response_nonce.as_str()), ("v2", "n3"), "{nack:?}");
        assert!(nack.error_detail.unwrap().message.contains("does not apply to v2"));
        let gone = delta("v2", &[a.clone(), endpoint("10.0.0.9:80", "z")], &[]);
        stream
            .push(DiscoveryResponse {
                version_info: "v3".into(),
                nonce: "n4".into(),
                snapshot: None,
                delta: Some(gone),
            })
            .await;
        assert!(stream.request().await.error_detail.is_some(), "half a delta is never applied");
        assert_eq!(status.version.load().as_str(), "v2");

        let leave = delta("v2", &[a], &[]);
        stream
            .push(DiscoveryResponse {
                version_info: "v3".into(),
                nonce: "n5".into(),
                snapshot: None,
                delta: Some(leave),
            })
            .await;
        assert_eq!(
            stream.request().await,
            reply("v3", "n5", None),
            "the table in force was left whole by the refusals"
        );
    }
}

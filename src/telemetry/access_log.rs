//! The access log and the decision log: JSON lines, one per request (or TCP connection) and one
//! per denial or audit.
//!
//! Every line is an [`AccessRecord`], and the only way to get one is from a log that is on
//! ([`AccessLog::access`], [`AccessLog::decision`]), so nothing is built for a log that writes
//! nothing. Records are handed to a writer thread over a bounded channel and serialised there,
//! so the data path never blocks on a slow disk or pipe nor spends time on JSON; when the
//! channel is full a record is dropped and counted in `palisade_access_log_dropped_lines_total`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::{Serialize, Serializer};
use tokio::sync::mpsc;

use super::metrics::PolicyLabel;

/// Where log lines go.
#[derive(Clone, Debug)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

impl std::str::FromStr for LogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "-" | "stdout" => LogTarget::Stdout,
            "off" | "" => LogTarget::Off,
            path => LogTarget::File(PathBuf::from(path)),
        })
    }
}

/// Records a writer may fall behind by before new ones are dropped.
const QUEUE: usize = 8192;

/// A handle the data path writes through. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<AccessRecord>>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread for `target`, counting dropped lines in `dropped` (the counter
    /// [`super::metrics::Metrics::new`] exports).
    pub fn start(target: LogTarget, dropped: Counter) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match target {
            LogTarget::Off => return Ok(AccessLog { tx: None, dropped }),
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(QUEUE);
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut buf = Vec::new();
            while let Some(record) = rx.blocking_recv() {
                buf.clear();
                let _ = serde_json::to_writer(&mut buf, &record);
                buf.push(b'\n');
                // Batch whatever else is already queued into the same write.
                while let Ok(more) = rx.try_recv() {
                    let _ = serde_json::to_writer(&mut buf, &more);
                    buf.push(b'\n');
                }
                if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                    return;
                }
            }
        })?;
        Ok(AccessLog { tx: Some(tx), dropped })
    }

    /// A `type: access` record of one request or TCP connection in `direction` (`inbound`,
    /// `outbound`), or `None` when the log is off.
    pub fn access(&self, direction: &'static str) -> Option<AccessRecord> {
        self.enabled().then(|| AccessRecord { direction: Some(direction), ..AccessRecord::new(Kind::Access) })
    }

    /// A `type: decision` record (a denial or an audit) of request `request_id`, or `None` when
    /// the log is off. Complete it with [`AccessRecord::decided`].
    pub fn decision(&self, request_id: &str) -> Option<AccessRecord> {
        self.enabled()
            .then(|| AccessRecord { request_id: Some(request_id.to_string()), ..AccessRecord::new(Kind::Decision) })
    }

    /// Queues a record, stamped with the time now; never waits.
    pub fn write(&self, mut record: AccessRecord) {
        record.time = SystemTime::now();
        if let Some(tx) = &self.tx
            && tx.try_send(record).is_err()
        {
            self.dropped.inc();
        }
    }

    /// Whether lines are written at all.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Lines dropped because the writer fell behind (or stopped on a write error).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

/// The `type` of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Access,
    Decision,
}

/// One line of the access or decision log, built field by field on the data path and serialised
/// by the writer thread. Fields not set are left out of the line.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    #[serde(rename = "type")]
    kind: Kind,
    #[serde(serialize_with = "rfc3339_millis")]
    time: SystemTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    direction: Option<&'static str>,
    /// `tcp` for an opaque TCP connection; absent for HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    /// The peer's SPIFFE ID (`unauthenticated` for a plaintext caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<Arc<str>>,
    /// The original destination of a transparent connection that no peer identity serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<SocketAddr>,
    /// `false` for a connection that left the mesh as plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "method")]
    method: Option<http::Method>,
    /// The path, its query (if any) redacted by [`crate::redact`].
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(rename = "duration_ms", skip_serializing_if = "Option::is_none", serialize_with = "millis")]
    duration: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    /// What refused it: a policy's `namespace/name`, or a step such as `no-allow-matched`.
    #[serde(skip_serializing_if = "Option::is_none")]
    denied_by: Option<PolicyLabel>,
    /// The end user of a verified token, `<iss>/<sub>` (never the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    request_principal: Option<String>,
    /// Why an API guard refused it before policy (never the token or other credential).
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_received: Option<u64>,
    /// The decision, as policy serialises it (telemetry cannot name policy's types).
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<serde_json::Value>,
    /// The policy input document, credentials redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<serde_json::Value>,
}

impl AccessRecord {
    fn new(kind: Kind) -> Self {
        AccessRecord {
            kind,
            time: SystemTime::UNIX_EPOCH,
            direction: None,
            protocol: None,
            peer: None,
            destination: None,
            mesh: None,
            method: None,
            path: None,
            status: None,
            duration: None,
            request_id: None,
            denied_by: None,
            request_principal: None,
            refused: None,
            bytes_sent: None,
            bytes_received: None,
            decision: None,
            input: None,
        }
    }

    /// An opaque TCP connection.
    pub fn tcp(mut self) -> Self {
        self.protocol = Some("tcp");
        self
    }

    /// The peer's identity, as the metrics label it.
    pub fn peer(mut self, peer: Arc<str>) -> Self {
        self.peer = Some(peer);
        self
    }

    /// The original destination of a connection outside the mesh.
    pub fn destination(mut self, destination: SocketAddr) -> Self {
        self.destination = Some(destination);
        self
    }

    /// The connection left the mesh as plain TCP.
    pub fn outside_mesh(mut self) -> Self {
        self.mesh = Some(false);
        self
    }

    /// The request line and its id. A query in `path` is redacted by [`crate::redact`].
    pub fn request(mut self, method: &http::Method, path: &str, request_id: &str) -> Self {
        self.method = Some(method.clone());
        self.path = Some(crate::redact::query(path).into_owned());
        self.request_id = Some(request_id.to_string());
        self
    }

    /// The response status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// How long the request or connection took.
    pub fn took(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }

    /// Bytes carried by a TCP connection, each way.
    pub fn bytes(mut self, sent: u64, received: u64) -> Self {
        (self.bytes_sent, self.bytes_received) = (Some(sent), Some(received));
        self
    }

    /// What refused the request or connection.
    pub fn denied_by(mut self, decider: PolicyLabel) -> Self {
        self.denied_by = Some(decider);
        self
    }

    /// The end user a verified token proved.
    pub fn request_principal(mut self, principal: &str) -> Self {
        self.request_principal = Some(principal.to_string());
        self
    }

    /// Why an API guard refused the request before policy.
    pub fn refused(mut self, reason: String) -> Self {
        self.refused = Some(reason);
        self
    }

    /// The decision and the (redacted) input document of a `type: decision` record.
    pub fn decided(mut self, decision: serde_json::Value, input: serde_json::Value) -> Self {
        (self.decision, self.input) = (Some(decision), Some(input));
        self
    }
}

fn rfc3339_millis<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

fn method<S: Serializer>(method: &Option<http::Method>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(method.as_ref().map_or("", http::Method::as_str))
}

fn millis<S: Serializer>(duration: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(duration.unwrap_or_default().as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log whose writer never reads: every record past `capacity` is dropped.
    fn stalled(capacity: usize, dropped: Counter) -> (AccessLog, mpsc::Receiver<AccessRecord>) {
        let (tx, rx) = mpsc::channel(capacity);
        (AccessLog { tx: Some(tx), dropped }, rx)
    }

    #[test]
    fn a_log_that_is_off_hands_out_no_record() {
        let log = AccessLog::start(LogTarget::Off, Counter::default()).unwrap();
        assert!(!log.enabled());
        assert!(log.access("inbound").is_none());
        assert!(log.decision("id").is_none());
    }

    #[test]
    fn records_keep_the_documented_field_names_and_leave_out_what_is_unset() {
        let (log, mut rx) = stalled(4, Counter::default());
        let method = http::Method::POST;
        let r = log.access("inbound").unwrap().peer(Arc::from("spiffe://cluster.local/ns/shop/sa/web"));
        log.write(
            r.request(&method, "/login?user=bob&password=hunter2", "abc")
                .request_principal("https://issuer.test/alice")
                .status(403)
                .took(Duration::from_micros(1500))
                .denied_by(PolicyLabel::Fixed("no-allow-matched")),
        );
        let line = serde_json::to_value(rx.try_recv().unwrap()).unwrap();
        assert_eq!(line["type"], "access");
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["peer"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/login?user=bob&password=[redacted]");
        assert_eq!(line["status"], 403);
        assert_eq!(line["duration_ms"], 1.5);
        assert_eq!(line["request_id"], "abc");
        assert_eq!(line["denied_by"], "no-allow-matched");
        assert_eq!(line["request_principal"], "https://issuer.test/alice");
        assert!(line["time"].as_str().unwrap().starts_with("20"), "{line}");
        for absent in ["protocol", "destination", "mesh", "bytes_sent", "decision", "input", "refused"] {
            assert!(line.get(absent).is_none(), "{absent} was not set: {line}");
        }

        let dst: SocketAddr = "203.0.113.7:443".parse().unwrap();
        log.write(log.access("outbound").unwrap().tcp().destination(dst).outside_mesh().bytes(10, 20));
        let line = serde_json::to_value(rx.try_recv().unwrap()).unwrap();
        assert_eq!(
            (&line["protocol"], &line["destination"], &line["mesh"], &line["bytes_sent"], &line["bytes_received"]),
            (&"tcp".into(), &"203.0.113.7:443".into(), &false.into(), &10.into(), &20.into())
        );

        log.write(log.decision("abc").unwrap().decided(serde_json::json!({"allowed": false}), serde_json::json!({})));
        let line = serde_json::to_value(rx.try_recv().unwrap()).unwrap();
        assert_eq!((&line["type"], &line["request_id"]), (&"decision".into(), &"abc".into()));
        assert_eq!(line["decision"]["allowed"], false);
    }

    #[test]
    fn records_past_the_queue_are_dropped_and_counted_in_the_shared_counter() {
        let counter = Counter::default();
        let (log, _rx) = stalled(2, counter.clone());
        for _ in 0..5 {
            log.write(log.access("inbound").unwrap());
        }
        assert_eq!(log.dropped(), 3);
        assert_eq!(counter.get(), 3, "the metrics see what the log dropped");
    }
}

//! A service route: a local plaintext listener whose requests are balanced, one by one, across
//! the endpoints of a `MeshService` (`--service-route LISTEN=NAMESPACE/NAME`).
//!
//! Every endpoint has its own pooled mTLS connections, pinned to that endpoint's identity (an
//! [`Outbound`] of its own, as a route to it alone would have), and its own load for the
//! balancer. HTTP/2 and HTTP/1.1 requests are balanced per request, opaque TCP per connection.
//! When the service's endpoints change, requests in flight finish on the connections they
//! started on; a new endpoint gets its first request at the next pick, and a departed one's
//! pools close once the last request holding them ends.
//!
//! A request that failed (502, 503 or 504: the endpoint could not be reached or answered so) is
//! sent once more to another endpoint when that cannot do harm twice: an idempotent method
//! (GET, HEAD, OPTIONS), no body, no upgrade; and when the route's retry budget allows it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

use super::DataPlane;
use super::balance::{self, Decay, Load, RetryBudget};
use super::body::RequestBody;
use super::h1_pool::Sticky;
use super::http::{ProxyBody, ensure_request_id, error_response};
use super::http_route::{DEFAULT_RETRY, RetryPolicy};
use super::limits::{Drain, Limits};
use super::outbound::{MeshConnector, Outbound, Route, Upstream};
use super::service::{Service, ServiceEndpoint, ServiceRoute};
use super::view::MeshView;
use crate::telemetry::metrics::ByClass;

/// One endpoint of the service: its connections and its load.
struct Member {
    endpoint: ServiceEndpoint,
    /// Where its connections go.
    dial: SocketAddr,
    out: Arc<Outbound>,
    load: Arc<Load>,
}

/// The members for one version of the service's endpoint list.
struct Members {
    /// The view's service these were made for (compared by pointer: a new view makes a new
    /// entry only when the service changed).
    of: Option<Arc<Service>>,
    list: Vec<Arc<Member>>,
}

/// An `HTTPRoute` rule and a backend service it sends to.
type RuleBackend = (Arc<str>, Arc<str>);

/// One backend's request metrics, resolved once (a request only counts and observes).
struct BackendMetrics {
    labels: crate::telemetry::metrics::BackendLabels,
    family: prometheus_client::metrics::family::Family<
        crate::telemetry::metrics::BackendStatusLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    by_class: ByClass,
    duration: prometheus_client::metrics::histogram::Histogram,
}

impl BackendMetrics {
    fn new(
        metrics: &crate::telemetry::metrics::ProxyMetrics,
        service: &Arc<str>,
        route: Arc<str>,
        backend: Arc<str>,
    ) -> Self {
        let labels = crate::telemetry::metrics::BackendLabels { service: service.clone(), route, backend };
        BackendMetrics {
            duration: metrics.backend_duration.get_or_create_owned(&labels),
            family: metrics.backend_requests.clone(),
            by_class: ByClass::default(),
            labels,
        }
    }

    fn record(&self, status: StatusCode, started: Instant) {
        self.by_class.inc(status, |class| {
            let labels = crate::telemetry::metrics::BackendStatusLabels { backend: self.labels.clone(), class };
            self.family.get_or_create_owned(&labels)
        });
        self.duration.observe(started.elapsed().as_secs_f64());
    }
}

/// State of one service route's listener.
pub struct ServiceOutbound {
    pub route: ServiceRoute,
    /// The service port the app dialled (transparent mode): endpoints registered as a whole
    /// IP are dialled at its target port. `None` for a service route's listener.
    port: Option<u16>,
    dp: DataPlane,
    decay: Decay,
    /// By service (the route's own, and the backends its `HTTPRoute`s split to): members are
    /// kept by endpoint across changes of the service.
    members: Mutex<foldhash::HashMap<String, Arc<Members>>>,
    /// The route's own service's entry of `members`, read without the lock.
    own: ArcSwap<Members>,
    budget: RetryBudget,
    /// The route's balancer counters, resolved once.
    retried: prometheus_client::metrics::counter::Counter,
    budget_exhausted: prometheus_client::metrics::counter::Counter,
    ejected: prometheus_client::metrics::counter::Counter,
    /// The route's own service, as the balancer picks it when no `HTTPRoute` is attached.
    service: Arc<str>,
    timed_out: prometheus_client::metrics::counter::Counter,
    unrouted: prometheus_client::metrics::counter::Counter,
    /// Requests sent to the service itself (no `HTTPRoute` attached).
    direct: BackendMetrics,
    /// Requests an `HTTPRoute` rule took, by (rule, backend).
    routed: Mutex<foldhash::HashMap<RuleBackend, Arc<BackendMetrics>>>,
}

impl ServiceOutbound {
    /// `port`: the service port connections were made to, in transparent mode.
    pub fn new(route: ServiceRoute, port: Option<u16>, dp: &DataPlane, decay: Decay) -> Arc<Self> {
        let service: Arc<str> = Arc::from(route.service.as_str());
        let counter = |event| {
            let labels = crate::telemetry::metrics::BalancerLabels { service: service.clone(), event };
            dp.metrics.balancer.get_or_create_owned(&labels)
        };
        Arc::new(ServiceOutbound {
            port,
            dp: dp.clone(),
            decay,
            members: Mutex::default(),
            own: ArcSwap::from_pointee(Members { of: None, list: Vec::new() }),
            budget: RetryBudget::default(),
            retried: counter("retried"),
            budget_exhausted: counter("retry_budget_exhausted"),
            ejected: counter("ejected"),
            timed_out: counter("timed_out"),
            unrouted: counter("no_route_matched"),
            direct: BackendMetrics::new(&dp.metrics, &service, Arc::from(""), service.clone()),
            routed: Mutex::default(),
            service,
            route,
        })
    }

    /// The endpoints of `service` in `view`, each with its connections and load.
    fn members(&self, view: &MeshView, service: &Arc<str>) -> Arc<Members> {
        let now = view.services.get(&**service);
        let own = Arc::ptr_eq(service, &self.service);
        if own {
            // The route's own service (every request when no HTTPRoute splits it): no lock.
            let current = self.own.load();
            if same(now, current.of.as_ref()) {
                return Arc::clone(&current);
            }
        }
        let mut cache = self.members.lock();
        let current = cache.get(&**service);
        if let Some(current) = current
            && same(now, current.of.as_ref())
        {
            return current.clone();
        }
        let kept: HashMap<(&ServiceEndpoint, SocketAddr), &Arc<Member>> =
            current.iter().flat_map(|c| c.list.iter()).map(|m| ((&m.endpoint, m.dial), m)).collect();
        let list = now
            .map(|svc| {
                svc.endpoints
                    .iter()
                    .filter_map(|e| {
                        // A whole-IP endpoint (transparent mode) has no port to reach it by a
                        // service route's listener.
                        let dial = e.dial(self.port, &svc.ports)?;
                        Some(match kept.get(&(e, dial)) {
                            Some(m) => Arc::clone(m),
                            None => Arc::new(Member {
                                endpoint: e.clone(),
                                dial,
                                out: Arc::new(Outbound::new(
                                    Route {
                                        listen: self.route.listen,
                                        target: dial.to_string(),
                                        identity: e.identity.clone(),
                                    },
                                    &self.dp,
                                )),
                                load: Load::new(self.decay),
                            }),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        tracing::info!(route = %self.route.service, %service, endpoints = now.map_or(0, |s| s.endpoints.len()), "service endpoints changed");
        let next = Arc::new(Members { of: now.cloned(), list });
        cache.insert(service.to_string(), next.clone());
        if own {
            self.own.store(next.clone());
        }
        next
    }

    /// An endpoint of `service` for the next request or connection, other than `not` if there
    /// is another, and how many endpoints the service has.
    fn pick(&self, view: &MeshView, service: &Arc<str>, not: Option<&Arc<Member>>) -> Option<(Arc<Member>, usize)> {
        let members = self.members(view, service);
        let list = &members.list;
        if list.len() == 1 {
            // Nothing to choose between (ejected or not, it is the one there is).
            return Some((list[0].clone(), 1));
        }
        let now = std::time::Instant::now();
        let usable = |i: usize| list[i].load.available(now) && not.is_none_or(|n| !Arc::ptr_eq(n, &list[i]));
        let i = balance::pick(list.len(), usable, |i| list[i].load.cost(now, self.decay))?;
        Some((list[i].clone(), list.len()))
    }

    /// Drops every endpoint's pooled connections (revocations changed).
    pub fn reset_pools(&self) {
        for members in self.members.lock().values() {
            for m in &members.list {
                m.out.reset_pool();
            }
        }
    }

    fn refuse(&self, req: &mut Request<Incoming>, status: StatusCode, reason: &str) -> Response<ProxyBody> {
        let request_id = ensure_request_id(req.headers_mut());
        tracing::warn!(%request_id, %reason, "outbound request refused");
        error_response(status, reason, &request_id)
    }

    /// Sends `req` to `member` (its pools), keeping its latency and outcome when `track`.
    async fn attempt(&self, member: &Arc<Member>, track: bool, held: &Held, req: Attempt) -> Response<ProxyBody> {
        let sticky = held.sticky(member);
        let inflight = track.then(|| member.load.start());
        let resp = match req {
            Attempt::First(req, started) => super::outbound::handle(&member.out, &sticky, req, started).await,
            Attempt::Again(req) => super::outbound::handle_again(&member.out, &sticky, req).await,
        };
        if let Some(inflight) = inflight
            && inflight.finish(balance::failed(resp.status()), self.decay)
        {
            self.ejected.inc();
            tracing::warn!(
                service = %self.route.service,
                endpoint = %member.dial,
                identity = %member.endpoint.identity,
                "endpoint ejected after {} failures in a row",
                balance::EJECT_AFTER
            );
        }
        resp
    }

    /// Where `req` goes: the backend service and the request timeout of the first
    /// `HTTPRoute` rule attached to this route's service that takes it, or the service itself
    /// when no route is attached. An error is the refusal to answer.
    fn routed(&self, view: &MeshView, req: &Request<Incoming>) -> Result<Routed, (StatusCode, String)> {
        let Some(rules) = view.routes.get(&self.route.service) else {
            return Ok(Routed { backend: self.service.clone(), timeout: None, rule: None, retry: None });
        };
        let rule = rules.iter().find(|r| r.takes(req.method(), req.uri().path(), req.headers())).ok_or_else(|| {
            (StatusCode::NOT_FOUND, format!("no HTTPRoute rule of service {} matches", self.route.service))
        })?;
        let backend = rule.backend().ok_or_else(|| {
            (StatusCode::SERVICE_UNAVAILABLE, format!("every backend of {} has weight 0", rule.route))
        })?;
        Ok(Routed {
            backend: backend.clone(),
            timeout: rule.timeout,
            rule: Some(rule.route.clone()),
            retry: rule.retry.clone(),
        })
    }

    /// The metrics of requests `rule` (none: no route attached) sends to `backend`.
    fn backend_metrics(&self, rule: Option<&Arc<str>>, backend: &Arc<str>) -> Option<Arc<BackendMetrics>> {
        let rule = rule?;
        let mut routed = self.routed.lock();
        let key = (rule.clone(), backend.clone());
        Some(
            routed
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(BackendMetrics::new(&self.dp.metrics, &self.service, rule.clone(), backend.clone()))
                })
                .clone(),
        )
    }

    /// Sends `req` to an endpoint of `service`, and again (to another endpoint if there is
    /// one) while its answer is one `policy` retries, the request may be sent twice, and the
    /// retry budget allows.
    async fn balanced(
        &self,
        view: &MeshView,
        service: &Arc<str>,
        policy: &RetryPolicy,
        held: &Held,
        mut req: Request<Incoming>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let Some((member, members_len)) = self.pick(view, service, None) else {
            let reason = format!("service {service} has no endpoints");
            return self.refuse(&mut req, StatusCode::SERVICE_UNAVAILABLE, &reason);
        };
        // The default policy retries on another endpoint only, so with one endpoint there is
        // no budget to keep and no copy to make: a request costs about what it costs on a
        // plain route. A rule's own policy may retry the same endpoint.
        let may_retry = policy.attempts > 0 && (members_len > 1 || policy.from_rule);
        let again = may_retry
            .then(|| {
                self.budget.deposit();
                replayable(&req, policy)
                    .then(|| (req.method().clone(), req.uri().clone(), req.version(), req.headers().clone()))
            })
            .flatten();
        // With one endpoint there is nothing to choose: no latency to keep.
        let track = members_len > 1;
        let mut resp = self.attempt(&member, track, held, Attempt::First(req, started)).await;
        let Some((method, uri, version, headers)) = again else {
            return resp;
        };
        let mut last = member;
        for n in 0..policy.attempts {
            if !policy.retries(resp.status()) {
                break;
            }
            let Some((next, _)) = self.pick(view, service, Some(&last)) else { break };
            if Arc::ptr_eq(&next, &last) && !policy.from_rule {
                break;
            }
            if !self.budget.withdraw() {
                self.budget_exhausted.inc();
                break;
            }
            self.retried.inc();
            tokio::time::sleep(policy.pause(n)).await;
            let mut retry = Request::new(RequestBody::empty());
            (*retry.method_mut(), *retry.uri_mut(), *retry.version_mut(), *retry.headers_mut()) =
                (method.clone(), uri.clone(), version, headers.clone());
            tracing::debug!(%service, endpoint = %next.dial, attempt = n + 1, "retrying");
            resp = self.attempt(&next, track, held, Attempt::Again(retry)).await;
            last = next;
        }
        resp
    }
}

fn same(a: Option<&Arc<Service>>, b: Option<&Arc<Service>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Endpoints one app connection keeps an HTTP/1.1 connection to between its requests.
const HELD_MAX: usize = 16;

/// The HTTP/1.1 connection an app connection used last at one endpoint.
type HeldAt = (Arc<Member>, Arc<Sticky<MeshConnector>>);

/// What one app connection holds: per endpoint, the HTTP/1.1 connection it used last.
#[derive(Default)]
pub struct Held(Mutex<Vec<HeldAt>>);

impl Held {
    fn sticky(&self, member: &Arc<Member>) -> Arc<Sticky<MeshConnector>> {
        let mut held = self.0.lock();
        if let Some((_, s)) = held.iter().find(|(m, _)| Arc::ptr_eq(m, member)) {
            return s.clone();
        }
        // A long-lived app connection meets endpoints come and go: keep the last few only
        // (dropping one gives its connection back to that endpoint's pool).
        if held.len() >= HELD_MAX {
            held.remove(0);
        }
        let s = Arc::new(Sticky::default());
        held.push((member.clone(), s.clone()));
        s
    }
}

impl Upstream for ServiceOutbound {
    type Conn = Held;

    fn limits(&self) -> &Limits {
        &self.dp.limits
    }

    fn drain(&self) -> &Arc<Drain> {
        &self.dp.drain
    }

    async fn tunnel(self: &Arc<Self>, tcp: TcpStream, prefix: bytes::BytesMut, remote: SocketAddr) {
        // Opaque TCP has no request to route by: the service's own endpoints, per connection.
        let view = self.dp.view.load_full();
        let Some((member, _)) = self.pick(&view, &self.service, None) else {
            tracing::warn!(%remote, service = %self.route.service, "opaque TCP: the service has no endpoints");
            return;
        };
        let inflight = member.load.start();
        super::outbound::tunnel(&member.out, tcp, prefix, remote).await;
        drop(inflight);
    }

    async fn request(self: &Arc<Self>, held: &Held, mut req: Request<Incoming>) -> Response<ProxyBody> {
        // One view for the whole request: its route, its endpoints, and a retry's.
        let view = self.dp.view.load_full();
        let Routed { backend: service, timeout, rule, retry } = match self.routed(&view, &req) {
            Ok(routed) => routed,
            Err((status, reason)) => {
                self.unrouted.inc();
                return self.refuse(&mut req, status, &reason);
            }
        };
        let started = Instant::now();
        let routed_metrics = self.backend_metrics(rule.as_ref(), &service);
        let metrics = routed_metrics.as_deref().unwrap_or(&self.direct);
        let policy = retry.as_deref().unwrap_or(&DEFAULT_RETRY);
        let Some(timeout) = timeout else {
            let resp = self.balanced(&view, &service, policy, held, req, started).await;
            metrics.record(resp.status(), started);
            return resp;
        };
        // The same request id on every attempt and on the timeout's answer.
        let request_id = ensure_request_id(req.headers_mut());
        let resp = match tokio::time::timeout(timeout, self.balanced(&view, &service, policy, held, req, started)).await
        {
            Ok(resp) => resp,
            Err(_) => {
                self.timed_out.inc();
                let reason = format!("no answer from service {service} within the route's timeout of {timeout:?}");
                tracing::warn!(%request_id, %reason, "outbound request timed out");
                error_response(StatusCode::GATEWAY_TIMEOUT, &reason, &request_id)
            }
        };
        metrics.record(resp.status(), started);
        resp
    }
}

/// Where a request goes: the backend service, the route's timeout, and the rule that chose them
/// (none when no `HTTPRoute` is attached to the service).
struct Routed {
    backend: Arc<str>,
    timeout: Option<Duration>,
    rule: Option<Arc<str>>,
    retry: Option<Arc<RetryPolicy>>,
}

/// A first attempt carries the caller's request; a retry, a bodiless copy of it.
enum Attempt {
    /// With when the request arrived (one clock read serves the route's metrics and the
    /// endpoint's).
    First(Request<Incoming>, Instant),
    Again(Request<RequestBody>),
}

/// Whether sending `req` twice can do no harm: a method `policy` allows, no body, no upgrade.
fn replayable(req: &Request<Incoming>, policy: &RetryPolicy) -> bool {
    use hyper::body::Body;
    policy.method_allowed(req.method())
        && req.body().is_end_stream()
        && !req.headers().contains_key(http::header::UPGRADE)
}

/// Serves the service route's plaintext listener until draining starts.
pub async fn serve(listener: TcpListener, out: Arc<ServiceOutbound>) {
    let (drain, metrics) = (out.dp.drain.clone(), out.dp.metrics.clone());
    super::limits::accept_loop(listener, drain, metrics, "outbound", move |tcp, remote| {
        let out = out.clone();
        async move { super::outbound::connection(&out, tcp, remote, out.route.listen.port()).await }
    })
    .await
}

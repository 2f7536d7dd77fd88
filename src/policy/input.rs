//! The request as policy sees it.
//!
//! [`RequestAttributes`] is what the proxy knows about a request (and what
//! `palisade policy eval --request FILE.json` reads). [`Input`] wraps it once per request — or,
//! on the data path, wraps the live request itself ([`LiveRequest`]) without copying it: the
//! declarative engine reads method, path, host and headers in place, and the attributes and the
//! OPA-Envoy compatible document (`input.attributes...`, `input.parsed_path`, ...) are built
//! lazily, only when a Rego or Wasm policy, an explanation or a decision log needs them, and then
//! shared by every policy of the set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::SpiffeId;
use crate::redact;

/// What the proxy knows about one inbound request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestAttributes {
    /// The caller's SPIFFE ID from its mTLS certificate; `None` for a plaintext caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SpiffeId>,
    /// The peer address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<IpAddr>,
    /// The peer port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    /// The workload being called (this sidecar's identity).
    pub destination: SpiffeId,
    /// The port the caller connected to.
    pub destination_port: u16,
    /// HTTP method, e.g. `GET` (empty for opaque TCP).
    #[serde(default)]
    pub method: String,
    /// Path with the query string, e.g. `/orders/7?expand=items` (empty for opaque TCP).
    #[serde(default)]
    pub path: String,
    /// Host (authority) of the request; taken from the `host` header when empty.
    #[serde(default)]
    pub host: String,
    /// `http` or `https`.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// `HTTP/1.1`, `HTTP/2`..., or `tcp` for an opaque TCP connection.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Request headers; names are compared lower-cased.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_scheme() -> String {
    "http".to_string()
}

fn default_protocol() -> String {
    "HTTP/1.1".to_string()
}

/// The end user a verified token proves (`RequestAuthentication`), as policy sees it. Only a
/// guard that checked the token's signature, issuer, audience and times makes one (or
/// `palisade policy eval`, from claims its user vouches for): nothing unverified is ever here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestAuth {
    /// `<iss>/<sub>`, what `requestPrincipals` and `request.auth.principal` match (Istio's form).
    pub principal: String,
    /// The token's `aud`, as a list.
    pub audiences: Vec<String>,
    /// The token's `azp`: the party it was issued to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presenter: Option<String>,
    /// Every claim of the token.
    pub claims: serde_json::Map<String, Value>,
}

impl RequestAuth {
    /// The end user of a token's (verified) claims: principal `<iss>/<sub>`, `aud` as a list
    /// (a single string is a list of one), `azp` as the presenter.
    pub fn from_claims(claims: serde_json::Map<String, Value>) -> Self {
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        let principal = format!("{}/{}", text("iss").unwrap_or(""), text("sub").unwrap_or(""));
        let audiences = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let presenter = text("azp").map(str::to_string);
        RequestAuth { principal, audiences, presenter, claims }
    }
}

/// A request on the data path, borrowed where it lies: [`Input::live`] reads it in place, so a
/// request decided by rules alone copies no header and builds no attribute string.
#[derive(Debug, Clone, Copy)]
pub struct LiveRequest<'a> {
    /// The caller's SPIFFE ID from its mTLS certificate; `None` for a plaintext caller.
    pub source: Option<&'a SpiffeId>,
    /// The peer address.
    pub source_ip: Option<IpAddr>,
    /// The peer port.
    pub source_port: Option<u16>,
    /// The workload being called.
    pub destination: &'a SpiffeId,
    /// The port the caller connected to.
    pub destination_port: u16,
    /// The request's method.
    pub method: &'a http::Method,
    /// The request's target (its authority, if any, is the host).
    pub uri: &'a http::Uri,
    /// The request's headers (names are lower case already).
    pub headers: &'a http::HeaderMap,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The protocol the calling app spoke, e.g. `HTTP/1.1`.
    pub protocol: &'static str,
    /// The end user of a verified token, if the request carried one.
    pub auth: Option<&'a RequestAuth>,
}

/// One request, normalised once (lower-case header names and host, canonical IP) and read by
/// every policy of a set.
#[derive(Debug)]
pub struct Input<'a> {
    repr: Repr<'a>,
    http: bool,
    /// The verified end user, if any (borrowed from a live request, owned otherwise).
    auth: Option<Cow<'a, RequestAuth>>,
    /// A live request's attributes, copied out only when something needs them whole.
    attrs: OnceLock<RequestAttributes>,
    json: OnceLock<Value>,
    rego: OnceLock<regorus::Value>,
}

#[derive(Debug)]
enum Repr<'a> {
    Owned(RequestAttributes),
    Live { req: LiveRequest<'a>, host: Cow<'a, str> },
}

impl Input<'static> {
    /// Normalises the attributes. Allocates only when a header name or the host has upper case.
    pub fn new(mut attrs: RequestAttributes) -> Self {
        if attrs.headers.keys().any(|k| k.bytes().any(|b| b.is_ascii_uppercase())) {
            let mut lowered: BTreeMap<String, String> = BTreeMap::new();
            for (k, v) in std::mem::take(&mut attrs.headers) {
                lowered
                    .entry(k.to_ascii_lowercase())
                    .and_modify(|existing| {
                        // Repeated headers join with a comma, as Envoy presents them.
                        existing.push(',');
                        existing.push_str(&v);
                    })
                    .or_insert(v);
            }
            attrs.headers = lowered;
        }
        if attrs.host.is_empty()
            && let Some(h) = attrs.headers.get("host").or(attrs.headers.get(":authority"))
        {
            attrs.host = h.clone();
        }
        if attrs.host.bytes().any(|b| b.is_ascii_uppercase()) {
            attrs.host = attrs.host.to_ascii_lowercase();
        }
        attrs.source_ip = attrs.source_ip.map(|ip| ip.to_canonical());
        Input {
            http: !attrs.protocol.eq_ignore_ascii_case("tcp"),
            repr: Repr::Owned(attrs),
            auth: None,
            attrs: OnceLock::new(),
            json: OnceLock::new(),
            rego: OnceLock::new(),
        }
    }
}

impl<'a> Input<'a> {
    /// A live HTTP request, read in place. The host is the URI's authority, else the `host`
    /// header; it is the only thing copied, and only when it has upper case.
    pub fn live(req: LiveRequest<'a>) -> Self {
        let host = req
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        Input {
            auth: req.auth.map(Cow::Borrowed),
            repr: Repr::Live { req, host },
            http: true,
            attrs: OnceLock::new(),
            json: OnceLock::new(),
            rego: OnceLock::new(),
        }
    }

    /// The same request made by the verified end user `auth` (for requests given as attributes:
    /// `palisade policy eval`, tests).
    pub fn with_auth(mut self, auth: RequestAuth) -> Self {
        self.auth = Some(Cow::Owned(auth));
        self.json = OnceLock::new();
        self.rego = OnceLock::new();
        self
    }

    /// The verified end user, if the request carried a valid token.
    pub fn auth(&self) -> Option<&RequestAuth> {
        self.auth.as_deref()
    }

    /// The verified end user's `<iss>/<sub>`.
    pub fn request_principal(&self) -> Option<&str> {
        self.auth().map(|a| a.principal.as_str())
    }

    /// The attributes as normalised (for a live request, copied out on first use).
    pub fn attributes(&self) -> &RequestAttributes {
        match &self.repr {
            Repr::Owned(attrs) => attrs,
            Repr::Live { req, host } => self.attrs.get_or_init(|| copy_out(req, host)),
        }
    }

    /// False for opaque TCP (`protocol: tcp`), which has no method, path, host or headers.
    pub fn is_http(&self) -> bool {
        self.http
    }

    /// The caller's SPIFFE ID, if it presented a certificate.
    pub fn source(&self) -> Option<&SpiffeId> {
        match &self.repr {
            Repr::Owned(a) => a.source.as_ref(),
            Repr::Live { req, .. } => req.source,
        }
    }

    /// The caller's SPIFFE ID as text.
    pub fn source_principal(&self) -> Option<&str> {
        self.source().map(SpiffeId::as_str)
    }

    /// The caller's namespace from its SPIFFE ID.
    pub fn source_namespace(&self) -> Option<&str> {
        self.source().and_then(SpiffeId::namespace)
    }

    /// The peer address.
    pub fn source_ip(&self) -> Option<IpAddr> {
        match &self.repr {
            Repr::Owned(a) => a.source_ip,
            Repr::Live { req, .. } => req.source_ip.map(|ip| ip.to_canonical()),
        }
    }

    /// The port the caller connected to.
    pub fn destination_port(&self) -> u16 {
        match &self.repr {
            Repr::Owned(a) => a.destination_port,
            Repr::Live { req, .. } => req.destination_port,
        }
    }

    /// The HTTP method.
    pub fn method(&self) -> &str {
        match &self.repr {
            Repr::Owned(a) => &a.method,
            Repr::Live { req, .. } => req.method.as_str(),
        }
    }

    /// The path without the query string.
    pub fn url_path(&self) -> &str {
        match &self.repr {
            Repr::Owned(a) => a.path.find('?').map_or(a.path.as_str(), |i| &a.path[..i]),
            Repr::Live { req, .. } => match req.uri.path() {
                "" => "/",
                p => p,
            },
        }
    }

    /// The lower-cased host.
    pub fn host(&self) -> &str {
        match &self.repr {
            Repr::Owned(a) => &a.host,
            Repr::Live { host, .. } => host,
        }
    }

    /// A header by lower-case name. A repeated header reads as its values joined by `, `.
    pub fn header(&self, lower_name: &str) -> Option<&str> {
        match &self.repr {
            Repr::Owned(a) => a.headers.get(lower_name).map(String::as_str),
            Repr::Live { req, .. } => {
                let mut values = req.headers.get_all(lower_name).iter().filter_map(|v| v.to_str().ok());
                let first = values.next()?;
                if values.next().is_none() {
                    return Some(first);
                }
                self.attributes().headers.get(lower_name).map(String::as_str)
            }
        }
    }

    /// The OPA-Envoy compatible input document as JSON (built on first use; for explanations
    /// and decision logs — Rego reads the same document without going through JSON).
    pub fn document(&self) -> &Value {
        self.json.get_or_init(|| serde_json::to_value(self.rego_value()).unwrap_or(Value::Null))
    }

    /// The document for a decision log: as [`Input::document`], with the values of credential
    /// headers and query parameters replaced by the one rule of [`crate::redact`], in the
    /// headers, the path and `parsed_query` alike.
    pub fn redacted_document(&self) -> Value {
        let mut doc = self.document().clone();
        if let Some(Value::Object(headers)) = doc.pointer_mut("/attributes/request/http/headers") {
            for (name, value) in headers.iter_mut() {
                if redact::is_secret(name) {
                    *value = Value::from(redact::REDACTED);
                }
            }
        }
        if let Some(Value::String(path)) = doc.pointer_mut("/attributes/request/http/path")
            && let Cow::Owned(hidden) = redact::query(path)
        {
            *path = hidden;
        }
        if let Some(Value::Object(query)) = doc.pointer_mut("/parsed_query") {
            for (name, values) in query.iter_mut() {
                if redact::is_secret(name)
                    && let Value::Array(values) = values
                {
                    values.iter_mut().for_each(|v| *v = Value::from(redact::REDACTED));
                }
            }
        }
        doc
    }

    /// The input document as a regorus value (built on first use, shared by every Rego policy).
    pub(crate) fn rego_value(&self) -> &regorus::Value {
        self.rego.get_or_init(|| build_document(self.attributes(), self.auth()))
    }
}

/// A live request's attributes, as [`Input::new`] would have normalised them. Header values
/// that are not visible ASCII are left out; a repeated header's values join with `, `.
fn copy_out(req: &LiveRequest<'_>, host: &str) -> RequestAttributes {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in req.headers {
        if let Ok(v) = value.to_str() {
            headers
                .entry(name.as_str().to_string())
                .and_modify(|cur| {
                    cur.push_str(", ");
                    cur.push_str(v);
                })
                .or_insert_with(|| v.to_string());
        }
    }
    RequestAttributes {
        source: req.source.cloned(),
        source_ip: req.source_ip.map(|ip| ip.to_canonical()),
        source_port: req.source_port,
        destination: req.destination.clone(),
        destination_port: req.destination_port,
        method: req.method.as_str().to_string(),
        path: req.uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        host: host.to_string(),
        scheme: req.scheme.to_string(),
        protocol: req.protocol.to_string(),
        headers,
    }
}

impl From<RequestAttributes> for Input<'static> {
    fn from(attrs: RequestAttributes) -> Self {
        Input::new(attrs)
    }
}

type RegoValue = regorus::Value;

/// An object from key/value pairs; `None` values are left out, as OPA-Envoy leaves out
/// attributes it does not have.
fn object<const N: usize>(pairs: [(&str, Option<RegoValue>); N]) -> RegoValue {
    let map: BTreeMap<RegoValue, RegoValue> =
        pairs.into_iter().filter_map(|(k, v)| v.map(|v| (RegoValue::from(k), v))).collect();
    RegoValue::from(map)
}

fn text(s: &str) -> Option<RegoValue> {
    Some(RegoValue::from(s))
}

fn identity_doc(id: &SpiffeId) -> Option<RegoValue> {
    let or_null = |s: Option<&str>| Some(s.map_or(RegoValue::Null, RegoValue::from));
    Some(object([
        ("namespace", or_null(id.namespace())),
        ("service_account", or_null(id.service_account())),
        ("trust_domain", text(id.trust_domain())),
    ]))
}

/// `input.palisade.jwt`: the verified end user's claims and principal, the only place a policy
/// document carries anything from a token.
fn jwt_doc(auth: &RequestAuth) -> RegoValue {
    object([
        ("claims", Some(RegoValue::from(Value::Object(auth.claims.clone())))),
        ("principal", text(&auth.principal)),
    ])
}

/// Builds the document straight into regorus values: Rego is the hot consumer, and going
/// through `serde_json` first doubled the cost.
fn build_document(a: &RequestAttributes, auth: Option<&RequestAuth>) -> RegoValue {
    let socket = a.source_ip.map(|ip| {
        object([(
            "socketAddress",
            Some(object([
                ("address", Some(RegoValue::from(ip.to_string()))),
                ("portValue", a.source_port.map(|p| RegoValue::from(u32::from(p)))),
            ])),
        )])
    });
    let source = object([("principal", a.source.as_ref().and_then(|id| text(id.as_str()))), ("address", socket)]);
    let destination = object([
        ("principal", text(a.destination.as_str())),
        (
            "address",
            Some(object([(
                "socketAddress",
                Some(object([("portValue", Some(RegoValue::from(u32::from(a.destination_port))))])),
            )])),
        ),
    ]);
    let headers: BTreeMap<RegoValue, RegoValue> =
        a.headers.iter().map(|(k, v)| (RegoValue::from(k.as_str()), RegoValue::from(v.as_str()))).collect();
    let http = object([
        ("method", text(&a.method)),
        ("path", text(&a.path)),
        ("host", text(&a.host)),
        ("scheme", text(&a.scheme)),
        ("protocol", text(&a.protocol)),
        ("headers", Some(RegoValue::from(headers))),
    ]);
    let (path_only, query) = match a.path.split_once('?') {
        Some((p, q)) => (p, q),
        None => (a.path.as_str(), ""),
    };
    let parsed_path: Vec<RegoValue> =
        path_only.trim_start_matches('/').split('/').map(|s| RegoValue::from(percent_decode(s, false))).collect();
    let mut parsed_query: BTreeMap<String, Vec<RegoValue>> = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        parsed_query.entry(percent_decode(k, true)).or_default().push(RegoValue::from(percent_decode(v, true)));
    }
    let parsed_query: BTreeMap<RegoValue, RegoValue> =
        parsed_query.into_iter().map(|(k, v)| (RegoValue::from(k), RegoValue::from(v))).collect();
    object([
        (
            "attributes",
            Some(object([
                ("source", Some(source)),
                ("destination", Some(destination)),
                ("request", Some(object([("http", Some(http))]))),
            ])),
        ),
        ("parsed_path", Some(RegoValue::from(parsed_path))),
        ("parsed_query", Some(RegoValue::from(parsed_query))),
        (
            "palisade",
            Some(object([
                ("source", a.source.as_ref().and_then(identity_doc)),
                ("destination", identity_doc(&a.destination)),
                ("tls", Some(RegoValue::from(a.source.is_some()))),
                ("jwt", auth.map(jwt_doc)),
            ])),
        ),
    ])
}

/// `%XX` decoding as Go's `url.PathUnescape`/`QueryUnescape` (which OPA-Envoy uses); a malformed
/// escape is kept literally rather than refused, since the proxy already accepted the request.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    if !s.contains(['%', '+']) {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn attrs(source: Option<&str>, method: &str, path: &str) -> RequestAttributes {
        RequestAttributes {
            source: source.map(|s| s.parse().unwrap()),
            source_ip: Some("10.1.2.3".parse().unwrap()),
            source_port: Some(40000),
            destination: "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap(),
            destination_port: 8080,
            method: method.into(),
            path: path.into(),
            host: "Orders.shop:8080".into(),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            headers: BTreeMap::from([("X-Tenant".to_string(), "a".to_string())]),
        }
    }

    #[test]
    fn document_is_opa_envoy_shaped() {
        let input = Input::new(attrs(
            Some("spiffe://cluster.local/ns/shop/sa/web"),
            "GET",
            "/orders/7%20x?expand=items&expand=price&q=a+b",
        ));
        let d = input.document();
        assert_eq!(d["attributes"]["source"]["principal"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(d["attributes"]["source"]["address"]["socketAddress"]["address"], "10.1.2.3");
        assert_eq!(d["attributes"]["source"]["address"]["socketAddress"]["portValue"], 40000);
        assert_eq!(d["attributes"]["destination"]["principal"], "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(d["attributes"]["request"]["http"]["method"], "GET");
        assert_eq!(d["attributes"]["request"]["http"]["host"], "orders.shop:8080");
        assert_eq!(d["attributes"]["request"]["http"]["headers"]["x-tenant"], "a");
        assert_eq!(d["parsed_path"], json!(["orders", "7 x"]));
        assert_eq!(d["parsed_query"]["expand"], json!(["items", "price"]));
        assert_eq!(d["parsed_query"]["q"], json!(["a b"]));
        assert_eq!(d["palisade"]["source"]["namespace"], "shop");
        assert_eq!(d["palisade"]["source"]["service_account"], "web");
        assert_eq!(d["palisade"]["destination"]["trust_domain"], "cluster.local");
        assert_eq!(d["palisade"]["tls"], true);
        assert_eq!(input.url_path(), "/orders/7%20x");
    }

    #[test]
    fn decision_log_document_hides_credentials() {
        let mut a = attrs(None, "GET", "/cb?access_token=s3cret&Password=s3cret&page=2");
        a.headers.insert("Authorization".into(), "Bearer s3cret".into());
        a.headers.insert("cookie".into(), "session=s3cret".into());
        a.headers.insert("X-Session-Id".into(), "s3cret".into());
        a.headers.insert("Api-Key".into(), "s3cret".into());
        let input = Input::new(a);
        let doc = input.redacted_document();
        let h = &doc["attributes"]["request"]["http"]["headers"];
        for name in ["authorization", "cookie", "x-session-id", "api-key"] {
            assert_eq!(h[name], redact::REDACTED, "{name}");
        }
        assert_eq!(h["x-tenant"], "a");
        assert_eq!(
            doc["attributes"]["request"]["http"]["path"],
            "/cb?access_token=[redacted]&Password=[redacted]&page=2"
        );
        assert_eq!(doc["parsed_query"]["access_token"], json!([redact::REDACTED]));
        assert_eq!(doc["parsed_query"]["page"], json!(["2"]));
        assert!(!doc.to_string().contains("s3cret"), "{doc}");
        // Policies still see the real values.
        assert_eq!(input.header("authorization"), Some("Bearer s3cret"));
        assert_eq!(input.document()["parsed_query"]["access_token"], json!(["s3cret"]));
    }

    #[test]
    fn verified_claims_appear_at_palisade_jwt_and_nowhere_else() {
        let plain = Input::new(attrs(Some("spiffe://cluster.local/ns/shop/sa/web"), "GET", "/"));
        assert!(plain.document()["palisade"].get("jwt").is_none());
        assert_eq!(plain.request_principal(), None);
        let claims = json!({"iss": "https://id.test", "sub": "alice", "aud": "orders", "azp": "web", "scope": "a b"});
        let auth = RequestAuth::from_claims(claims.as_object().unwrap().clone());
        assert_eq!((auth.principal.as_str(), auth.presenter.as_deref()), ("https://id.test/alice", Some("web")));
        assert_eq!(auth.audiences, ["orders"]);
        let input = Input::new(attrs(None, "GET", "/")).with_auth(auth);
        let d = input.document();
        assert_eq!(d["palisade"]["jwt"]["principal"], "https://id.test/alice");
        assert_eq!(d["palisade"]["jwt"]["claims"], claims);
        assert_eq!(input.request_principal(), Some("https://id.test/alice"));
        let list = RequestAuth::from_claims(json!({"aud": ["a", 7, "b"]}).as_object().unwrap().clone());
        assert_eq!((list.principal.as_str(), list.audiences), ("/", vec!["a".to_string(), "b".to_string()]));
    }

    #[test]
    fn plaintext_caller_has_no_principal() {
        let input = Input::new(attrs(None, "GET", "/"));
        let d = input.document();
        assert!(d["attributes"]["source"].get("principal").is_none());
        assert!(d["palisade"].get("source").is_none());
        assert_eq!(d["palisade"]["tls"], false);
        assert_eq!(d["parsed_path"], json!([""]));
    }

    #[test]
    fn request_json_shape() {
        let a: RequestAttributes = serde_json::from_str(
            r#"{"source":"spiffe://cluster.local/ns/shop/sa/web","source_ip":"10.0.0.9",
                "destination":"spiffe://cluster.local/ns/shop/sa/orders","destination_port":8080,
                "method":"GET","path":"/orders","headers":{"Host":"orders"}}"#,
        )
        .unwrap();
        let input = Input::new(a);
        assert_eq!(input.host(), "orders");
        assert_eq!(input.attributes().scheme, "http");
        assert!(
            serde_json::from_str::<RequestAttributes>(r#"{"destination":"x"}"#).is_err(),
            "a bad SPIFFE ID is refused"
        );
    }

    #[test]
    fn a_live_request_reads_as_its_copied_attributes() {
        let req = http::Request::get("/orders/7?expand=items")
            .header("Host", "Orders.Shop:8080")
            .header("x-tenant", "a")
            .header("accept", "text/plain")
            .header("accept", "application/json")
            .header("x-bin", http::HeaderValue::from_bytes(b"\xff").unwrap())
            .body(())
            .unwrap();
        let (source, destination): (SpiffeId, SpiffeId) = (
            "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap(),
        );
        let live = Input::live(LiveRequest {
            source: Some(&source),
            source_ip: Some("::ffff:10.1.2.3".parse().unwrap()),
            source_port: Some(40000),
            destination: &destination,
            destination_port: 8080,
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            scheme: "https",
            protocol: "HTTP/1.1",
            auth: None,
        });
        // What the rules engine reads, in place.
        assert_eq!(live.method(), "GET");
        assert_eq!(live.url_path(), "/orders/7");
        assert_eq!(live.host(), "orders.shop:8080");
        assert_eq!(live.header("x-tenant"), Some("a"));
        assert_eq!(live.header("accept"), Some("text/plain, application/json"));
        assert_eq!(live.header("x-bin"), None, "values that are not text are not seen");
        assert_eq!(live.source_ip(), Some("10.1.2.3".parse().unwrap()));
        // The same request given as attributes decides and documents the same.
        let owned = Input::new(RequestAttributes {
            source: Some(source.clone()),
            source_ip: Some("10.1.2.3".parse().unwrap()),
            source_port: Some(40000),
            destination: destination.clone(),
            destination_port: 8080,
            method: "GET".into(),
            path: "/orders/7?expand=items".into(),
            host: "orders.shop:8080".into(),
            scheme: "https".into(),
            protocol: "HTTP/1.1".into(),
            headers: BTreeMap::from([
                ("host".to_string(), "Orders.Shop:8080".to_string()),
                ("x-tenant".to_string(), "a".to_string()),
                ("accept".to_string(), "text/plain, application/json".to_string()),
            ]),
        });
        assert_eq!(live.attributes(), owned.attributes());
        assert_eq!(live.document(), owned.document());
        assert_eq!(live.header("accept"), owned.header("accept"));
    }

    #[test]
    fn percent_decoding_keeps_malformed_escapes() {
        assert_eq!(percent_decode("a%2Fb", false), "a/b");
        assert_eq!(percent_decode("100%", false), "100%");
        assert_eq!(percent_decode("%zz", false), "%zz");
        assert_eq!(percent_decode("a+b", false), "a+b");
    }
}

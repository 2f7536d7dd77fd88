//! The declarative engine: Istio-style `from`/`to`/`when` rules compiled into matchers when the
//! policy loads, so a request is matched with string comparisons only — no parsing, no
//! allocation.
//!
//! Semantics (as Istio): a policy matches when any rule matches; a rule matches when each of its
//! non-empty parts matches (`from`: any entry, `to`: any entry, `when`: every condition); within
//! an entry every non-empty field must match; a field matches when the value matches any pattern
//! and, for the `not*` field, none. A value the request does not have (no principal for a
//! plaintext caller) matches no positive pattern and no negative one.
//!
//! Opaque TCP (`protocol: tcp`) has no method, path, host or headers. As in Istio, a rule that
//! needs them never matches in an ALLOW policy, and in a DENY policy those fields are ignored, so
//! that a DENY never becomes weaker because the traffic is not HTTP.

use std::net::IpAddr;

use ipnet::IpNet;

use serde_json::Value;

use super::input::Input;
use super::resource::{self, Action, Port};

/// A load-time refusal: which field (a path like `spec.rules[0].to[0].operation.paths[1]`) and
/// why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    /// Where in the document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: String, message: impl Into<String>) -> RuleError {
    RuleError { field, message: message.into() }
}

/// A compiled string pattern: exact, `prefix*`, `*suffix` or `*`. Also what the rate-limit
/// guard matches paths, methods and principals with, so both spell patterns alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Any,
}

impl StrMatch {
    /// Compiles `pattern`; an error names `field`, the pattern's place in the document.
    pub fn parse(pattern: &str, field: &str) -> Result<Self, RuleError> {
        if pattern == "*" {
            return Ok(StrMatch::Any);
        }
        let stars = pattern.matches('*').count();
        if let Some(rest) = pattern.strip_suffix('*')
            && stars == 1
        {
            return Ok(StrMatch::Prefix(rest.into()));
        }
        if let Some(rest) = pattern.strip_prefix('*')
            && stars == 1
        {
            return Ok(StrMatch::Suffix(rest.into()));
        }
        if stars > 0 {
            return Err(err(
                field.to_string(),
                format!(
                    "pattern {pattern:?}: `*` is allowed only as the whole value, at the start (`*.example.com`) or at the end (`/api/*`)"
                ),
            ));
        }
        if pattern.is_empty() {
            return Err(err(field.to_string(), "empty pattern"));
        }
        Ok(StrMatch::Exact(pattern.into()))
    }

    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == &**e,
            StrMatch::Prefix(p) => v.starts_with(&**p),
            StrMatch::Suffix(s) => v.ends_with(&**s),
            StrMatch::Any => true,
        }
    }
}

/// Something a value of type `V` can be tested against.
trait Pattern<V: ?Sized> {
    fn test(&self, v: &V) -> bool;
}

impl Pattern<str> for StrMatch {
    fn test(&self, v: &str) -> bool {
        self.matches(v)
    }
}

impl Pattern<IpAddr> for IpNet {
    fn test(&self, v: &IpAddr) -> bool {
        self.contains(v)
    }
}

impl Pattern<u16> for u16 {
    fn test(&self, v: &u16) -> bool {
        self == v
    }
}

/// A positive list and its `not*` twin.
#[derive(Debug, Clone)]
struct Clause<M> {
    any: Vec<M>,
    none: Vec<M>,
}

impl<M> Clause<M> {
    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.none.is_empty()
    }

    /// `Ok` when it matches, else which half failed (`false`: positive, `true`: negative).
    fn check<V: ?Sized>(&self, v: Option<&V>) -> Result<(), bool>
    where
        M: Pattern<V>,
    {
        if !self.any.is_empty() && !v.is_some_and(|v| self.any.iter().any(|m| m.test(v))) {
            return Err(false);
        }
        if v.is_some_and(|v| self.none.iter().any(|m| m.test(v))) {
            return Err(true);
        }
        Ok(())
    }
}

fn strings(
    any: &[String],
    none: &[String],
    base: &str,
    names: (&str, &str),
    normalise: impl Fn(&str) -> String,
) -> Result<Clause<StrMatch>, RuleError> {
    let one = |list: &[String], name: &str| {
        list.iter()
            .enumerate()
            .map(|(i, p)| StrMatch::parse(&normalise(p), &format!("{base}.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Clause { any: one(any, names.0)?, none: one(none, names.1)? })
}

/// An exact path pattern also matches the same path with a trailing slash: most frameworks
/// route `/internal/` to `/internal` (Express, Flask and Spring by default), so a DENY on
/// `/internal` must cover both. Paths reach rules normalized (dot segments resolved, slashes
/// merged), so this is the one spelling left to cover.
fn with_trailing_slash(mut clause: Clause<StrMatch>) -> Clause<StrMatch> {
    let widen = |list: &mut Vec<StrMatch>| {
        let extra: Vec<StrMatch> = list
            .iter()
            .filter_map(|m| match m {
                StrMatch::Exact(p) if !p.ends_with('/') => Some(StrMatch::Exact(format!("{p}/").into())),
                _ => None,
            })
            .collect();
        list.extend(extra);
    };
    widen(&mut clause.any);
    widen(&mut clause.none);
    clause
}

fn parse_net(s: &str, field: String) -> Result<IpNet, RuleError> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| err(field, format!("{s:?} is neither a CIDR nor an IP address")))
}

fn nets(any: &[String], none: &[String], base: &str, names: (&str, &str)) -> Result<Clause<IpNet>, RuleError> {
    let one = |list: &[String], name: &str| {
        list.iter().enumerate().map(|(i, s)| parse_net(s, format!("{base}.{name}[{i}]"))).collect::<Result<Vec<_>, _>>()
    };
    Ok(Clause { any: one(any, names.0)?, none: one(none, names.1)? })
}

fn parse_port(p: &Port, field: String) -> Result<u16, RuleError> {
    let n = match p {
        Port::Number(n) => u16::try_from(*n).ok(),
        Port::Text(s) => s.trim().parse::<u16>().ok(),
    };
    n.filter(|n| *n != 0).ok_or_else(|| err(field, format!("{p:?} is not a port (1-65535)")))
}

fn ports(any: &[Port], none: &[Port], base: &str, names: (&str, &str)) -> Result<Clause<u16>, RuleError> {
    let one = |list: &[Port], name: &str| {
        list.iter()
            .enumerate()
            .map(|(i, p)| parse_port(p, format!("{base}.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Clause { any: one(any, names.0)?, none: one(none, names.1)? })
}

/// Principals may be written as Istio does (`cluster.local/ns/a/sa/b`) or as full SPIFFE IDs.
pub fn normalise_principal(p: &str) -> String {
    if p.starts_with('*') || p.starts_with("spiffe://") { p.to_string() } else { format!("spiffe://{p}") }
}

fn same(p: &str) -> String {
    p.to_string()
}

/// Istio's rule for an attribute with several values (a list claim, the audiences): some value
/// matches a positive pattern (when there are any), and none matches a negative one. `visit`
/// hands every value to its argument.
fn check_values(c: &Clause<StrMatch>, visit: impl FnOnce(&mut dyn FnMut(&str))) -> bool {
    let mut positive = c.any.is_empty();
    let mut negative = false;
    visit(&mut |v: &str| {
        positive |= c.any.iter().any(|m| m.matches(v));
        negative |= c.none.iter().any(|m| m.matches(v));
    });
    positive && !negative
}

/// A claim of the verified token, by path: `request.auth.claims[a][b]` is `["a", "b"]`.
#[derive(Debug, Clone)]
struct ClaimPath {
    path: Box<[Box<str>]>,
    /// `scope` and `scp` hold space-separated lists in one string (RFC 8693, Azure AD).
    space_separated: bool,
}

impl ClaimPath {
    /// `[a][b]` (what follows `request.auth.claims`).
    fn parse(mut rest: &str, field: &str) -> Result<Self, RuleError> {
        let mut path = Vec::new();
        while !rest.is_empty() {
            let inner = rest.strip_prefix('[').and_then(|r| r.split_once(']'));
            let Some((name, after)) = inner else {
                return Err(err(field.to_string(), "expected `request.auth.claims[NAME]`, nested as `[a][b]`"));
            };
            let name = name.trim().trim_matches(|c| c == '"' || c == '\'');
            if name.is_empty() {
                return Err(err(field.to_string(), "empty claim name"));
            }
            path.push(Box::from(name));
            rest = after;
        }
        if path.is_empty() {
            return Err(err(field.to_string(), "expected `request.auth.claims[NAME]`"));
        }
        let space_separated = matches!(path.last().map(|n| &**n), Some("scope" | "scp"));
        Ok(ClaimPath { path: path.into(), space_separated })
    }

    /// Every value of the claim as text: a string (split at spaces for `scope`/`scp`), each
    /// element of a list, a number or boolean as written in JSON. An object has no value.
    fn visit(&self, input: &Input, f: &mut dyn FnMut(&str)) {
        let Some(auth) = input.auth() else { return };
        let mut at = auth.claims.get(&*self.path[0]);
        for name in &self.path[1..] {
            at = at.and_then(Value::as_object).and_then(|o| o.get(&**name));
        }
        let mut one = |v: &Value| match v {
            Value::String(s) if self.space_separated => s.split(' ').filter(|p| !p.is_empty()).for_each(&mut *f),
            Value::String(s) => f(s),
            Value::Bool(b) => f(if *b { "true" } else { "false" }),
            Value::Number(n) => f(&n.to_string()),
            _ => {}
        };
        match at {
            Some(Value::Array(items)) => items.iter().for_each(&mut one),
            Some(v) => one(v),
            None => {}
        }
    }
}

#[derive(Debug, Clone)]
struct SourceMatcher {
    /// In a DENY policy, `requestPrincipals` is ignored for opaque TCP (it has no token).
    deny: bool,
    principals: Clause<StrMatch>,
    request_principals: Clause<StrMatch>,
    namespaces: Clause<StrMatch>,
    ip_blocks: Clause<IpNet>,
}

impl SourceMatcher {
    fn compile(s: &resource::Source, base: &str, deny: bool) -> Result<Self, RuleError> {
        let base = format!("{base}.source");
        Ok(SourceMatcher {
            deny,
            request_principals: strings(
                &s.request_principals,
                &s.not_request_principals,
                &base,
                ("requestPrincipals", "notRequestPrincipals"),
                same,
            )?,
            principals: strings(
                &s.principals,
                &s.not_principals,
                &base,
                ("principals", "notPrincipals"),
                normalise_principal,
            )?,
            namespaces: strings(&s.namespaces, &s.not_namespaces, &base, ("namespaces", "notNamespaces"), same)?,
            ip_blocks: nets(&s.ip_blocks, &s.not_ip_blocks, &base, ("ipBlocks", "notIpBlocks"))?,
        })
    }

    /// The first field that does not match.
    ///
    /// A field the rule leaves out is not read from the request (the caller's address is made
    /// canonical for every rule otherwise).
    fn miss(&self, input: &Input) -> Option<&'static str> {
        if let Err(neg) = self.principals.check(input.source_principal()) {
            return Some(if neg { "notPrincipals" } else { "principals" });
        }
        if !self.request_principals.is_empty() {
            if !input.is_http() {
                if !self.deny {
                    return Some("requestPrincipals");
                }
            } else if let Err(neg) = self.request_principals.check(input.request_principal()) {
                return Some(if neg { "notRequestPrincipals" } else { "requestPrincipals" });
            }
        }
        if !self.namespaces.is_empty()
            && let Err(neg) = self.namespaces.check(input.source_namespace())
        {
            return Some(if neg { "notNamespaces" } else { "namespaces" });
        }
        if !self.ip_blocks.is_empty()
            && let Err(neg) = self.ip_blocks.check(input.source_ip().as_ref())
        {
            return Some(if neg { "notIpBlocks" } else { "ipBlocks" });
        }
        None
    }
}

#[derive(Debug, Clone)]
struct OperationMatcher {
    /// In a DENY policy, HTTP-only fields are ignored for opaque TCP.
    deny: bool,
    methods: Clause<StrMatch>,
    paths: Clause<StrMatch>,
    ports: Clause<u16>,
    hosts: Clause<StrMatch>,
}

impl OperationMatcher {
    fn compile(o: &resource::Operation, base: &str, deny: bool) -> Result<Self, RuleError> {
        let base = format!("{base}.operation");
        Ok(OperationMatcher {
            deny,
            methods: strings(&o.methods, &o.not_methods, &base, ("methods", "notMethods"), same)?,
            paths: with_trailing_slash(strings(&o.paths, &o.not_paths, &base, ("paths", "notPaths"), same)?),
            ports: ports(&o.ports, &o.not_ports, &base, ("ports", "notPorts"))?,
            hosts: strings(&o.hosts, &o.not_hosts, &base, ("hosts", "notHosts"), |h| h.to_ascii_lowercase())?,
        })
    }

    fn miss(&self, input: &Input) -> Option<&'static str> {
        if let Err(neg) = self.ports.check(Some(&input.destination_port())) {
            return Some(if neg { "notPorts" } else { "ports" });
        }
        if !input.is_http() {
            let http_only = [(&self.methods, "methods"), (&self.paths, "paths"), (&self.hosts, "hosts")];
            return match http_only.iter().find(|(c, _)| !c.is_empty()) {
                Some((_, field)) if !self.deny => Some(field),
                _ => None,
            };
        }
        if let Err(neg) = self.methods.check(Some(input.method())) {
            return Some(if neg { "notMethods" } else { "methods" });
        }
        if let Err(neg) = self.paths.check(Some(input.url_path())) {
            return Some(if neg { "notPaths" } else { "paths" });
        }
        if !self.hosts.is_empty() {
            // `orders.shop:8080` matches a pattern written with or without the port.
            let host = input.host();
            let bare = strip_port(host);
            let positive =
                self.hosts.any.is_empty() || self.hosts.any.iter().any(|m| m.matches(host) || m.matches(bare));
            if !positive {
                return Some("hosts");
            }
            if self.hosts.none.iter().any(|m| m.matches(host) || m.matches(bare)) {
                return Some("notHosts");
            }
        }
        None
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        // `[::1]:80` and `name:80`, but not a bare IPv6 address.
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

/// A `when` condition compiled for its key.
#[derive(Debug, Clone)]
enum ConditionMatcher {
    /// Name, patterns, and whether the policy is a DENY (for opaque TCP).
    Header(Box<str>, Clause<StrMatch>, bool),
    SourcePrincipal(Clause<StrMatch>),
    SourceNamespace(Clause<StrMatch>),
    SourceIp(Clause<IpNet>),
    DestinationPort(Clause<u16>),
    /// `request.auth.*`: the verified end user; the flag says whether the policy is a DENY
    /// (for opaque TCP, which carries no token).
    RequestAuth(AuthKey, Clause<StrMatch>, bool),
}

/// Which part of the verified end user a `request.auth.*` condition reads.
#[derive(Debug, Clone)]
enum AuthKey {
    Principal,
    Audiences,
    Presenter,
    Claim(ClaimPath),
}

/// The `when` keys this build understands.
pub const SUPPORTED_WHEN_KEYS: &str = "request.headers[<name>], source.principal, source.namespace, source.ip, \
     destination.port, request.auth.principal, request.auth.audiences, request.auth.presenter, \
     request.auth.claims[<name>] (nested: [<a>][<b>])";

impl ConditionMatcher {
    fn compile(c: &resource::Condition, base: &str, deny: bool) -> Result<Self, RuleError> {
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(err(base.to_string(), format!("condition on {:?} has neither values nor notValues", c.key)));
        }
        let names = ("values", "notValues");
        let key = c.key.trim();
        if let Some(name) = key.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
            let name = name.trim_matches(|c| c == '"' || c == '\'');
            if name.is_empty() {
                return Err(err(format!("{base}.key"), "empty header name"));
            }
            return Ok(ConditionMatcher::Header(
                name.to_ascii_lowercase().into(),
                strings(&c.values, &c.not_values, base, names, same)?,
                deny,
            ));
        }
        Ok(match key {
            "source.principal" => {
                ConditionMatcher::SourcePrincipal(strings(&c.values, &c.not_values, base, names, normalise_principal)?)
            }
            "source.namespace" => {
                ConditionMatcher::SourceNamespace(strings(&c.values, &c.not_values, base, names, same)?)
            }
            "source.ip" => ConditionMatcher::SourceIp(nets(&c.values, &c.not_values, base, names)?),
            "destination.port" => {
                let to_ports = |v: &[String]| v.iter().cloned().map(Port::Text).collect::<Vec<_>>();
                ConditionMatcher::DestinationPort(ports(&to_ports(&c.values), &to_ports(&c.not_values), base, names)?)
            }
            k if k.starts_with("request.auth.") => {
                let auth_key = match &k["request.auth.".len()..] {
                    "principal" => AuthKey::Principal,
                    "audiences" => AuthKey::Audiences,
                    "presenter" => AuthKey::Presenter,
                    claims if claims.starts_with("claims") => {
                        AuthKey::Claim(ClaimPath::parse(&claims["claims".len()..], &format!("{base}.key"))?)
                    }
                    _ => {
                        return Err(err(
                            format!("{base}.key"),
                            format!("unknown key {k:?}; supported keys: {SUPPORTED_WHEN_KEYS}"),
                        ));
                    }
                };
                ConditionMatcher::RequestAuth(auth_key, strings(&c.values, &c.not_values, base, names, same)?, deny)
            }
            k => {
                return Err(err(
                    format!("{base}.key"),
                    format!("unknown key {k:?}; supported keys: {SUPPORTED_WHEN_KEYS}"),
                ));
            }
        })
    }

    fn matches(&self, input: &Input) -> bool {
        match self {
            ConditionMatcher::Header(_, _, deny) if !input.is_http() => *deny,
            ConditionMatcher::Header(name, c, _) => c.check(input.header(name)).is_ok(),
            ConditionMatcher::SourcePrincipal(c) => c.check(input.source_principal()).is_ok(),
            ConditionMatcher::SourceNamespace(c) => c.check(input.source_namespace()).is_ok(),
            ConditionMatcher::SourceIp(c) => c.check(input.source_ip().as_ref()).is_ok(),
            ConditionMatcher::DestinationPort(c) => c.check(Some(&input.destination_port())).is_ok(),
            ConditionMatcher::RequestAuth(_, _, deny) if !input.is_http() => *deny,
            ConditionMatcher::RequestAuth(key, c, _) => match key {
                AuthKey::Principal => c.check(input.request_principal()).is_ok(),
                AuthKey::Presenter => c.check(input.auth().and_then(|a| a.presenter.as_deref())).is_ok(),
                AuthKey::Audiences => check_values(c, |f| {
                    input.auth().into_iter().flat_map(|a| &a.audiences).for_each(|a| f(a));
                }),
                AuthKey::Claim(path) => check_values(c, |f| path.visit(input, f)),
            },
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    from: Vec<SourceMatcher>,
    to: Vec<OperationMatcher>,
    when: Vec<(String, ConditionMatcher)>,
}

impl CompiledRule {
    fn compile(r: &resource::Rule, base: &str, deny: bool) -> Result<Self, RuleError> {
        Ok(CompiledRule {
            from: r
                .from
                .iter()
                .enumerate()
                .map(|(i, f)| SourceMatcher::compile(&f.source, &format!("{base}.from[{i}]"), deny))
                .collect::<Result<_, _>>()?,
            to: r
                .to
                .iter()
                .enumerate()
                .map(|(i, t)| OperationMatcher::compile(&t.operation, &format!("{base}.to[{i}]"), deny))
                .collect::<Result<_, _>>()?,
            when: r
                .when
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    ConditionMatcher::compile(c, &format!("{base}.when[{i}]"), deny).map(|m| (c.key.clone(), m))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    fn matches(&self, input: &Input) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.miss(input).is_none()))
            && (self.to.is_empty() || self.to.iter().any(|o| o.miss(input).is_none()))
            && self.when.iter().all(|(_, c)| c.matches(input))
    }

    /// Why the rule does not match: the first failing clause.
    fn why_not(&self, input: &Input) -> Option<String> {
        if !self.from.is_empty() && self.from.iter().all(|s| s.miss(input).is_some()) {
            let misses: Vec<String> = self
                .from
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.miss(input).map(|f| format!("from[{i}].source.{f}")))
                .collect();
            return Some(format!(
                "{} did not match (source principal {}, request principal {}, namespace {}, ip {})",
                misses.join(", "),
                input.source_principal().unwrap_or("<none>"),
                input.request_principal().unwrap_or("<none>"),
                input.source_namespace().unwrap_or("<none>"),
                input.source_ip().map_or_else(|| "<none>".to_string(), |ip| ip.to_string()),
            ));
        }
        if !self.to.is_empty() && self.to.iter().all(|o| o.miss(input).is_some()) {
            let misses: Vec<String> = self
                .to
                .iter()
                .enumerate()
                .filter_map(|(i, o)| o.miss(input).map(|f| format!("to[{i}].operation.{f}")))
                .collect();
            return Some(format!(
                "{} did not match (method {}, path {}, port {}, host {})",
                misses.join(", "),
                input.method(),
                input.url_path(),
                input.destination_port(),
                if input.host().is_empty() { "<none>" } else { input.host() },
            ));
        }
        self.when
            .iter()
            .enumerate()
            .find(|(_, (_, c))| !c.matches(input))
            .map(|(i, (key, _))| format!("when[{i}] ({key}) did not match"))
    }
}

/// A policy's rules, compiled.
#[derive(Debug, Clone)]
pub struct RulesEngine {
    rules: Vec<CompiledRule>,
}

impl RulesEngine {
    /// Compiles `spec.rules` for a policy with `action`; the error names the offending field.
    pub fn compile(rules: &[resource::Rule], action: Action) -> Result<Self, RuleError> {
        let deny = action == Action::Deny;
        Ok(RulesEngine {
            rules: rules
                .iter()
                .enumerate()
                .map(|(i, r)| CompiledRule::compile(r, &format!("spec.rules[{i}]"), deny))
                .collect::<Result<_, _>>()?,
        })
    }

    /// How many rules the policy has.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The index of the first matching rule.
    pub fn first_match(&self, input: &Input) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(input))
    }

    /// The matching rule, or for every rule the first clause that failed.
    pub fn explain(&self, input: &Input) -> Result<usize, Vec<String>> {
        let mut why = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate() {
            match r.why_not(input) {
                None => return Ok(i),
                Some(w) => why.push(format!("rules[{i}]: {w}")),
            }
        }
        if why.is_empty() {
            why.push("the policy has no rules, so it matches nothing".to_string());
        }
        Err(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::input::tests::attrs;

    fn engine(yaml: &str) -> RulesEngine {
        let rules: Vec<resource::Rule> = serde_yaml::from_str(yaml).unwrap();
        RulesEngine::compile(&rules, Action::Allow).unwrap()
    }

    fn compile_err(yaml: &str) -> RuleError {
        let rules: Vec<resource::Rule> = serde_yaml::from_str(yaml).unwrap();
        RulesEngine::compile(&rules, Action::Allow).unwrap_err()
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

    fn req(source: Option<&str>, method: &str, path: &str) -> Input<'static> {
        Input::new(attrs(source, method, path))
    }

    #[test]
    fn issue_example_allows_and_denies_as_written() {
        let e = engine(
            r#"
- from: [{source: {principals: ["spiffe://cluster.local/ns/shop/sa/web"]}}]
  to:   [{operation: {methods: ["GET"], paths: ["/orders/*"]}}]
  when: [{key: "request.headers[x-tenant]", values: ["a"]}]
"#,
        );
        assert_eq!(e.first_match(&req(Some(WEB), "GET", "/orders/7?x=1")), Some(0));
        assert_eq!(e.first_match(&req(Some(WEB), "POST", "/orders/7")), None);
        assert_eq!(e.first_match(&req(Some(WEB), "GET", "/admin")), None);
        assert_eq!(e.first_match(&req(Some(ADMIN), "GET", "/orders/7")), None);
        assert_eq!(e.first_match(&req(None, "GET", "/orders/7")), None);
        let mut a = attrs(Some(WEB), "GET", "/orders/7");
        a.headers.insert("X-Tenant".into(), "b".into());
        assert_eq!(e.first_match(&Input::new(a)), None);
    }

    #[test]
    fn wildcards() {
        for (pattern, value, expect) in [
            ("/orders", "/orders", true),
            ("/orders", "/orders/1", false),
            ("/orders", "/orders/", true),
            ("/orders", "/orderss", false),
            ("/orders/", "/orders", false),
            ("/orders/*", "/orders/1", true),
            ("/orders/*", "/order", false),
            ("*.json", "/a/b.json", true),
            ("*.json", "/a/b.xml", false),
            ("*", "/anything", true),
        ] {
            let e = engine(&format!("[{{to: [{{operation: {{paths: [\"{pattern}\"]}}}}]}}]"));
            assert_eq!(e.first_match(&req(Some(WEB), "GET", value)).is_some(), expect, "{pattern} vs {value}");
        }
        let e = engine(r#"[{from: [{source: {principals: ["cluster.local/ns/shop/*"]}}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some());
        assert!(e.first_match(&req(Some(ADMIN), "GET", "/")).is_none());
        let e = engine(r#"[{to: [{operation: {hosts: ["ORDERS.*"]}}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some());
        let e = engine(r#"[{to: [{operation: {hosts: ["*.shop"]}}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some(), "port stripped");
        let bad = compile_err(r#"[{to: [{operation: {paths: ["/a/*/b"]}}]}]"#);
        assert_eq!(bad.field, "spec.rules[0].to[0].operation.paths[0]");
    }

    #[test]
    fn not_principals_and_namespaces() {
        let e = engine(r#"[{from: [{source: {notPrincipals: ["spiffe://cluster.local/ns/shop/sa/web"]}}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_none());
        assert!(e.first_match(&req(Some(ADMIN), "GET", "/")).is_some());
        // Istio: notPrincipals ["*"] matches callers without an identity.
        let e = engine(r#"[{from: [{source: {notPrincipals: ["*"]}}]}]"#);
        assert!(e.first_match(&req(None, "GET", "/")).is_some());
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_none());
        let e = engine(r#"[{from: [{source: {namespaces: ["ops"], notNamespaces: ["shop"]}}]}]"#);
        assert!(e.first_match(&req(Some(ADMIN), "GET", "/")).is_some());
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_none());
    }

    #[test]
    fn ip_blocks() {
        let e =
            engine(r#"[{from: [{source: {ipBlocks: ["10.1.0.0/16", "192.168.1.1"], notIpBlocks: ["10.1.2.0/24"]}}]}]"#);
        let at = |ip: &str| {
            let mut a = attrs(Some(WEB), "GET", "/");
            a.source_ip = Some(ip.parse().unwrap());
            e.first_match(&Input::new(a)).is_some()
        };
        assert!(at("10.1.9.9"));
        assert!(!at("10.1.2.3"), "notIpBlocks excludes");
        assert!(at("192.168.1.1"));
        assert!(!at("192.168.1.2"));
        assert!(at("::ffff:10.1.9.9"), "IPv4-mapped addresses are canonicalised");
        let bad = compile_err(r#"[{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]"#);
        assert_eq!(bad.field, "spec.rules[0].from[0].source.ipBlocks[0]");
    }

    #[test]
    fn header_and_other_when_keys() {
        let e = engine(
            r#"[{when: [{key: "request.headers[X-Tenant]", values: ["a", "b*"]}, {key: "source.ip", notValues: ["10.9.0.0/16"]}, {key: "destination.port", values: ["8080"]}]}]"#,
        );
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some());
        let mut a = attrs(Some(WEB), "GET", "/");
        a.headers.clear();
        assert!(e.first_match(&Input::new(a)).is_none(), "missing header");
        let e = engine(r#"[{when: [{key: "request.headers[x-debug]", notValues: ["*"]}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some(), "absent header passes notValues");
        let e = engine(r#"[{when: [{key: "source.namespace", values: ["shop"]}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some());
        assert!(e.first_match(&req(Some(ADMIN), "GET", "/")).is_none());
    }

    #[test]
    fn unsupported_when_keys_fail_at_load() {
        for bad in ["request.auth.claims", "request.auth.claims[]", "request.auth.claims[a]b", "request.auth.claims[a"]
        {
            let e = compile_err(&format!(r#"[{{when: [{{key: "{bad}", values: ["x"]}}]}}]"#));
            assert_eq!(e.field, "spec.rules[0].when[0].key", "{bad}");
            assert!(e.message.contains("claim"), "{bad}: {e}");
        }
        let e = compile_err(r#"[{when: [{key: "request.auth.colour", values: ["x"]}]}]"#);
        assert!(e.message.contains("unknown key"), "{e}");
        let e = compile_err(r#"[{when: [{key: "request.colour", values: ["x"]}]}]"#);
        assert!(e.message.contains("unknown key"), "{e}");
        let e = compile_err(r#"[{when: [{key: "source.ip"}]}]"#);
        assert!(e.message.contains("neither values nor notValues"), "{e}");
    }

    #[test]
    fn ports_and_methods() {
        let e = engine(r#"[{to: [{operation: {ports: [8080], notMethods: ["DELETE"]}}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some());
        assert!(e.first_match(&req(Some(WEB), "DELETE", "/")).is_none());
        let e = engine(r#"[{to: [{operation: {ports: ["9090"]}}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_none());
        let bad = compile_err(r#"[{to: [{operation: {ports: [70000]}}]}]"#);
        assert_eq!(bad.field, "spec.rules[0].to[0].operation.ports[0]");
    }

    #[test]
    fn empty_rule_matches_everything_and_no_rules_match_nothing() {
        assert_eq!(engine("[{}]").first_match(&req(None, "GET", "/")), Some(0));
        let none = engine("[]");
        assert_eq!(none.first_match(&req(Some(WEB), "GET", "/")), None);
        assert!(none.explain(&req(Some(WEB), "GET", "/")).is_err());
    }

    #[test]
    fn opaque_tcp_allow_never_matches_http_fields_deny_ignores_them() {
        let yaml = r#"
- from: [{source: {namespaces: ["shop"]}}]
  to: [{operation: {ports: [8080], methods: ["POST"]}}]
  when: [{key: "request.headers[x-tenant]", values: ["a"]}]
"#;
        let rules: Vec<resource::Rule> = serde_yaml::from_str(yaml).unwrap();
        let allow = RulesEngine::compile(&rules, Action::Allow).unwrap();
        let deny = RulesEngine::compile(&rules, Action::Deny).unwrap();
        let mut a = attrs(Some(WEB), "", "");
        a.protocol = "tcp".into();
        let tcp = Input::new(a);
        assert_eq!(allow.first_match(&tcp), None);
        assert_eq!(deny.first_match(&tcp), Some(0));
        let mut a = attrs(Some(WEB), "", "");
        a.protocol = "TCP".into();
        a.destination_port = 9090;
        assert_eq!(deny.first_match(&Input::new(a)), None, "ports still apply");
        // Over HTTP the method decides for both.
        assert_eq!(deny.first_match(&req(Some(WEB), "GET", "/")), None);
        assert_eq!(allow.first_match(&req(Some(WEB), "POST", "/")), Some(0));
    }

    #[test]
    fn explain_names_the_first_failing_clause() {
        let e = engine(
            r#"
- from: [{source: {principals: ["spiffe://cluster.local/ns/ops/*"]}}]
- to: [{operation: {methods: ["GET"], paths: ["/admin/*"]}}]
- when: [{key: "request.headers[x-tenant]", values: ["z"]}]
"#,
        );
        let why = e.explain(&req(Some(WEB), "GET", "/orders")).unwrap_err();
        assert!(why[0].contains("from[0].source.principals"), "{why:?}");
        assert!(why[1].contains("to[0].operation.paths"), "{why:?}");
        assert!(why[2].contains("when[0] (request.headers[x-tenant])"), "{why:?}");
        assert_eq!(e.explain(&req(Some(ADMIN), "GET", "/")), Ok(0));
    }

    fn with_user(source: Option<&str>, claims: serde_json::Value) -> Input<'static> {
        let auth = crate::policy::input::RequestAuth::from_claims(claims.as_object().unwrap().clone());
        req(source, "GET", "/orders/1").with_auth(auth)
    }

    fn alice() -> Input<'static> {
        with_user(
            Some(WEB),
            serde_json::json!({"iss": "https://id.test", "sub": "alice", "aud": ["orders", "billing"], "azp": "web-app",
                "scope": "orders:read  orders:write", "groups": ["staff", "eu"], "age": 42, "admin": false,
                "org": {"tenant": {"id": "acme"}}, "https://id.test/roles": ["reader"]}),
        )
    }

    #[test]
    fn request_principals_match_the_verified_end_user() {
        let e = engine(r#"[{from: [{source: {requestPrincipals: ["https://id.test/*"]}}]}]"#);
        assert!(e.first_match(&alice()).is_some());
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_none(), "no token, no request principal");
        let e = engine(r#"[{from: [{source: {requestPrincipals: ["*"]}}]}]"#);
        assert!(e.first_match(&alice()).is_some(), "`*`: any verified token");
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_none());
        let e = engine(r#"[{from: [{source: {notRequestPrincipals: ["*"]}}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_some(), "Istio's idiom for requests without a token");
        assert!(e.first_match(&alice()).is_none());
        let e = engine(
            r#"[{from: [{source: {requestPrincipals: ["https://id.test/alice"], principals: ["*/sa/admin"]}}]}]"#,
        );
        assert!(e.first_match(&alice()).is_none(), "every field of a source must match");
        let why = e.explain(&alice()).unwrap_err();
        assert!(why[0].contains("request principal https://id.test/alice"), "{why:?}");
    }

    #[test]
    fn request_auth_conditions_read_claims_lists_and_scopes() {
        let matches = |key: &str, values: &str| {
            let e = engine(&format!(r#"[{{when: [{{key: "{key}", {values}}}]}}]"#));
            e.first_match(&alice()).is_some()
        };
        assert!(matches("request.auth.principal", r#"values: ["https://id.test/alice"]"#));
        assert!(matches("request.auth.audiences", r#"values: ["billing"]"#));
        assert!(!matches("request.auth.audiences", r#"values: ["admin"]"#));
        assert!(!matches("request.auth.audiences", r#"notValues: ["orders"]"#), "any value excluded excludes");
        assert!(matches("request.auth.presenter", r#"values: ["web-*"]"#));
        assert!(matches("request.auth.claims[scope]", r#"values: ["orders:write"]"#), "space-separated scope");
        assert!(!matches("request.auth.claims[scope]", r#"values: ["orders:read  orders:write"]"#));
        assert!(matches("request.auth.claims[groups]", r#"values: ["eu"]"#));
        assert!(!matches("request.auth.claims[groups]", r#"notValues: ["staff"]"#));
        assert!(matches("request.auth.claims[age]", r#"values: ["42"]"#));
        assert!(matches("request.auth.claims[admin]", r#"values: ["false"]"#));
        assert!(matches("request.auth.claims[org][tenant][id]", r#"values: ["acme"]"#));
        assert!(matches("request.auth.claims[https://id.test/roles]", r#"values: ["reader"]"#));
        assert!(!matches("request.auth.claims[org]", r#"values: ["*"]"#), "an object has no value");
        assert!(!matches("request.auth.claims[missing]", r#"values: ["*"]"#));
        assert!(matches("request.auth.claims[missing]", r#"notValues: ["x"]"#), "absent passes notValues");
        // Without a verified token nothing under request.auth has a value.
        let e = engine(r#"[{when: [{key: "request.auth.claims[sub]", values: ["*"]}]}]"#);
        assert!(e.first_match(&req(Some(WEB), "GET", "/")).is_none());
    }

    #[test]
    fn opaque_tcp_has_no_end_user_allow_never_matches_deny_ignores() {
        let yaml = r#"[{from: [{source: {requestPrincipals: ["*"]}}], when: [{key: "request.auth.claims[sub]", values: ["alice"]}]}]"#;
        let rules: Vec<resource::Rule> = serde_yaml::from_str(yaml).unwrap();
        let mut a = attrs(Some(WEB), "", "");
        a.protocol = "tcp".into();
        let tcp = Input::new(a);
        assert_eq!(RulesEngine::compile(&rules, Action::Allow).unwrap().first_match(&tcp), None);
        assert_eq!(RulesEngine::compile(&rules, Action::Deny).unwrap().first_match(&tcp), Some(0));
    }
}

//! SPIFFE IDs: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// A workload identity as carried in a certificate's URI SAN.
///
/// Parsing is strict on purpose: an ID that reaches a policy decision or a certificate has been
/// checked once, here, and is compared byte for byte everywhere else.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Offsets into `uri` (at most 2048 bytes, so `u16`: an ID is part of every request's
    /// policy input and stays small).
    td_end: u16,
    /// Where the values of `/ns/<namespace>` and `/sa/<service-account>` sit in `uri`, found
    /// once when the ID is parsed (once per peer connection): policy reads the namespace per
    /// request.
    ns: Option<(u16, u16)>,
    sa: Option<(u16, u16)>,
}

/// Why a string is not an acceptable SPIFFE ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID must start with spiffe:// (got {0:?})")]
    Scheme(String),
    #[error("SPIFFE ID {0:?} has an empty or invalid trust domain")]
    TrustDomain(String),
    #[error("SPIFFE ID {0:?} has an invalid path (segments must be non-empty, no '.', '..', query or fragment)")]
    Path(String),
}

impl SpiffeId {
    /// The Kubernetes-style identity of a service account.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The identity the control plane's serving certificate carries in `trust_domain`; a sidecar
    /// accepts no other at the control-plane address. An invalid trust domain is an error, never
    /// a silent fallback to another domain.
    pub fn control_plane(trust_domain: &str) -> Result<Self, SpiffeIdError> {
        Self::workload(trust_domain, "palisade-system", "palisade-control")
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.td_end.into()]
    }

    /// The path after the trust domain, starting with `/` (may be empty).
    pub fn path(&self) -> &str {
        &self.uri[usize::from(self.td_end)..]
    }

    /// The namespace (`/ns/<namespace>`), if the ID follows the Kubernetes shape.
    pub fn namespace(&self) -> Option<&str> {
        self.ns.map(|(start, end)| &self.uri[start.into()..end.into()])
    }

    /// The service account (`/sa/<sa>`), if the ID follows the Kubernetes shape.
    pub fn service_account(&self) -> Option<&str> {
        self.sa.map(|(start, end)| &self.uri[start.into()..end.into()])
    }
}

/// The bounds in `uri` of the segment after the first segment `key` of the path, which starts
/// at `path_start`.
fn segment_after(uri: &str, path_start: usize, key: &str) -> Option<(u16, u16)> {
    // Past the path's leading '/'; an empty path has no segments.
    let mut at = path_start + 1;
    let mut parts = uri.get(at..)?.split('/');
    while let Some(p) = parts.next() {
        at += p.len() + 1;
        if p == key {
            // Both fit: an ID is at most 2048 bytes (`from_str` refuses a longer path; a trust
            // domain alone is at most 255).
            return parts.next().map(|value| (at as u16, (at + value.len()) as u16));
        }
    }
    None
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let td = &rest[..td_len];
        let td_ok = !td.is_empty()
            && td.len() <= 255
            && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !td_ok {
            return Err(SpiffeIdError::TrustDomain(s.to_string()));
        }
        let path = &rest[td_len..];
        if !path.is_empty() {
            let ok = path[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            });
            if !ok || s.len() > 2048 {
                return Err(SpiffeIdError::Path(s.to_string()));
            }
        }
        let td_end = "spiffe://".len() + td_len;
        let (ns, sa) = (segment_after(s, td_end, "ns"), segment_after(s, td_end, "sa"));
        Ok(SpiffeId { uri: s.to_string(), td_end: td_end as u16, ns, sa })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_shape() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.service_account(), Some("web"));
        assert_eq!(id.path(), "/ns/shop/sa/web");
    }

    #[test]
    fn namespace_and_service_account_follow_their_keys_wherever_they_are() {
        let cases = [
            ("spiffe://td/sa/web/ns/shop", Some("shop"), Some("web")),
            ("spiffe://td/region/eu/ns/shop", Some("shop"), None),
            ("spiffe://td/ns/ns/sa/sa", Some("ns"), Some("sa")),
            ("spiffe://td/ns", None, None),
            ("spiffe://td/x/sa", None, None),
            ("spiffe://td", None, None),
            ("spiffe://nsns/ns-x/ns/a.b", Some("a.b"), None),
        ];
        for (uri, ns, sa) in cases {
            let id: SpiffeId = uri.parse().unwrap();
            assert_eq!((id.namespace(), id.service_account()), (ns, sa), "{uri}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://Cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b/",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
        }
    }
}

use super::*;
use crate::control::source::validate;

fn res(kind: &str, name: &str, spec: serde_json::Value) -> Resource {
    validate(kind, "shop", name, BTreeMap::new(), spec, format!("test#{name}")).unwrap()
}

fn orders() -> Workload {
    Workload {
        name: "Deployment shop/orders".into(),
        namespace: "shop".into(),
        labels: [("app".to_string(), "orders".to_string())].into(),
        identity: Some("spiffe://cluster.local/ns/shop/sa/orders".into()),
    }
}

/// Default deny, egress deny: the settings of a clean mesh.
fn input(resources: Vec<Resource>) -> AuditInput {
    AuditInput {
        settings: AuditSettings { egress: "deny".into(), ..AuditSettings::default() },
        resources,
        workloads: vec![orders()],
        now: 1_000_000_000,
        ..AuditInput::default()
    }
}

fn checks(findings: &[Finding]) -> Vec<&'static str> {
    findings.iter().map(|f| f.check).collect()
}

fn allow_one_principal() -> Resource {
    res(
        "AuthorizationPolicy",
        "allow-web",
        serde_json::json!({"selector": {"matchLabels": {"app": "orders"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}),
    )
}

fn sidecar(patch: serde_json::Value) -> SidecarEntry {
    let mut entry = serde_json::json!({"spiffe_id": "spiffe://cluster.local/ns/shop/sa/orders", "addresses": [],
        "labels": {}, "pushed_version": "v2", "acked_version": "v2", "nack_message": "", "connected": true,
        "last_seen": 1_000_000_000, "certificate_not_after": 1_000_000_000 + 3000});
    for (k, v) in patch.as_object().unwrap() {
        entry[k] = v.clone();
    }
    serde_json::from_value(entry).unwrap()
}

#[test]
fn a_clean_mesh_has_no_finding() {
    let strict = res("PeerAuthentication", "default", serde_json::json!({"mtls": {"mode": "STRICT"}}));
    let mut i = input(vec![strict, allow_one_principal()]);
    i.sidecars = Some(vec![sidecar(serde_json::json!({}))]);
    i.roots = vec![RootInfo { generation: 1, not_before: i.now - 86400, not_after: i.now + 10 * 365 * 86400 }];
    i.ca_key_sealed = Some(true);
    assert_eq!(audit(&i), vec![]);
}

#[test]
fn permissive_mtls_by_namespace_selector_and_port() {
    let ns = res("PeerAuthentication", "default", serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}));
    let f = audit(&input(vec![ns.clone()]));
    assert_eq!(checks(&f), ["permissive-mtls"]);
    assert_eq!((f[0].severity, f[0].object.as_str()), (Severity::High, "Deployment shop/orders"));
    assert!(f[0].fix.contains("spec.mtls.mode to STRICT in PeerAuthentication shop/default"), "{}", f[0].fix);

    // A selector's STRICT beats the namespace's PERMISSIVE, as the control plane chooses; its
    // PERMISSIVE port is still a port without mTLS.
    let by_selector = res(
        "PeerAuthentication",
        "orders",
        serde_json::json!({"selector": {"matchLabels": {"app": "orders"}}, "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
    );
    let f = audit(&input(vec![ns.clone(), by_selector]));
    assert_eq!(checks(&f), ["port-without-mtls", "permissive-mtls"], "{f:#?}");
    assert_eq!(f[0].object, "Deployment shop/orders port 9090");
    assert_eq!(f[1].object, "PeerAuthentication shop/default", "the namespace's resource governs no known workload");
    assert_eq!(f[1].severity, Severity::Medium);

    let strict = res("PeerAuthentication", "default", serde_json::json!({"mtls": {"mode": "STRICT"}}));
    assert_eq!(audit(&input(vec![strict])), vec![]);
}

#[test]
fn allow_policies_that_let_any_caller_through() {
    let wide = [
        serde_json::json!([{}]),
        serde_json::json!([{"to": [{"operation": {"paths": ["/api/*"]}}]}]),
        serde_json::json!([{"from": [{"source": {"principals": ["*"]}}]}]),
        serde_json::json!([{"from": [{"source": {"namespaces": ["*"]}}]}]),
        serde_json::json!([{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}, {"to": [{"operation": {"methods": ["GET"]}}]}]),
    ];
    for rules in wide {
        let p = res("AuthorizationPolicy", "p", serde_json::json!({"action": "ALLOW", "rules": rules}));
        let f = audit(&input(vec![p]));
        assert_eq!(checks(&f), ["allow-any-caller"], "{rules}");
        assert_eq!((f[0].severity, f[0].object.as_str()), (Severity::High, "AuthorizationPolicy shop/p"));
        assert!(f[0].fix.contains("principals"), "{}", f[0].fix);
    }
    let narrow = [
        serde_json::json!([{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]),
        serde_json::json!([{"from": [{"source": {"namespaces": ["shop"]}}]}]),
        serde_json::json!([{"when": [{"key": "source.namespace", "values": ["shop"]}]}]),
        serde_json::json!([{"from": [{"source": {"requestPrincipals": ["*"]}}]}]),
    ];
    for rules in narrow {
        let p = res("AuthorizationPolicy", "p", serde_json::json!({"action": "ALLOW", "rules": rules}));
        assert_eq!(audit(&input(vec![p])), vec![], "{rules}");
    }
    let deny = res("AuthorizationPolicy", "d", serde_json::json!({"action": "DENY", "rules": [{}]}));
    assert_eq!(audit(&input(vec![deny])), vec![], "a DENY for everyone is strict, not open");
}

#[test]
fn workloads_without_an_allow_policy_under_a_permissive_default() {
    for (default, severity) in [("allow", Severity::High), ("allow-authenticated", Severity::Medium)] {
        let mut i = input(vec![]);
        i.settings.default_policy = default.into();
        let f = audit(&i);
        assert_eq!(checks(&f), ["no-allow-policy"]);
        assert_eq!((f[0].severity, f[0].object.as_str()), (severity, "Deployment shop/orders"));
        assert!(f[0].fix.contains("--default-policy deny"), "{}", f[0].fix);
        i.resources.push(allow_one_principal());
        assert_eq!(audit(&i), vec![], "an ALLOW policy selects it");
    }
    assert_eq!(audit(&input(vec![])), vec![], "default deny: nothing passes without a policy");
}

#[test]
fn egress_allow() {
    let mut i = input(vec![]);
    i.settings.egress = "allow".into();
    let f = audit(&i);
    assert_eq!(checks(&f), ["egress-allow"]);
    assert_eq!(
        (f[0].severity, f[0].fix.as_str()),
        (Severity::Medium, "start the control plane with --egress deny (PALISADE_EGRESS=deny)")
    );
    assert_eq!(audit(&input(vec![])), vec![]);
}

#[test]
fn request_authentication_without_a_policy_requiring_a_principal() {
    let ra = res(
        "RequestAuthentication",
        "jwt",
        serde_json::json!({"selector": {"matchLabels": {"app": "orders"}},
            "jwtRules": [{"issuer": "https://issuer.test", "jwks": "{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU\", \"y\": \"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0\"}]}"}]}),
    );
    let f = audit(&input(vec![ra.clone(), allow_one_principal()]));
    assert_eq!(checks(&f), ["request-authentication-without-principal-policy"]);
    assert_eq!((f[0].severity, f[0].object.as_str()), (Severity::Medium, "RequestAuthentication shop/jwt"));
    assert!(f[0].message.contains("Deployment shop/orders"), "{}", f[0].message);

    let require = res(
        "AuthorizationPolicy",
        "require-jwt",
        serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]}),
    );
    assert_eq!(audit(&input(vec![ra.clone(), allow_one_principal(), require])), vec![]);
    let allow_token = res(
        "AuthorizationPolicy",
        "allow-token",
        serde_json::json!({"action": "ALLOW", "rules": [{"from": [{"source": {"requestPrincipals": ["https://issuer.test/*"]}}]}]}),
    );
    assert_eq!(audit(&input(vec![ra, allow_token])), vec![]);
}

#[test]
fn certificates_past_their_renewal_point_and_expired() {
    let mut i = input(vec![allow_one_principal()]);
    let now = i.now;
    // 1 h lifetime: renewal by 60 %, so under 1440 s left is overdue.
    i.sidecars = Some(vec![sidecar(serde_json::json!({"certificate_not_after": now + 1000}))]);
    let f = audit(&i);
    assert_eq!(checks(&f), ["certificate-near-expiry"]);
    assert_eq!((f[0].severity, f[0].object.as_str()), (Severity::High, "spiffe://cluster.local/ns/shop/sa/orders"));
    i.sidecars = Some(vec![sidecar(serde_json::json!({"certificate_not_after": now - 5}))]);
    assert_eq!(audit(&i)[0].severity, Severity::Critical);
    i.sidecars = Some(vec![sidecar(serde_json::json!({"certificate_not_after": now + 1500}))]);
    assert_eq!(audit(&i), vec![]);
    i.sidecars = Some(vec![sidecar(serde_json::json!({"certificate_not_after": now - 5, "connected": false}))]);
    assert_eq!(audit(&i), vec![], "a disconnected sidecar's last certificate says nothing");
}

#[test]
fn roots_old_expiring_and_expired() {
    let mut i = input(vec![allow_one_principal()]);
    let now = i.now;
    let day = 86400;
    for (not_before, not_after, severity) in [
        (now - 400 * day, now + 5 * 365 * day, Some(Severity::Low)),
        (now - 10 * day, now + 10 * day, Some(Severity::High)),
        (now - 10 * day, now - 1, Some(Severity::Critical)),
        (now - 10 * day, now + 5 * 365 * day, None),
    ] {
        i.roots = vec![RootInfo { generation: 3, not_before, not_after }];
        let f = audit(&i);
        assert_eq!(f.first().map(|f| f.severity), severity, "{f:?}");
        if severity.is_some() {
            assert_eq!((f[0].check, f[0].object.as_str()), ("root-age", "CA generation 3"));
        }
    }
}

#[test]
fn sidecars_on_a_stale_or_nacked_config() {
    let mut i = input(vec![allow_one_principal()]);
    let now = i.now;
    i.sidecars = Some(vec![sidecar(serde_json::json!({"acked_version": "v1", "last_seen": now - 61}))]);
    let f = audit(&i);
    assert_eq!((checks(&f), f[0].severity), (vec!["stale-config"], Severity::Medium));
    i.sidecars = Some(vec![sidecar(serde_json::json!({"acked_version": "v1", "last_seen": now - 5}))]);
    assert_eq!(audit(&i), vec![], "an ACK may be on its way");
    i.sidecars = Some(vec![sidecar(serde_json::json!({"acked_version": "v1", "nack_message": "rego: parse error"}))]);
    let f = audit(&i);
    assert_eq!((checks(&f), f[0].severity), (vec!["nacked-config"], Severity::High));
    assert!(f[0].message.contains("rego: parse error"), "{}", f[0].message);
}

#[test]
fn ca_key_in_clear_when_known() {
    let mut i = input(vec![allow_one_principal()]);
    i.ca_key_sealed = Some(false);
    assert_eq!(checks(&audit(&i)), ["ca-key-not-sealed"]);
    i.ca_key_sealed = None;
    assert_eq!(audit(&i), vec![], "a directory of manifests cannot know");
}

#[test]
fn findings_come_most_severe_first() {
    let mut i = input(vec![res("PeerAuthentication", "default", serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}))]);
    i.settings.egress = "allow".into();
    i.ca_key_sealed = Some(false);
    let f = audit(&i);
    let severities: Vec<Severity> = f.iter().map(|f| f.severity).collect();
    assert_eq!(severities, [Severity::High, Severity::High, Severity::Medium]);
    assert_eq!(checks(&f), ["ca-key-not-sealed", "permissive-mtls", "egress-allow"]);
}

#[test]
fn the_live_input_is_built_from_what_the_control_plane_knows() {
    let mut s = sidecar(serde_json::json!({"labels": {"app": "orders"}}));
    let permissive = res("PeerAuthentication", "default", serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}));
    let mut i = input(vec![permissive]);
    i.workloads = workloads_of(std::slice::from_ref(&s));
    assert_eq!((i.workloads[0].namespace.as_str(), i.workloads[0].labels.len()), ("shop", 1));
    let f = audit(&i);
    assert_eq!(
        (checks(&f), f[0].object.as_str()),
        (vec!["permissive-mtls"], "spiffe://cluster.local/ns/shop/sa/orders")
    );
    s.spiffe_id = "not a spiffe id".into();
    assert_eq!(workloads_of(&[s]), vec![], "an entry without a workload identity is no workload");
    assert_eq!(roots_of(&[(2, 10, 20)]), vec![RootInfo { generation: 2, not_before: 10, not_after: 20 }]);
}

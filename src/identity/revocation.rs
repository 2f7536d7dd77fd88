//! The one spelling of what is revoked: serials as bare lowercase hex, lists sorted and free of
//! repeats. The CLI, the management API, the stores and the shared Kubernetes list all use it,
//! so a serial revoked as `0xAB:CD` anywhere matches `abcd` everywhere.

use std::collections::BTreeSet;

/// `serial` (hex, optionally `0x`-prefixed, optionally with `:` between bytes, any case) as
/// bare lowercase hex, or `None` when it is not a serial (empty, not hex, over 64 digits).
pub fn normalize_serial(serial: &str) -> Option<String> {
    let s = serial.trim();
    let s = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').map(|c| c.to_ascii_lowercase()).collect();
    (!hex.is_empty() && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Revoked identities and serials as pushed to sidecars: sorted, each once, serials normalized
/// (an entry that is not a serial is kept lowercased, so it can match nothing by accident).
pub fn lists(
    ids: impl IntoIterator<Item = String>,
    serials: impl IntoIterator<Item = String>,
) -> (Vec<String>, Vec<String>) {
    let ids: BTreeSet<String> = ids.into_iter().collect();
    let serials: BTreeSet<String> =
        serials.into_iter().map(|s| normalize_serial(&s).unwrap_or_else(|| s.to_lowercase())).collect();
    (ids.into_iter().collect(), serials.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_serial_is_one_serial() {
        for s in ["abcd", "ABCD", "0xAbCd", " ab:cd ", "0XAB:CD"] {
            assert_eq!(normalize_serial(s).as_deref(), Some("abcd"), "{s:?}");
        }
        for s in ["", "0x", "xyz", "ab cd", &"a".repeat(65)] {
            assert_eq!(normalize_serial(s), None, "{s:?}");
        }
        let (ids, serials) = lists(["b".into(), "a".into(), "b".into()], ["ABCD".into(), "abcd".into(), "0x01".into()]);
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(serials, ["01", "abcd"]);
    }
}

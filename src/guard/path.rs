//! Path normalization before any decision: policy decides on one spelling of the path, and the
//! app receives exactly that spelling.
//!
//! Without it a DENY on `/admin/*` is passed by `/public/../admin/x`, `/public/%2e%2e/admin/x`,
//! `//admin/x` or `/%61dmin/x`, which policy compares as written while the app resolves them to
//! `/admin/x`. The levels are Istio's (`meshConfig.pathNormalization`):
//!
//! | level | what |
//! |---|---|
//! | `NONE` | nothing is rewritten (the checks below still refuse) |
//! | `BASE` | RFC 3986: percent-encoded unreserved characters decoded, other encodings upper-cased, dot segments removed |
//! | `MERGE_SLASHES` (default) | `BASE`, and runs of `/` merged into one |
//! | `DECODE_AND_MERGE_SLASHES` | `MERGE_SLASHES`, and `%2F`, `%5C` and `\` decoded to `/` first |
//!
//! At every level a request is refused with 400 when its path holds a NUL or another control
//! character (raw or encoded), an invalid percent-encoding, an encoding that is not UTF-8
//! (overlong forms such as `%C0%AE`), and below `DECODE_AND_MERGE_SLASHES` an encoded slash or
//! backslash or a raw backslash (an app would read them as separators that policy did not see);
//! from `BASE` up also a `;` (Java servers drop `;params` from segments, so `/admin;x/secret`
//! reaches `/admin/secret`). A fragment is dropped. The default is `MERGE_SLASHES`: ordinary apps
//! never depend on doubled slashes or dot segments, and most frameworks merge them anyway.

use std::borrow::Cow;

use super::Refusal;

/// How far paths are rewritten (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Normalization {
    None,
    Base,
    #[default]
    MergeSlashes,
    DecodeAndMergeSlashes,
}

impl std::str::FromStr for Normalization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "NONE" => Ok(Normalization::None),
            "BASE" => Ok(Normalization::Base),
            "MERGE_SLASHES" | "" => Ok(Normalization::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Ok(Normalization::DecodeAndMergeSlashes),
            other => Err(format!(
                "path normalization {other:?} is not one of NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES"
            )),
        }
    }
}

impl Normalization {
    /// The name as written in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Normalization::None => "NONE",
            Normalization::Base => "BASE",
            Normalization::MergeSlashes => "MERGE_SLASHES",
            Normalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }
}

/// The path guard of a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathGuard {
    pub level: Normalization,
}

impl PathGuard {
    /// The path to decide on and forward, or why the request is refused. `Cow::Borrowed` when
    /// the path is already normal (the common case costs one scan and no allocation).
    pub fn normalize<'a>(&self, path: &'a str) -> Result<Cow<'a, str>, Refusal> {
        normalize(path, self.level)
    }
}

fn refuse(rule: &'static str) -> Refusal {
    Refusal::BadRequest { rule }
}

/// Whether a byte is an RFC 3986 unreserved character (decoded when percent-encoded).
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes `path` (no query) at `level`; see the module doc for what is refused.
pub fn normalize(path: &str, level: Normalization) -> Result<Cow<'_, str>, Refusal> {
    let path = match path.find('#') {
        Some(i) => &path[..i],
        None => path,
    };
    if is_normal(path, level) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, level)?;
    if level == Normalization::None {
        return Ok(Cow::Borrowed(path));
    }
    let merged = if level == Normalization::Base { decoded } else { merge_slashes(&decoded) };
    Ok(Cow::Owned(remove_dot_segments(&merged)))
}

/// The fast path: nothing to check or rewrite at this level.
fn is_normal(path: &str, level: Normalization) -> bool {
    let bytes = path.as_bytes();
    if bytes.first().is_none_or(|b| *b != b'/') {
        return false;
    }
    let mut prev = 0u8;
    for &b in bytes {
        let suspicious = !(0x20..0x7f).contains(&b)
            || matches!(b, b'%' | b'\\' | b';')
            || (b == b'/' && prev == b'/' && level != Normalization::Base)
            || (b == b'.' && prev == b'/');
        if suspicious {
            return false;
        }
        prev = b;
    }
    true
}

/// Checks every byte and encoding; decodes what the level decodes. Encoded bytes that stay
/// encoded are upper-cased. The result holds only `/` as a separator.
fn decode(path: &str, level: Normalization) -> Result<String, Refusal> {
    let decode_slashes = level == Normalization::DecodeAndMergeSlashes;
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Every byte the path stands for, encodings decoded: must be UTF-8.
    let mut meant = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) =
                    (bytes.get(i + 1).copied().and_then(hex_value), bytes.get(i + 2).copied().and_then(hex_value))
                else {
                    return Err(refuse("invalid-percent-encoding"));
                };
                let v = hi << 4 | lo;
                if v < 0x20 || v == 0x7f {
                    return Err(refuse(if v == 0 { "nul" } else { "control-character" }));
                }
                match v {
                    b'/' | b'\\' if decode_slashes => out.push('/'),
                    b'/' | b'\\' => return Err(refuse("encoded-slash")),
                    b';' if level != Normalization::None => return Err(refuse("path-parameter")),
                    v if unreserved(v) && level != Normalization::None => out.push(char::from(v)),
                    v => {
                        out.push('%');
                        out.push(char::from(b"0123456789ABCDEF"[usize::from(v >> 4)]));
                        out.push(char::from(b"0123456789ABCDEF"[usize::from(v & 0xf)]));
                    }
                }
                meant.push(v);
                i += 3;
                continue;
            }
            0 => return Err(refuse("nul")),
            b if b < 0x20 || b == 0x7f => return Err(refuse("control-character")),
            b'\\' if decode_slashes => out.push('/'),
            b'\\' => return Err(refuse("backslash")),
            b';' if level != Normalization::None => return Err(refuse("path-parameter")),
            _ => {
                // Raw non-ASCII arrives as part of valid UTF-8 text (`path` is a str).
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                let mut buf = [0u8; 4];
                meant.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                i += ch.len_utf8();
                continue;
            }
        }
        meant.push(b);
        i += 1;
    }
    if std::str::from_utf8(&meant).is_err() {
        return Err(refuse("invalid-utf8"));
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Ok(out)
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        out.push(c);
    }
    out
}

/// RFC 3986 section 5.2.4 on an absolute path: `.` segments go, `..` removes the segment before
/// it (never above the root), and a path ending in `.` or `..` keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path.split('/').skip(1).peekable();
    let mut trailing_slash = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing_slash = last,
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, &'static str> {
        match normalize(p, Normalization::MergeSlashes) {
            Ok(c) => Ok(c.into_owned()),
            Err(Refusal::BadRequest { rule }) => Err(rule),
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_normal_path_is_borrowed_untouched() {
        for p in ["/", "/orders/7", "/a-b_c~d/e.json", "/v1/items/", "/x.y/z"] {
            assert!(matches!(normalize(p, Normalization::MergeSlashes).unwrap(), Cow::Borrowed(b) if b == p), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_doubled_slashes_resolve_as_an_app_would() {
        assert_eq!(norm("/public/../admin/secret.txt").unwrap(), "/admin/secret.txt");
        assert_eq!(norm("/public/%2e%2e/admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/public/%2E%2e/admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/public/.%2e/admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("//admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/%61dmin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/./admin/./x").unwrap(), "/admin/x");
        assert_eq!(norm("/../../admin").unwrap(), "/admin", "never above the root");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/a%20b/%7Euser").unwrap(), "/a%20b/~user");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9", "other encodings kept, upper-cased");
        assert_eq!(norm("/x#frag").unwrap(), "/x", "fragment dropped");
        assert_eq!(normalize("//a", Normalization::Base).unwrap(), "//a", "BASE keeps doubled slashes");
    }

    #[test]
    fn ambiguous_or_malformed_paths_are_refused_with_their_rule() {
        assert_eq!(norm("/admin%2fsecret"), Err("encoded-slash"));
        assert_eq!(norm("/admin%5Csecret"), Err("encoded-slash"));
        assert_eq!(norm("/admin\\secret"), Err("backslash"));
        assert_eq!(norm("/a%00b"), Err("nul"));
        assert_eq!(norm("/a%0ab"), Err("control-character"));
        assert_eq!(norm("/a%zz"), Err("invalid-percent-encoding"));
        assert_eq!(norm("/a%4"), Err("invalid-percent-encoding"));
        assert_eq!(norm("/%c0%ae%c0%ae/admin"), Err("invalid-utf8"), "overlong dot");
        assert_eq!(norm("/admin;x=y/secret"), Err("path-parameter"));
        assert_eq!(norm("/admin%3b/secret"), Err("path-parameter"));
        assert_eq!(normalize("/a%00", Normalization::None).unwrap_err(), Refusal::BadRequest { rule: "nul" });
    }

    #[test]
    fn decode_and_merge_slashes_turns_encoded_separators_into_slashes() {
        let n = |p| normalize(p, Normalization::DecodeAndMergeSlashes).unwrap().into_owned();
        assert_eq!(n("/public%2f..%2fadmin/x"), "/admin/x");
        assert_eq!(n("/public\\..\\admin"), "/admin");
        assert_eq!(n("/a%5C%5Cb"), "/a/b");
    }

    #[test]
    fn none_rewrites_nothing() {
        for p in ["/public/../admin", "//x", "/%61"] {
            assert_eq!(normalize(p, Normalization::None).unwrap(), p);
        }
        assert_eq!("DECODE_AND_MERGE_SLASHES".parse::<Normalization>().unwrap(), Normalization::DecodeAndMergeSlashes);
        assert!("merge".parse::<Normalization>().is_err());
    }
}

//! Session id extraction: where a request names its session, read without allocating.
//!
//! Every function here borrows from the request (a header value, the query string, the
//! peeked form body) and returns a slice of it. An id that breaks the [`IdRules`] counts as
//! absent, so a forged or mangled value can never reach the affinity table as a key.

use memchr::memmem;

/// Which part of the request named the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdSource {
    /// The session query field (`?_s=KEY`).
    Query,
    /// A path parameter (`/app;jsessionid=KEY`).
    PathParam,
    /// One of the session cookies.
    Cookie,
    /// A field of an urlencoded or multipart POST body.
    FormBody,
}

impl IdSource {
    /// A short stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            IdSource::Query => "query",
            IdSource::PathParam => "path-param",
            IdSource::Cookie => "cookie",
            IdSource::FormBody => "form-body",
        }
    }
}

/// What a valid session id looks like: a length range and a byte class.
///
/// Seaside keys are 16 characters of `A-Za-z0-9_-`; the default accepts 1–64 of them so
/// other stateful apps fit, while never admitting an unbounded key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdRules {
    min_len: usize,
    max_len: usize,
    /// One bit per byte value.
    allowed: [u64; 4],
}

/// Characters that delimit ids in cookies, queries and form bodies: never part of an id.
const SEPARATORS: &[u8] = b";&=,\"?#%/\\ ";

impl IdRules {
    /// The longest id any rule set may accept; scanners size their fixed buffers with it.
    pub const MAX_LEN_LIMIT: usize = 256;

    /// Builds rules from a length range and a character class such as `A-Za-z0-9_-`
    /// (ranges `X-Y` and single characters; a `-` at either end is literal).
    pub fn new(min_len: usize, max_len: usize, class: &str) -> Result<Self, String> {
        if min_len == 0 || min_len > max_len || max_len > Self::MAX_LEN_LIMIT {
            return Err(format!(
                "id length range {min_len}..={max_len} must satisfy 1 <= min <= max <= {}",
                Self::MAX_LEN_LIMIT
            ));
        }
        let bytes = class.as_bytes();
        if bytes.is_empty() {
            return Err("the id character class is empty".into());
        }
        let mut allowed = [0u64; 4];
        let mut i = 0;
        while i < bytes.len() {
            let start = bytes[i];
            let (lo, hi) = if i + 2 < bytes.len() && bytes[i + 1] == b'-' {
                i += 3;
                (start, bytes[i - 1])
            } else {
                i += 1;
                (start, start)
            };
            if lo > hi {
                return Err(format!(
                    "the range {}-{} in the id character class is reversed",
                    lo as char, hi as char
                ));
            }
            for b in lo..=hi {
                if !b.is_ascii_graphic() || SEPARATORS.contains(&b) {
                    return Err(format!(
                        "the id character class admits {:?}, which is not allowed in an id",
                        b as char
                    ));
                }
                allowed[usize::from(b >> 6)] |= 1 << (b & 63);
            }
        }
        Ok(IdRules {
            min_len,
            max_len,
            allowed,
        })
    }

    /// Whether `id` is a well-formed session id under these rules.
    #[inline]
    pub fn is_valid(&self, id: &[u8]) -> bool {
        id.len() >= self.min_len && id.len() <= self.max_len && id.iter().all(|&b| self.allows(b))
    }

    /// Whether `b` may appear inside an id.
    #[inline]
    pub fn allows(&self, b: u8) -> bool {
        self.allowed[usize::from(b >> 6)] >> (b & 63) & 1 == 1
    }

    /// The longest id accepted.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    fn valid<'a>(&self, id: &'a str) -> Option<&'a str> {
        self.is_valid(id.as_bytes()).then_some(id)
    }
}

impl Default for IdRules {
    fn default() -> Self {
        IdRules::new(1, 64, "A-Za-z0-9_-").expect("the default id rules are valid")
    }
}

/// The names under which a pool's application carries its session id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionNames {
    /// The query and form field (`_s` in Seaside).
    pub param: Box<str>,
    /// Session cookie names, e.g. `_s`, or the application's name in Seaside 2.8.
    pub cookies: Box<[Box<str>]>,
    /// A path parameter such as `jsessionid`, if the app uses one.
    pub path_param: Option<Box<str>>,
}

impl Default for SessionNames {
    fn default() -> Self {
        SessionNames {
            param: "_s".into(),
            cookies: Box::new(["_s".into()]),
            path_param: Some("jsessionid".into()),
        }
    }
}

/// The value of the first `name=` field of an `a=1&b=2` string (a query or a form body).
pub fn field<'a>(pairs: &'a str, name: &str) -> Option<&'a str> {
    pairs.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then_some(value)
    })
}

/// The session id in a URI query string, if valid.
pub fn from_query<'a>(query: &'a str, name: &str, rules: &IdRules) -> Option<&'a str> {
    field(query, name).and_then(|v| rules.valid(v))
}

/// The session id in a path parameter such as `/app;jsessionid=KEY/more`, if valid.
pub fn from_path_param<'a>(path: &'a str, name: &str, rules: &IdRules) -> Option<&'a str> {
    let mut rest = path;
    while let Some(at) = rest.find(';') {
        rest = &rest[at + 1..];
        let end = rest.find(['/', ';']).unwrap_or(rest.len());
        if let Some((key, value)) = rest[..end].split_once('=')
            && key.eq_ignore_ascii_case(name)
        {
            return rules.valid(value);
        }
    }
    None
}

/// The first valid session id in a `Cookie` header, among the given cookie names.
pub fn from_cookie_header<'a>(
    header: &'a str,
    names: &[Box<str>],
    rules: &IdRules,
) -> Option<&'a str> {
    cookie_pairs(header)
        .filter(|(name, _)| names.iter().any(|n| &**n == *name))
        .find_map(|(_, value)| rules.valid(value))
}

/// The value of the cookie `name` in a `Cookie` header, unvalidated.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    cookie_pairs(header).find_map(|(n, v)| (n == name).then_some(v))
}

/// `name=value` pairs of a `Cookie` header, trimmed and unquoted.
fn cookie_pairs(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split(';').filter_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        let value = unquote(value.trim());
        Some((name.trim(), value))
    })
}

/// The session id in an `application/x-www-form-urlencoded` body. A caller holding only the
/// start of a longer body passes it cut at its last `&`, so no field is read half-way.
pub fn from_urlencoded<'a>(body: &'a [u8], name: &str, rules: &IdRules) -> Option<&'a str> {
    let mut rest = body;
    loop {
        let end = memchr::memchr(b'&', rest).unwrap_or(rest.len());
        let pair = &rest[..end];
        if let Some(eq) = memchr::memchr(b'=', pair)
            && &pair[..eq] == name.as_bytes()
        {
            let value = &pair[eq + 1..];
            return rules
                .is_valid(value)
                .then(|| std::str::from_utf8(value).ok())
                .flatten();
        }
        if end == rest.len() {
            return None;
        }
        rest = &rest[end + 1..];
    }
}

/// The bytes of `text` with its `%XX` escapes decoded (a `%` not followed by two hex digits
/// stays as it is).
pub fn percent_decoded(text: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *text.get(i)?;
        if b == b'%'
            && let Some(&[hi, lo]) = text.get(i + 1..i + 3)
            && hi.is_ascii_hexdigit()
            && lo.is_ascii_hexdigit()
        {
            i += 3;
            return Some(hex(hi) << 4 | hex(lo));
        }
        i += 1;
        Some(b)
    })
}

/// The value of an ASCII hex digit.
fn hex(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

/// `"value"` → `value`; anything else as it is.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn multipart_boundary(content_type: &str) -> Option<&str> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (key, value) = param.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = unquote(value.trim());
        (!value.is_empty() && value.len() <= MAX_BOUNDARY).then_some(value)
    })
}

/// The longest multipart boundary (RFC 2046 §5.1.1).
const MAX_BOUNDARY: usize = 70;

/// The session id in the part named `name` of a `multipart/form-data` body. A boundary no
/// content type may carry (empty, or longer than 70 bytes) finds nothing.
pub fn from_multipart<'a>(
    body: &'a [u8],
    boundary: &str,
    name: &str,
    rules: &IdRules,
) -> Option<&'a str> {
    if boundary.is_empty() || boundary.len() > MAX_BOUNDARY {
        return None;
    }
    // Each part starts after "--boundary\r\n"; its headers end at an empty line and its
    // data at "\r\n--boundary".
    let mut delimiter = [0u8; MAX_BOUNDARY + 4];
    let delimiter_len = boundary.len() + 4;
    delimiter[..4].copy_from_slice(b"\r\n--");
    delimiter[4..delimiter_len].copy_from_slice(boundary.as_bytes());
    let delimiter = &delimiter[..delimiter_len];
    let finder = memmem::Finder::new(delimiter);
    // The first delimiter may lack the leading CRLF.
    let mut at = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        finder.find(body)? + delimiter.len()
    };
    loop {
        let part = &body[at..];
        let headers_end = memmem::find(part, b"\r\n\r\n")?;
        let headers = &part[..headers_end];
        let data = &part[headers_end + 4..];
        let data_end = finder.find(data);
        if part_is_named(headers, name) {
            let value = &data[..data_end?];
            return std::str::from_utf8(value)
                .ok()
                .and_then(|v| rules.valid(v.trim()));
        }
        at += headers_end + 4 + data_end? + delimiter.len();
    }
}

/// Whether a part's headers carry `Content-Disposition: form-data; name="NAME"`.
fn part_is_named(headers: &[u8], name: &str) -> bool {
    let Ok(headers) = std::str::from_utf8(headers) else {
        return false;
    };
    headers.split("\r\n").any(|line| {
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        key.trim().eq_ignore_ascii_case("content-disposition")
            && value.split(';').any(|param| {
                param
                    .trim()
                    .strip_prefix("name=")
                    .map(|v| v.trim_matches('"'))
                    == Some(name)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> IdRules {
        IdRules::default()
    }

    fn names(list: &[&str]) -> Box<[Box<str>]> {
        list.iter().map(|n| Box::from(*n)).collect()
    }

    #[test]
    fn query_field_is_found_among_others() {
        assert_eq!(
            from_query("_k=abc&_s=KEY123&x=1", "_s", &rules()),
            Some("KEY123")
        );
        assert_eq!(from_query("x_s=KEY", "_s", &rules()), None);
        assert_eq!(from_query("_s=", "_s", &rules()), None);
        assert_eq!(from_query("_s=bad%20id", "_s", &rules()), None);
    }

    #[test]
    fn path_parameter_is_found_case_insensitively() {
        assert_eq!(
            from_path_param("/app;jsessionid=ABC/x", "jsessionid", &rules()),
            Some("ABC")
        );
        assert_eq!(
            from_path_param("/app;JSESSIONID=ABC", "jsessionid", &rules()),
            Some("ABC")
        );
        assert_eq!(
            from_path_param("/app;other=1", "jsessionid", &rules()),
            None
        );
        assert_eq!(from_path_param("/app", "jsessionid", &rules()), None);
    }

    #[test]
    fn cookie_header_yields_first_valid_named_cookie() {
        let list = names(&["counter", "_s"]);
        assert_eq!(
            from_cookie_header("a=1; counter=K1; _s=K2", &list, &rules()),
            Some("K1")
        );
        assert_eq!(
            from_cookie_header("a=1; counter=\"bad id\"; _s=K2", &list, &rules()),
            Some("K2")
        );
        assert_eq!(
            from_cookie_header("_s=\"QUOTED\"", &list, &rules()),
            Some("QUOTED")
        );
        assert_eq!(from_cookie_header("other=K", &list, &rules()), None);
    }

    #[test]
    fn urlencoded_body_field_is_found() {
        assert_eq!(
            from_urlencoded(b"name=x&_s=FORMKEY&_k=1", "_s", &rules()),
            Some("FORMKEY")
        );
        assert_eq!(
            from_urlencoded(b"_s=FORMKEY", "_s", &rules()),
            Some("FORMKEY")
        );
        assert_eq!(from_urlencoded(b"a=1&b=2", "_s", &rules()), None);
        assert_eq!(from_urlencoded(b"", "_s", &rules()), None);
    }

    #[test]
    fn multipart_field_is_found_in_any_part() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
Content-Type: text/plain\r\n\r\nhello _s=NOTTHIS\r\n--XyZ\r\nContent-Disposition: form-data; name=\"_s\"\r\n\r\n\
MPKEY\r\n--XyZ--\r\n";
        assert_eq!(from_multipart(body, "XyZ", "_s", &rules()), Some("MPKEY"));
        assert_eq!(from_multipart(body, "XyZ", "_k", &rules()), None);
        assert_eq!(from_multipart(body, "other", "_s", &rules()), None);
    }

    #[test]
    fn a_boundary_no_content_type_may_carry_finds_nothing() {
        // RFC 2046: 1 to 70 characters. Found by fuzzing: a longer one overran the
        // delimiter buffer and panicked.
        let long = "b".repeat(73);
        let body = format!(
            "--{long}\r\nContent-Disposition: form-data; name=\"_s\"\r\n\r\nKEY\r\n--{long}--\r\n"
        );
        assert_eq!(from_multipart(body.as_bytes(), &long, "_s", &rules()), None);
        let body = b"--\r\nContent-Disposition: form-data; name=\"_s\"\r\n\r\nKEY\r\n----\r\n";
        assert_eq!(from_multipart(body, "", "_s", &rules()), None);
        let longest = "b".repeat(70);
        let body = format!(
            "--{longest}\r\nContent-Disposition: form-data; name=\"_s\"\r\n\r\nKEY\r\n--{longest}--\r\n"
        );
        assert_eq!(
            from_multipart(body.as_bytes(), &longest, "_s", &rules()),
            Some("KEY")
        );
    }

    #[test]
    fn multipart_boundary_is_read_from_content_type() {
        assert_eq!(
            multipart_boundary("multipart/form-data; boundary=----abc"),
            Some("----abc")
        );
        assert_eq!(
            multipart_boundary("Multipart/Form-Data; charset=utf-8; boundary=\"q q\""),
            Some("q q")
        );
        assert_eq!(multipart_boundary("text/plain; boundary=x"), None);
    }

    #[test]
    fn percent_escapes_are_decoded_and_broken_ones_kept() {
        let decoded = |t: &str| percent_decoded(t.as_bytes()).collect::<Vec<u8>>();
        assert_eq!(decoded("a%3Fb%3db"), b"a?b=b");
        assert_eq!(decoded("%4b%4B"), b"KK");
        assert_eq!(decoded("100%"), b"100%");
        assert_eq!(decoded("%4"), b"%4");
        assert_eq!(decoded("%zz%"), b"%zz%");
    }

    #[test]
    fn rules_reject_bad_lengths_and_characters() {
        let r = IdRules::new(4, 8, "a-z").unwrap();
        assert!(r.is_valid(b"abcd"));
        assert!(!r.is_valid(b"abc"));
        assert!(!r.is_valid(b"abcdefghi"));
        assert!(!r.is_valid(b"ABCD"));
        assert!(IdRules::new(0, 8, "a-z").is_err());
        assert!(IdRules::new(1, 8, "z-a").is_err());
        assert!(IdRules::new(1, 8, "a-z;").is_err());
        assert!(IdRules::new(1, 1000, "a-z").is_err());
        let dash = IdRules::new(1, 8, "a-").unwrap();
        assert!(dash.is_valid(b"a-a"));
    }

    proptest! {
        #[test]
        fn any_valid_id_round_trips_through_every_carrier(id in "[A-Za-z0-9_-]{1,64}") {
            let r = rules();
            let query = format!("_k=x&_s={id}");
            prop_assert_eq!(from_query(&query, "_s", &r), Some(id.as_str()));
            let cookie = format!("theme=dark; _s={id}");
            prop_assert_eq!(from_cookie_header(&cookie, &names(&["_s"]), &r), Some(id.as_str()));
            let body = format!("a=1&_s={id}&b=2");
            prop_assert_eq!(from_urlencoded(body.as_bytes(), "_s", &r), Some(id.as_str()));
            let path = format!("/app;jsessionid={id}");
            prop_assert_eq!(from_path_param(&path, "jsessionid", &r), Some(id.as_str()));
        }

        #[test]
        fn extraction_never_returns_an_invalid_id(input in ".{0,200}") {
            let r = rules();
            for found in [
                from_query(&input, "_s", &r),
                from_cookie_header(&input, &names(&["_s"]), &r),
                from_urlencoded(input.as_bytes(), "_s", &r),
                from_path_param(&input, "jsessionid", &r),
                from_multipart(input.as_bytes(), "b", "_s", &r),
            ].into_iter().flatten() {
                prop_assert!(r.is_valid(found.as_bytes()));
            }
        }
    }
}

//! Learning pins from what a backend sends back: a session cookie it sets, the id in a
//! redirect's `Location`, and the id in the links of the first page (a streaming scanner).
//!
//! Nothing here looks at the request: a pin is learned only from the backend's own words.

use crate::core::session_id::{IdRules, from_query};

/// Which part of a reply named the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnSource {
    /// A `Set-Cookie` of a session cookie name.
    SetCookie,
    /// The session field in a redirect's `Location`.
    Location,
    /// The session field in the links of an HTML page.
    PageBody,
    /// A request carrying a valid affinity cookie and an id not yet known.
    AffinityCookie,
}

impl LearnSource {
    /// A short stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LearnSource::SetCookie => "set-cookie",
            LearnSource::Location => "location",
            LearnSource::PageBody => "page-body",
            LearnSource::AffinityCookie => "affinity-cookie",
        }
    }
}

/// The session id a `Set-Cookie` header sets, if it names a session cookie and does not
/// delete it (`Max-Age=0`, or an `Expires` at or before `now`, unix seconds).
pub fn id_in_set_cookie<'a>(
    header: &'a str,
    names: &[Box<str>],
    rules: &IdRules,
    now: i64,
) -> Option<&'a str> {
    let cookie = cookie::Cookie::parse(header).ok()?;
    let name = cookie.name_raw()?;
    if !names.iter().any(|n| &**n == name) {
        return None;
    }
    if cookie.max_age().is_some_and(|age| age.whole_seconds() <= 0)
        || cookie
            .expires_datetime()
            .is_some_and(|at| at.unix_timestamp() <= now)
    {
        return None;
    }
    let value = cookie.value_raw()?;
    rules.is_valid(value.as_bytes()).then_some(value)
}

/// The session id in a `Location` header's query (absolute or relative URL).
pub fn id_in_location<'a>(location: &'a str, param: &str, rules: &IdRules) -> Option<&'a str> {
    let location = location.split_once('#').map_or(location, |(l, _)| l);
    let (_, query) = location.split_once('?')?;
    from_query(query, param, rules)
}

/// Finds `PARAM=ID` in the first bytes of an HTML reply as it streams past, chunk by chunk.
///
/// It never holds a chunk: a needle or id split across chunks is carried in a few bytes of
/// state (the id in a fixed buffer), so the reply is forwarded untouched and undelayed.
/// The field must follow `?`, `&` or `;` (as in `href="/app?_s=KEY&amp;_k=…"`), so
/// `x_s=…` is not mistaken for it.
pub struct PageScanner {
    /// Bytes still to examine for the start of a needle.
    budget: usize,
    /// Bytes of the needle matched so far (0 = looking for its first byte).
    matched: usize,
    /// The last byte examined, to check what precedes a needle.
    prev: u8,
    /// Collecting an id after a full needle.
    collecting: bool,
    id: [u8; IdRules::MAX_LEN_LIMIT],
    id_len: usize,
    done: bool,
}

impl PageScanner {
    /// A scanner that looks at most at the first `limit` bytes.
    pub fn new(limit: usize) -> Self {
        PageScanner {
            budget: limit,
            matched: 0,
            prev: b'?',
            collecting: false,
            id: [0; IdRules::MAX_LEN_LIMIT],
            id_len: 0,
            done: limit == 0,
        }
    }

    /// Whether the scanner found an id or gave up; later chunks need not be fed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Examines the next chunk; returns the id once found. `needle` is `PARAM=`.
    pub fn feed(&mut self, chunk: &[u8], needle: &[u8], rules: &IdRules) -> Option<&str> {
        let mut i = 0;
        while i < chunk.len() && !self.done {
            if self.collecting {
                let b = chunk[i];
                if rules.allows(b) && self.id_len < rules.max_len() {
                    self.id[self.id_len] = b;
                    self.id_len += 1;
                    self.prev = b;
                    i += 1;
                    continue;
                }
                if rules.allows(b) {
                    // Longer than any valid id: not a session field after all.
                    self.collecting = false;
                    continue;
                }
                self.collecting = false;
                if rules.is_valid(&self.id[..self.id_len]) {
                    self.done = true;
                    return self.found();
                }
                continue;
            }
            if self.matched > 0 {
                if chunk[i] == needle[self.matched] {
                    self.prev = chunk[i];
                    self.matched += 1;
                    i += 1;
                    if self.matched == needle.len() {
                        self.matched = 0;
                        self.collecting = true;
                        self.id_len = 0;
                    }
                } else {
                    // Re-examine this byte as a possible needle start.
                    self.matched = 0;
                }
                continue;
            }
            if self.budget == 0 {
                self.done = true;
                break;
            }
            let window_end = chunk.len().min(i + self.budget);
            match memchr::memchr(needle[0], &chunk[i..window_end]) {
                None => {
                    self.budget -= window_end - i;
                    self.prev = chunk[window_end - 1];
                    i = window_end;
                }
                Some(offset) => {
                    let at = i + offset;
                    let before = if at > 0 { chunk[at - 1] } else { self.prev };
                    self.budget -= offset + 1;
                    self.prev = chunk[at];
                    i = at + 1;
                    if matches!(before, b'?' | b'&' | b';') {
                        self.matched = 1;
                        if needle.len() == 1 {
                            self.matched = 0;
                            self.collecting = true;
                            self.id_len = 0;
                        }
                    }
                }
            }
        }
        None
    }

    /// The end of the reply: an id running up to the last byte counts.
    pub fn finish(&mut self, rules: &IdRules) -> Option<&str> {
        if self.done || !self.collecting || !rules.is_valid(&self.id[..self.id_len]) {
            return None;
        }
        self.done = true;
        self.found()
    }

    fn found(&self) -> Option<&str> {
        std::str::from_utf8(&self.id[..self.id_len]).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> IdRules {
        IdRules::default()
    }

    fn scan_chunks(chunks: &[&[u8]], limit: usize) -> Option<String> {
        let mut s = PageScanner::new(limit);
        for c in chunks {
            if let Some(id) = s.feed(c, b"_s=", &rules()) {
                return Some(id.to_string());
            }
        }
        s.finish(&rules()).map(str::to_string)
    }

    const PAGE: &[u8] = b"<html><body><a href=\"/x_s=NOPE\">n</a>\
<a href=\"/app?_s=Kd83jHs7aQ0pLm2x&amp;_k=aB3dE5fG\">go</a></body></html>";

    #[test]
    fn finds_the_first_link_id() {
        assert_eq!(
            scan_chunks(&[PAGE], 32768).as_deref(),
            Some("Kd83jHs7aQ0pLm2x")
        );
    }

    #[test]
    fn finds_an_id_split_anywhere_across_chunks() {
        for cut in 1..PAGE.len() {
            let (a, b) = PAGE.split_at(cut);
            assert_eq!(
                scan_chunks(&[a, b], 32768).as_deref(),
                Some("Kd83jHs7aQ0pLm2x"),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = PAGE.chunks(1).collect();
        assert_eq!(
            scan_chunks(&bytes, 32768).as_deref(),
            Some("Kd83jHs7aQ0pLm2x")
        );
    }

    #[test]
    fn entity_encoded_ampersand_and_end_of_body_count() {
        assert_eq!(
            scan_chunks(&[b"<a href='/a?x=1&amp;_s=ENT1'>"], 100).as_deref(),
            Some("ENT1")
        );
        assert_eq!(
            scan_chunks(&[b"/a?_s=", b"ATEND"], 100).as_deref(),
            Some("ATEND")
        );
    }

    #[test]
    fn gives_up_past_its_limit() {
        let mut page = vec![b' '; 40_000];
        page.extend_from_slice(b"?_s=LATE");
        assert_eq!(scan_chunks(&[&page], 32_768), None);
        assert_eq!(scan_chunks(&[&page], 65_536).as_deref(), Some("LATE"));
    }

    #[test]
    fn overlong_ids_are_skipped_for_a_later_valid_one() {
        let long = "A".repeat(80);
        let page = format!("?_s={long}\"> ?_s=SHORT1");
        assert_eq!(
            scan_chunks(&[page.as_bytes()], 1000).as_deref(),
            Some("SHORT1")
        );
    }

    #[test]
    fn set_cookie_of_a_session_name_is_learned_unless_it_deletes() {
        let names: Box<[Box<str>]> = Box::new(["_s".into(), "counter".into()]);
        let r = rules();
        assert_eq!(
            id_in_set_cookie("_s=KEY1; Path=/app; HttpOnly", &names, &r, 0),
            Some("KEY1")
        );
        assert_eq!(
            id_in_set_cookie("counter=KEY2", &names, &r, 0),
            Some("KEY2")
        );
        assert_eq!(id_in_set_cookie("theme=dark", &names, &r, 0), None);
        assert_eq!(id_in_set_cookie("_s=KEY1; Max-Age=0", &names, &r, 0), None);
        assert_eq!(
            id_in_set_cookie(
                "_s=KEY1; Expires=Thu, 01 Jan 1970 00:00:01 GMT",
                &names,
                &r,
                100
            ),
            None
        );
        assert_eq!(id_in_set_cookie("_s=bad id", &names, &r, 0), None);
    }

    #[test]
    fn location_query_is_learned() {
        let r = rules();
        assert_eq!(
            id_in_location("http://h/app?_s=LOC1&_k=x#frag", "_s", &r),
            Some("LOC1")
        );
        assert_eq!(id_in_location("/app?_k=1&_s=LOC2", "_s", &r), Some("LOC2"));
        assert_eq!(id_in_location("/app#?_s=NO", "_s", &r), None);
        assert_eq!(id_in_location("/app", "_s", &r), None);
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_answer(
            prefix in "[a-z <>=\"/?&;_]{0,300}",
            id in "[A-Za-z0-9_-]{1,64}",
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let page = format!("{prefix}<a href=\"/app?_s={id}&amp;_k=z\">");
            let whole = scan_chunks(&[page.as_bytes()], 32768);
            let mut cuts = cuts;
            cuts.retain(|&c| c < page.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in cuts {
                pieces.push(&page.as_bytes()[last..c]);
                last = c;
            }
            pieces.push(&page.as_bytes()[last..]);
            prop_assert_eq!(scan_chunks(&pieces, 32768), whole.clone());
            prop_assert!(whole.is_some());
        }
    }
}

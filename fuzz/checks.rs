//! The invariants the fuzz targets check, one function per target. The fuzz crate builds this
//! file as its library (each `fuzz_targets/*.rs` calls one function), and `tests/fuzz_corpus.rs`
//! includes it as a module to replay the committed corpus as ordinary tests: the checks are
//! written once. Each function takes the raw input and panics when an invariant breaks.
//!
//! Inputs are plain bytes laid out like what tidegate reads, so the seeds are readable:
//! a request or a reply is a head (first line, then `Name: value` lines), an empty line, and
//! a body; a state file is its bytes; a configuration is its text.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidegate::config::Config;
use tidegate::core::affinity::{Pin, PinKey};
use tidegate::core::affinity_cookie::AffinityCookie;
use tidegate::core::backend::{Backend, BackendId, BackendSet, FIXED_SEED};
use tidegate::core::learn::{PageScanner, id_in_location, id_in_set_cookie};
use tidegate::core::registry::Registry;
use tidegate::core::session_id::{self, IdRules};
use tidegate::core::snapshot::{self, Encoder, PoolPins, Snapshot};
use tidegate::error::ConfigError;
use tidegate::farm;
use tidegate::store::state_file::StateFile;

/// Unix seconds the learning and state-file checks run at.
const NOW: u32 = 1_000;

/// The id rules the extractors run under: the default, Seaside's exact 16-character keys,
/// and the widest class and length a configuration may give.
fn rule_sets() -> [IdRules; 3] {
    [
        IdRules::default(),
        IdRules::new(16, 16, "A-Za-z0-9_-").expect("Seaside's key rules are valid"),
        IdRules::new(1, IdRules::MAX_LEN_LIMIT, "A-Za-z0-9._~!*-")
            .expect("the wide rules are valid"),
    ]
}

/// Session cookie names: Seaside 3's, Seaside 2.8's (the application's name), a servlet's.
fn cookie_names() -> Box<[Box<str>]> {
    Box::new(["_s".into(), "counter".into(), "JSESSIONID".into()])
}

/// The head and the body: split at the first empty line (`\r\n\r\n` or `\n\n`); without
/// one, all of it is head.
fn split_head(data: &[u8]) -> (&[u8], &[u8]) {
    let crlf = data.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = data.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(c), Some(l)) if c < l => (&data[..c], &data[c + 4..]),
        (_, Some(l)) => (&data[..l], &data[l + 2..]),
        (Some(c), None) => (&data[..c], &data[c + 4..]),
        (None, None) => (data, &[]),
    }
}

/// The lines of a head, without their line ends.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

/// The value of every UTF-8 line after the first: what follows `Name:`, trimmed (or the
/// whole line, when it has no colon).
fn header_values(head: &[u8]) -> impl Iterator<Item = &str> {
    lines(head)
        .skip(1)
        .filter_map(|l| std::str::from_utf8(l).ok())
        .map(|l| l.split_once(':').map_or(l, |(_, v)| v).trim())
}

/// Panics unless `part` is a slice of `whole` (borrowed from the input, not made up).
fn assert_within(part: &[u8], whole: &[u8], what: &str) {
    let start = whole.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    assert!(
        at >= start && at + part.len() <= start + whole.len(),
        "{what}: {part:?} is not a slice of the input"
    );
}

/// Panics unless an id found is a slice of the input and valid under `rules`.
fn assert_id(found: Option<&str>, input: &[u8], rules: &IdRules, what: &str) {
    if let Some(id) = found {
        assert_within(id.as_bytes(), input, what);
        assert!(
            rules.is_valid(id.as_bytes()),
            "{what}: {id:?} breaks the id rules {rules:?}"
        );
    }
}

/// Session-id extraction from a request: the target's query and `;jsessionid=` path
/// parameter, every header value as a `Cookie` header and as a multipart content type, and
/// the body as an urlencoded and as a multipart form. Whatever is found is a slice of the
/// request and a valid id; the urlencoded reader agrees with the query reader and with
/// itself on a body cut at its last `&` (as the proxy reads a body it holds only the start
/// of); any string passed as a multipart boundary is answered, never a panic.
pub fn session_id(data: &[u8]) {
    let (head, body) = split_head(data);
    // "GET /app?_s=KEY HTTP/1.1", or a bare target.
    let target = lines(head)
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .map(|l| l.split(' ').nth(1).unwrap_or(l));
    let names = cookie_names();
    for rules in &rule_sets() {
        if let Some(target) = target {
            let target = target.split('#').next().unwrap_or(target);
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let id = session_id::from_query(query, "_s", rules);
            assert_id(id, data, rules, "from_query");
            let id = session_id::from_path_param(path, "jsessionid", rules);
            assert_id(id, data, rules, "from_path_param");
        }
        for value in header_values(head) {
            let id = session_id::from_cookie_header(value, &names, rules);
            assert_id(id, data, rules, "from_cookie_header");
            if let Some(v) = session_id::cookie_value(value, "_s") {
                assert_within(v.as_bytes(), data, "cookie_value");
            }
            if let Some(boundary) = session_id::multipart_boundary(value) {
                assert_within(boundary.as_bytes(), data, "multipart_boundary");
                assert!(
                    (1..=70).contains(&boundary.len()),
                    "a boundary of {} bytes",
                    boundary.len()
                );
                let id = session_id::from_multipart(body, boundary, "_s", rules);
                assert_id(id, data, rules, "from_multipart");
            }
            let id = session_id::from_multipart(body, value, "_s", rules);
            assert_id(id, data, rules, "from_multipart, any boundary");
        }
        let whole = session_id::from_urlencoded(body, "_s", rules);
        assert_id(whole, data, rules, "from_urlencoded");
        let cut = &body[..body.iter().rposition(|&b| b == b'&').unwrap_or(0)];
        let early = session_id::from_urlencoded(cut, "_s", rules);
        if early.is_some() {
            assert_eq!(early, whole, "the start of a form body named another id");
        }
        if let Ok(text) = std::str::from_utf8(body) {
            assert_eq!(
                session_id::from_query(text, "_s", rules),
                whole,
                "the query and form readers disagree"
            );
        }
    }
}

/// Scans `chunks` as the page learner does: stops at the first id, `finish` at the end.
fn scan<'c>(
    chunks: impl IntoIterator<Item = &'c [u8]>,
    limit: usize,
    needle: &[u8],
    rules: &IdRules,
) -> Option<Vec<u8>> {
    let mut scanner = PageScanner::new(limit);
    for chunk in chunks {
        if scanner.is_done() {
            break;
        }
        if let Some(id) = scanner.feed(chunk, needle, rules) {
            return Some(id.as_bytes().to_vec());
        }
    }
    scanner.finish(rules).map(|id| id.as_bytes().to_vec())
}

/// A small deterministic generator of cut points (xorshift), seeded from the input.
struct Cuts(u64);

impl Cuts {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below.max(1) as u64) as usize
    }
}

/// `body` cut into pieces of 1 to `largest` bytes, with an empty piece now and then.
fn pieces<'b>(body: &'b [u8], largest: usize, cuts: &mut Cuts) -> Vec<&'b [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        if cuts.next(8) == 0 {
            out.push(&body[at..at]);
        }
        let end = (at + 1 + cuts.next(largest)).min(body.len());
        out.push(&body[at..end]);
        at = end;
    }
    out
}

/// The page scanner over `body` for `PARAM=`: fed whole, it finds only an id the page names
/// as a field; fed in any pieces — every single cut of
/// a short page, byte by byte, pseudo-random pieces — it gives the same answer as fed whole,
/// whatever its limit.
fn page(body: &[u8], param: &str, rules: &IdRules, cuts: &mut Cuts) {
    let needle = format!("{param}=");
    let needle = needle.as_bytes();
    let unbounded = body.len() + 1;
    for limit in [unbounded, body.len() / 2, 7] {
        let whole = scan([body], limit, needle, rules);
        if let Some(id) = &whole {
            assert!(rules.is_valid(id), "the page scanner found {id:?}");
        }
        if limit == unbounded {
            // Found only where the page names it: `PARAM=ID` is in the page (which fields
            // count — link-bearing attributes and scripts only — the unit tests of
            // core::learn say).
            if let Some(id) = &whole {
                let field = [needle, id.as_slice()].concat();
                assert!(
                    body.windows(field.len()).any(|w| w == field),
                    "the page scanner made up {id:?}"
                );
            }
            if body.len() <= 128 {
                for cut in 1..body.len() {
                    let (a, b) = body.split_at(cut);
                    assert_eq!(
                        scan([a, b], limit, needle, rules),
                        whole,
                        "a page cut at {cut}"
                    );
                }
            }
        }
        assert_eq!(
            scan(body.chunks(1), limit, needle, rules),
            whole,
            "a page fed byte by byte, limit {limit}"
        );
        for largest in [3, 16, 200, 5000] {
            let split = pieces(body, largest, cuts);
            assert_eq!(
                scan(split.iter().copied(), limit, needle, rules),
                whole,
                "a page fed in pieces {:?}, limit {limit}",
                split.iter().map(|p| p.len()).collect::<Vec<_>>()
            );
        }
    }
}

/// Learning from a reply: every header value as a `Set-Cookie` and as a `Location` yields
/// only valid ids that are slices of it, the `Location` reader agreeing with the query
/// reader; the body goes through the page scanner ([`page`]).
pub fn reply_learning(data: &[u8]) {
    let (head, body) = split_head(data);
    let names = cookie_names();
    let rules = rule_sets();
    for value in header_values(head) {
        for rules in &rules {
            let id = id_in_set_cookie(value, &names, rules, i64::from(NOW));
            assert_id(id, data, rules, "id_in_set_cookie");
            let id = id_in_location(value, "_s", rules);
            assert_id(id, data, rules, "id_in_location");
            let query = value
                .split('#')
                .next()
                .and_then(|l| l.split_once('?'))
                .map(|(_, q)| q);
            if let Some(query) = query {
                assert_eq!(id, session_id::from_query(query, "_s", rules));
            } else {
                assert_eq!(id, None, "an id in a Location without a query");
            }
        }
    }
    let seed = data
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
        .max(1);
    let mut cuts = Cuts(seed);
    for rules in &rules[..2] {
        for param in ["_s", "jsessionid", "aa"] {
            page(body, param, rules, &mut cuts);
        }
    }
}

/// The affinity cookie: a `Cookie` header (the input after its first line) is recognised
/// only when it carries a value the pool signed, naming the backend it was signed for; every
/// value signed (under the secret on the first line) comes back to its backend through the
/// `Cookie` reader and its own `Set-Cookie`; and no value differing in one character, or
/// signed under another secret, is accepted.
pub fn affinity_cookie(data: &[u8]) {
    let (secret, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let cookie = AffinityCookie::new("tg", secret, "/shop");
    let backends: Vec<_> = ["img1", "img2", "img3"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let address = format!("127.0.0.1:{}", 9001 + i)
                .parse()
                .expect("an address");
            std::sync::Arc::new(Backend::new(n, address, 1))
        })
        .collect();
    let set = BackendSet::new(backends, |id| Some(cookie.for_backend(id)));
    let accepts_only_signed = |value: &str| {
        if let Some(b) = set.by_affinity_cookie(value) {
            assert_eq!(
                value,
                cookie.value_for(b.id),
                "a value accepted for {} that was not signed for it",
                b.name
            );
        }
    };
    if let Ok(header) = std::str::from_utf8(rest) {
        accepts_only_signed(header);
        if let Some(value) = session_id::cookie_value(header, "tg") {
            assert_within(value.as_bytes(), rest, "cookie_value");
            accepts_only_signed(value);
        }
    }
    let value_rules = IdRules::new(1, 64, "0-9a-f.").expect("the value alphabet is valid");
    let tg: [Box<str>; 1] = ["tg".into()];
    let other = {
        let mut s = secret.to_vec();
        s.push(b'!');
        AffinityCookie::new("tg", &s, "/shop")
    };
    for b in set.all() {
        let value = cookie.value_for(b.id);
        let found = set.by_affinity_cookie(&value).map(|f| f.id);
        assert_eq!(found, Some(b.id), "a signed value is not recognised");
        let header = format!("theme=dark; tg={value}; _s=abc");
        let read = session_id::cookie_value(&header, "tg");
        assert_eq!(read, Some(value.as_str()));
        let sent = set.cookie_of(b.id).expect("every backend has a cookie");
        let set_cookie = sent.set_cookie.to_str().expect("a visible ASCII header");
        let learned = id_in_set_cookie(set_cookie, &tg, &value_rules, 0);
        assert_eq!(learned, Some(value.as_str()), "Set-Cookie: {set_cookie}");
        assert!(set_cookie.contains("Path=/shop;"));
        let forged = other.value_for(b.id);
        assert!(
            set.by_affinity_cookie(&forged).is_none(),
            "another secret's value"
        );
        // One character changed, into one the input picks.
        let with = rest.first().copied().unwrap_or(b'0');
        for at in 0..value.len() {
            let mut bytes = value.clone().into_bytes();
            if bytes[at] == with {
                continue;
            }
            bytes[at] = with;
            if let Ok(changed) = std::str::from_utf8(&bytes) {
                assert!(set.by_affinity_cookie(changed).is_none(), "{changed:?}");
            }
        }
    }
    let stranger = BackendId::from_name(&String::from_utf8_lossy(rest));
    if set.get(stranger).is_none() {
        assert!(
            set.by_affinity_cookie(&cookie.value_for(stranger))
                .is_none()
        );
    }
}

/// The farm the state file is read into: a session pool with a small table (so pins
/// beyond it are refused), another session pool, and a client-ip pool (no table).
fn state_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        Config::from_toml(
            "[[pool]]\nname = \"app\"\n[pool.session]\nmax_pins = 4\n\
             [[pool.backend]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
             [[pool.backend]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"\n\
             [[pool]]\nname = \"shop\"\npath_prefix = \"/shop\"\n\
             [[pool.backend]]\nname = \"c\"\naddress = \"127.0.0.1:9003\"\n\
             [[pool]]\nname = \"ip\"\npath_prefix = \"/ip\"\naffinity = \"client-ip\"\n\
             [[pool.backend]]\nname = \"d\"\naddress = \"127.0.0.1:9004\"\n",
            "state.toml",
        )
        .expect("the state-file farm is valid")
    })
}

/// `snapshot`'s bytes, written as the state file writes them.
fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let mut e = Encoder::new(snapshot.written_at, 0);
    for p in &snapshot.pools {
        e.pool(&p.pool, |visit| {
            for &(key, pin) in &p.pins {
                visit(key, pin);
            }
        });
    }
    e.finish()
}

/// Reads `bytes` as a state file: decoding answers (never a panic), what decodes encodes
/// back to the same bytes (the format has one spelling), and the reader puts back into a
/// fresh farm at most what the file holds, within each table's bound, every pin naming a
/// backend of its pool.
fn read_state(bytes: &[u8]) {
    let total = match snapshot::decode(bytes) {
        Ok(s) => {
            assert_eq!(encode(&s), bytes, "a state file decodes to another one");
            s.pools.iter().map(|p| p.pins.len() as u64).sum()
        }
        Err(_) => 0,
    };
    let registry = Registry::new(farm::topology(state_config()));
    let file = StateFile::new(PathBuf::from("fuzz.state"), Duration::from_secs(10));
    file.restore_from(bytes, &registry, NOW);
    let restored = file.stats.restored.load(Ordering::Relaxed);
    let dropped: u64 = file
        .stats
        .dropped
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .sum();
    assert!(
        restored + dropped <= total,
        "{restored} restored and {dropped} dropped of {total} pins"
    );
    let mut held = 0;
    for pool in registry.topology().pools.iter() {
        let Some(table) = pool.table() else { continue };
        assert!(table.len() <= table.limits().max_pins, "pool {}", pool.name);
        held += table.len() as u64;
        let set = pool.backends();
        table.for_each_pin(|_, pin| assert!(set.get(pin.backend).is_some(), "a pin of a stranger"));
    }
    assert_eq!(held, restored, "pins held and pins counted differ");
}

/// The state file: the input as it is, the input sealed with a valid checksum (so the
/// fuzzer gets past it to the counts and pins), each read by [`read_state`]; and a snapshot
/// made of the input (pool names and pins cut from it) comes back whole through encode and
/// decode.
pub fn state_file(data: &[u8]) {
    read_state(data);
    let mut sealed = data.to_vec();
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(data, FIXED_SEED);
    sealed.extend_from_slice(&sum.to_le_bytes());
    read_state(&sealed);

    let word = |b: &[u8]| b.iter().fold(0u64, |w, &x| w << 8 | u64::from(x));
    let made = Snapshot {
        written_at: word(data.get(..4).unwrap_or_default()) as u32,
        pools: data
            .split(|&b| b == b'\n')
            .take(8)
            .map(|line| {
                let (name, pins) = line.split_at(line.len().min(12));
                PoolPins {
                    pool: String::from_utf8_lossy(name).into_owned(),
                    pins: pins
                        .chunks(snapshot::PIN_BYTES)
                        .map(|c| {
                            let at = |i: usize| c.get(i..).unwrap_or_default();
                            (
                                PinKey::from_parts([word(at(0)), word(at(8))]),
                                Pin {
                                    backend: BackendId(word(at(16)) as u32),
                                    created: word(at(20)) as u32,
                                    last_used: word(at(24)) as u32,
                                },
                            )
                        })
                        .collect(),
                }
            })
            .collect(),
    };
    let bytes = encode(&made);
    assert_eq!(snapshot::decode(&bytes), Ok(made), "encode → decode");
}

/// The configuration loader: any text is answered (never a panic); a refusal names the line
/// (within the text) or the key it concerns; a configuration accepted builds its farm.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, "fuzz.toml") {
        Ok(config) => {
            let topology = farm::topology(&config);
            assert_eq!(topology.pools.len(), config.pools.len());
        }
        Err(e) => {
            let message = e.to_string();
            let ConfigError::Invalid { line, key, .. } = e else {
                panic!("text needs no reading: {message}");
            };
            assert!(
                line.is_some() || !key.is_empty(),
                "an error naming neither a line nor a key: {message}"
            );
            if let Some(line) = line {
                let lines = text.matches('\n').count() + 1;
                assert!(
                    (1..=lines).contains(&line),
                    "line {line} of {lines}: {message}"
                );
            }
        }
    }
}

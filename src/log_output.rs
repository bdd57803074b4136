//! Where log lines go: a buffer that a thread of its own writes out in batches, at least
//! every [`FLUSH_EVERY`] and whenever [`BATCH`] bytes have gathered, the way nginx's
//! `access_log … buffer= flush=` works.
//!
//! Writing each line as it is logged costs the request path a `write(2)` per request when
//! the access log is on (one more system call on top of a keep-alive request's four); here it
//! costs a short, uncontended lock and a copy. Should the output fall far behind
//! ([`MAX_PENDING`] bytes waiting), lines are dropped rather than requests stalled, and the
//! number dropped is reported in the output itself.
//!
//! The access log goes further: a request hands its fields over unformatted ([`AccessEntry`]:
//! numbers, and its strings copied into a shared buffer), and the writer thread formats the
//! lines, exactly as the log subscriber would have (text or JSON), when it writes them out.
//! The request path does no formatting at all: no timestamp, no escaping, no number to text.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// The longest a line waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Pending bytes that wake the writer at once.
pub const BATCH: usize = 64 * 1024;
/// Pending bytes beyond which lines are dropped.
pub const MAX_PENDING: usize = 16 * 1024 * 1024;

/// The state shared by the loggers and the writer thread.
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
    /// The output itself, written line by line, when no writer thread could be started.
    direct: OnceLock<Mutex<Box<dyn Write + Send>>>,
    /// How access-log entries are formatted (set once, by [`LogOutput::access_log`]).
    access_format: OnceLock<LogFormat>,
}

#[derive(Default)]
struct Pending {
    /// Lines formatted by the log subscriber.
    bytes: Vec<u8>,
    /// Access-log entries waiting to be formatted, in order.
    access: Vec<Waiting>,
    /// The strings of the waiting entries, one after another.
    text: Vec<u8>,
    closing: bool,
}

impl Pending {
    /// Bytes waiting, counting an access entry as its strings plus the rest of its line.
    fn size(&self) -> usize {
        self.bytes.len() + self.text.len() + self.access.len() * ACCESS_LINE_REST
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.access.is_empty()
    }
}

/// About what an access-log line holds beyond its strings (timestamp, names, numbers).
const ACCESS_LINE_REST: usize = 150;

/// One access-log line's fields, handed to the writer thread unformatted.
#[derive(Debug, Clone, Copy)]
pub struct AccessEntry<'a> {
    /// When the request ended.
    pub at: SystemTime,
    /// The request's method.
    pub method: &'a str,
    /// Its `Host` (or the authority of its target), `-` when it has none.
    pub host: &'a str,
    /// The path as requested; the line shows it without path parameters (`;jsessionid=…`).
    pub path: &'a str,
    /// The reply's status (499: the client left first).
    pub status: u16,
    /// How long the request took, in microseconds.
    pub micros: u64,
    /// The pool that served it, or `-`.
    pub pool: &'a str,
    /// The backend that served it, or `-`.
    pub backend: &'a str,
    /// How the backend was chosen (`pinned`, `new`, …), or `-`.
    pub decision: &'static str,
    /// Where a pin was learned from by this reply, or `-`.
    pub learned: &'static str,
    /// The session's keyed hash, if the request named one.
    pub session: Option<u32>,
}

/// An access entry as it waits: its strings are consecutive ranges of [`Pending::text`].
struct Waiting {
    at: SystemTime,
    status: u16,
    micros: u64,
    decision: &'static str,
    learned: &'static str,
    session: Option<u32>,
    /// The lengths of method, host, path, pool and backend, in that order.
    lengths: [u32; 5],
}

/// The `MakeWriter` handed to the log subscriber.
#[derive(Clone)]
pub struct LogOutput {
    shared: Arc<Shared>,
}

/// Ends the writer thread, after it has written every pending line, when dropped.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`. Should the thread not start, lines go to `out`
/// one by one, as they would without this module.
pub fn buffered<W: Write + Send + 'static>(out: W) -> (LogOutput, Flusher) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        direct: OnceLock::new(),
        access_format: OnceLock::new(),
    });
    let writer = shared.clone();
    // The output is handed over once the thread runs, so a failed start keeps it here.
    let (hand_over, take_over) = std::sync::mpsc::channel::<W>();
    let thread = std::thread::Builder::new()
        .name("tidegate-log".into())
        .spawn(move || {
            if let Ok(out) = take_over.recv() {
                write_out(&writer, out);
            }
        });
    let thread = match thread {
        Ok(thread) => {
            let _ = hand_over.send(out);
            Some(thread)
        }
        Err(_) => {
            let _ = shared.direct.set(Mutex::new(Box::new(out)));
            None
        }
    };
    let output = LogOutput {
        shared: shared.clone(),
    };
    (output, Flusher { shared, thread })
}

/// The writer thread: sleeps until a line comes, gives the lines after it up to
/// [`FLUSH_EVERY`] (or a full batch) to join it, and writes them in one go. An idle process
/// wakes it never.
fn write_out<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut access = Vec::new();
    let mut text = Vec::new();
    loop {
        let closing = {
            let pending = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let pending = shared
                .wake
                .wait_while(pending, |p| p.is_empty() && !p.closing)
                .unwrap_or_else(PoisonError::into_inner);
            let (mut pending, _) = shared
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| p.size() < BATCH && !p.closing)
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut pending.bytes, &mut batch);
            std::mem::swap(&mut pending.access, &mut access);
            std::mem::swap(&mut pending.text, &mut text);
            pending.closing
        };
        if !access.is_empty() {
            let format = shared.access_format.get().copied().unwrap_or_default();
            let mut strings = &text[..];
            for entry in access.drain(..) {
                strings = format_waiting(&mut batch, &entry, strings, format);
            }
            text.clear();
            if text.capacity() > 4 * BATCH {
                text = Vec::new();
                access = Vec::new();
            }
        }
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                batch,
                "tidegate: {dropped} log lines dropped: the log output fell behind"
            );
        }
        if !batch.is_empty() {
            // Nowhere to report a failing log output; the lines are lost.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > 4 * BATCH {
                // A burst is over: give back what it took.
                batch = Vec::with_capacity(BATCH);
            }
        }
        if closing {
            return;
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One log line on its way into the buffer.
pub struct Line<'a> {
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if let Some(direct) = self.shared.direct.get() {
            let mut out = direct.lock().unwrap_or_else(PoisonError::into_inner);
            out.write_all(line)?;
            return Ok(line.len());
        }
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pending.size() + line.len() > MAX_PENDING {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            let first = pending.is_empty();
            pending.bytes.extend_from_slice(line);
            // The first line starts the writer's wait; a full batch ends it.
            if first || pending.size() >= BATCH {
                self.shared.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogOutput {
    /// The access log over this output, its lines formatted as `format`.
    pub fn access_log(&self, format: LogFormat) -> AccessLog {
        let _ = self.shared.access_format.set(format);
        AccessLog {
            shared: self.shared.clone(),
        }
    }
}

/// Where a request's access-log entry goes: handed to the writer thread, unformatted.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

/// The process's access log, once [`install_access_log`] has set it.
static ACCESS_LOG: OnceLock<AccessLog> = OnceLock::new();

/// Makes `log` the process's access log (the first call wins).
pub fn install_access_log(log: AccessLog) {
    let _ = ACCESS_LOG.set(log);
}

/// The process's access log, if one is installed.
pub fn access_log() -> Option<&'static AccessLog> {
    ACCESS_LOG.get()
}

impl AccessLog {
    /// Hands `entry` over: a short lock and a copy of its strings, no formatting.
    pub fn log(&self, entry: &AccessEntry<'_>) {
        let shared = &*self.shared;
        if let Some(direct) = shared.direct.get() {
            let mut line = Vec::with_capacity(256);
            format_access(
                &mut line,
                entry,
                shared.access_format.get().copied().unwrap_or_default(),
            );
            let _ = direct
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_all(&line);
            return;
        }
        let strings = [
            entry.method,
            entry.host,
            entry.path,
            entry.pool,
            entry.backend,
        ];
        let length = strings.iter().map(|s| s.len()).sum::<usize>();
        let mut pending = shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pending.size() + length + ACCESS_LINE_REST > MAX_PENDING {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = pending.is_empty();
        let mut lengths = [0u32; 5];
        for (l, s) in lengths.iter_mut().zip(strings) {
            // A string beyond 4 GiB cannot come through a request; cut it to fit.
            let s = &s.as_bytes()[..s.len().min(u32::MAX as usize)];
            *l = s.len() as u32;
            pending.text.extend_from_slice(s);
        }
        pending.access.push(Waiting {
            at: entry.at,
            status: entry.status,
            micros: entry.micros,
            decision: entry.decision,
            learned: entry.learned,
            session: entry.session,
            lengths,
        });
        if first || pending.size() >= BATCH {
            shared.wake.notify_one();
        }
    }
}

/// Formats the waiting `entry` whose strings start `strings`; returns the strings after its.
fn format_waiting<'t>(
    out: &mut Vec<u8>,
    entry: &Waiting,
    strings: &'t [u8],
    format: LogFormat,
) -> &'t [u8] {
    let mut rest = strings;
    let mut take = |n: u32| {
        let (s, r) = rest.split_at((n as usize).min(rest.len()));
        rest = r;
        // They were `str`s when handed over, and are cut at their own ends.
        std::str::from_utf8(s).unwrap_or("-")
    };
    let [method, host, path, pool, backend] = entry.lengths.map(&mut take);
    format_access(
        out,
        &AccessEntry {
            at: entry.at,
            method,
            host,
            path,
            status: entry.status,
            micros: entry.micros,
            pool,
            backend,
            decision: entry.decision,
            learned: entry.learned,
            session: entry.session,
        },
        format,
    );
    rest
}

/// Appends `entry`'s line to `out`, exactly as the log subscriber formats an event of the
/// `tidegate::access` target with these fields (text, or JSON with the fields flattened). The
/// common case (ASCII names and paths) is written without `core::fmt`.
pub fn format_access(out: &mut Vec<u8>, entry: &AccessEntry<'_>, format: LogFormat) {
    match format {
        LogFormat::Text => {
            write_timestamp(out, entry.at);
            out.extend_from_slice(b"  INFO tidegate::access: method=");
            out.extend_from_slice(entry.method.as_bytes());
            out.extend_from_slice(b" host=");
            quoted(out, entry.host, LogFormat::Text);
            out.extend_from_slice(b" path=");
            write_path(out, entry.path);
            out.extend_from_slice(b" status=");
            write_u64(out, u64::from(entry.status));
            out.extend_from_slice(b" ms=");
            write_ms(out, entry.micros, LogFormat::Text);
            for (name, value) in [
                (&b" pool="[..], entry.pool),
                (b" backend=", entry.backend),
                (b" decision=", entry.decision),
                (b" learned=", entry.learned),
            ] {
                out.extend_from_slice(name);
                quoted(out, value, LogFormat::Text);
            }
            out.extend_from_slice(b" session=");
            write_session(out, entry.session);
            out.push(b'\n');
        }
        LogFormat::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            write_timestamp(out, entry.at);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"method\":");
            quoted(out, entry.method, LogFormat::Json);
            out.extend_from_slice(b",\"host\":");
            quoted(out, entry.host, LogFormat::Json);
            out.extend_from_slice(b",\"path\":");
            if plain(entry.path) {
                out.push(b'"');
                write_path(out, entry.path);
                out.push(b'"');
            } else {
                let mut path = Vec::with_capacity(entry.path.len());
                write_path(&mut path, entry.path);
                // Cut at ASCII '/' and ';' only: still UTF-8.
                quoted(
                    out,
                    std::str::from_utf8(&path).unwrap_or("-"),
                    LogFormat::Json,
                );
            }
            out.extend_from_slice(b",\"status\":");
            write_u64(out, u64::from(entry.status));
            out.extend_from_slice(b",\"ms\":");
            write_ms(out, entry.micros, LogFormat::Json);
            for (name, value) in [
                (&b",\"pool\":"[..], entry.pool),
                (b",\"backend\":", entry.backend),
                (b",\"decision\":", entry.decision),
                (b",\"learned\":", entry.learned),
            ] {
                out.extend_from_slice(name);
                quoted(out, value, LogFormat::Json);
            }
            out.extend_from_slice(b",\"session\":\"");
            write_session(out, entry.session);
            out.extend_from_slice(b"\",\"target\":\"tidegate::access\"}\n");
        }
    }
}

/// A path as the access log shows it: without path parameters (`;jsessionid=KEY`), which
/// may carry session ids.
fn write_path(out: &mut Vec<u8>, path: &str) {
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(segment.split(';').next().unwrap_or("").as_bytes());
    }
}

/// A session as the access log shows it: its keyed hash in hex, or `-`.
fn write_session(out: &mut Vec<u8>, session: Option<u32>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match session {
        Some(hash) => out.extend((0..8).rev().map(|i| HEX[(hash >> (i * 4)) as usize & 15])),
        None => out.push(b'-'),
    }
}

/// True when `s` is printable ASCII without `"` or `\\`: what both Rust's `{:?}` and JSON
/// write between quotes unchanged.
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// `s` quoted as the subscriber writes a string field: `{:?}` in text, a JSON string in JSON.
fn quoted(out: &mut Vec<u8>, s: &str, format: LogFormat) {
    if plain(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    let _ = match format {
        LogFormat::Text => write!(out, "{s:?}"),
        LogFormat::Json => serde_json::to_writer(&mut *out, s).map_err(std::io::Error::other),
    };
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    write_padded(out, n, 1);
}

/// `n` in decimal, with leading zeros to at least `width` digits (at most 20).
fn write_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at.min(digits.len() - width.min(20))..]);
}

/// `micros` in milliseconds as `{:?}` (text) or JSON write `micros as f64 / 1000.0`: the
/// shortest decimal, at least one digit after the point. Written here below 2^50 µs (35
/// years; a three-decimal number that small is its double's shortest form), by them beyond.
fn write_ms(out: &mut Vec<u8>, micros: u64, format: LogFormat) {
    if micros >= 1 << 50 {
        let ms = micros as f64 / 1000.0;
        let _ = match format {
            LogFormat::Text => write!(out, "{ms:?}"),
            LogFormat::Json => serde_json::to_writer(&mut *out, &ms).map_err(std::io::Error::other),
        };
        return;
    }
    write_u64(out, micros / 1000);
    out.push(b'.');
    let mut frac = micros % 1000;
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let mut width = 3;
    while frac.is_multiple_of(10) {
        frac /= 10;
        width -= 1;
    }
    write_padded(out, frac, width);
}

/// `at` as the log subscriber writes it: RFC 3339 in UTC with microseconds. The date and
/// time up to the second are kept from the line before when they are the same.
fn write_timestamp(out: &mut Vec<u8>, at: SystemTime) {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let s = secs % 86_400;
        let mut line = Vec::with_capacity(19);
        let _ = write!(
            line,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
            s / 3600,
            s / 60 % 60,
            s % 60
        );
        if line.len() == 19 {
            text.copy_from_slice(&line);
            SECOND.set((secs, text));
        } else {
            // Beyond year 9999: written as it is, not kept.
            out.extend_from_slice(&line);
            let _ = write!(out, ".{:06}Z", since.subsec_micros());
            return;
        }
    }
    out.extend_from_slice(&text);
    out.push(b'.');
    write_padded(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01), after Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl<'a> MakeWriter<'a> for LogOutput {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A `Write` that collects into a shared buffer.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn entry(host: &str, path: &str, session: Option<u32>) -> AccessEntry<'static> {
        AccessEntry {
            at: SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_000_000_123_456),
            method: "GET",
            host: Box::leak(host.to_string().into_boxed_str()),
            path: Box::leak(path.to_string().into_boxed_str()),
            status: 200,
            micros: 1290,
            pool: "default",
            backend: "b1",
            decision: "pinned",
            learned: "-",
            session,
        }
    }

    /// The line the log subscriber writes for the same event (what the request path used to
    /// log through `tracing::info!`), its timestamp cut off.
    fn subscriber_line(e: &AccessEntry<'_>, format: LogFormat) -> String {
        let sink = Sink::default();
        let writer = {
            let sink = sink.clone();
            move || sink.clone()
        };
        let logs = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false);
        let dispatch = match format {
            LogFormat::Text => tracing::Dispatch::new(logs.finish()),
            LogFormat::Json => tracing::Dispatch::new(logs.json().flatten_event(true).finish()),
        };
        let mut path = Vec::new();
        write_path(&mut path, e.path);
        let path = String::from_utf8(path).unwrap();
        let mut session = Vec::new();
        write_session(&mut session, e.session);
        let session = String::from_utf8(session).unwrap();
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(
                target: "tidegate::access",
                method = %e.method,
                host = e.host,
                path = %path,
                status = e.status,
                ms = e.micros as f64 / 1000.0,
                pool = e.pool,
                backend = e.backend,
                decision = e.decision,
                learned = e.learned,
                session = %session,
            );
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        without_timestamp(&text)
    }

    fn without_timestamp(line: &str) -> String {
        let at = line
            .find("2026-")
            .or_else(|| line.find("19"))
            .expect("a timestamp");
        let end = line[at..].find('Z').expect("timestamp's end") + at + 1;
        format!("{}{}", &line[..at], &line[end..])
    }

    #[test]
    fn access_lines_are_what_the_log_subscriber_writes() {
        for format in [LogFormat::Text, LogFormat::Json] {
            for e in [
                entry(
                    "shop.example",
                    "/app;jsessionid=KEY/x;y=1",
                    Some(0x1a2b_3c4d),
                ),
                entry("ex\"am\\ple\u{7}ü", "/", None),
                entry("-", "/a%20b/c", Some(7)),
            ] {
                let mut ours = Vec::new();
                format_access(&mut ours, &e, format);
                let ours = String::from_utf8(ours).unwrap();
                assert_eq!(
                    without_timestamp(&ours),
                    subscriber_line(&e, format),
                    "{format:?}"
                );
            }
        }
    }

    #[test]
    fn access_timestamps_are_rfc3339_utc_with_microseconds() {
        let mut out = Vec::new();
        write_timestamp(&mut out, entry("h", "/", None).at);
        assert_eq!(out, b"2026-11-30T00:53:20.123456Z");
        for (micros, text) in [
            (42, &b"1970-01-01T00:00:00.000042Z"[..]),
            (86_399_999_999, b"1970-01-01T23:59:59.999999Z"),
            (951_782_400_000_000, b"2000-02-29T00:00:00.000000Z"),
        ] {
            out.clear();
            write_timestamp(
                &mut out,
                SystemTime::UNIX_EPOCH + Duration::from_micros(micros),
            );
            assert_eq!(out, text, "{micros} µs");
        }
        for (days, date) in [
            (0, (1970, 1, 1)),
            (11_016, (2000, 2, 29)),
            (11_017, (2000, 3, 1)),
            (-1, (1969, 12, 31)),
            (20_818, (2026, 12, 31)),
        ] {
            assert_eq!(civil_from_days(days), date, "day {days}");
        }
    }

    #[test]
    fn milliseconds_are_written_as_the_subscriber_writes_them() {
        let values = (0..20_000u64)
            .chain((0..2000).map(|i| i * 7919 + 1_000_000))
            .chain([
                u64::from(u32::MAX),
                1 << 49,
                (1 << 50) - 1,
                1 << 50,
                u64::MAX,
            ]);
        for micros in values {
            let ms = micros as f64 / 1000.0;
            for (format, expected) in [
                (LogFormat::Text, format!("{ms:?}")),
                (LogFormat::Json, serde_json::to_string(&ms).unwrap()),
            ] {
                let mut out = Vec::new();
                write_ms(&mut out, micros, format);
                assert_eq!(String::from_utf8(out).unwrap(), expected, "{micros} µs");
            }
        }
    }

    #[test]
    fn logged_paths_lose_their_parameters() {
        let path = |p: &str| {
            let mut out = Vec::new();
            write_path(&mut out, p);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(path("/app;jsessionid=KEY/x;y=1"), "/app/x");
        assert_eq!(path("/plain/path"), "/plain/path");
    }

    #[test]
    fn access_entries_are_written_in_order_after_the_lines_before_them() {
        let sink = Sink::default();
        let (output, flusher) = buffered(sink.clone());
        let log = output.access_log(LogFormat::Json);
        output.make_writer().write_all(b"a line\n").unwrap();
        for i in 0..1000u32 {
            let path = format!("/page/{i}");
            log.log(&AccessEntry {
                path: &path,
                ..entry("h", "/", Some(i))
            });
        }
        drop(flusher);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1001);
        assert_eq!(lines[0], "a line");
        for (i, line) in lines[1..].iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
            assert_eq!(v["path"], format!("/page/{i}"));
            assert_eq!(v["session"], format!("{i:08x}"));
        }
    }

    #[test]
    fn a_line_is_written_within_the_flush_period() {
        let sink = Sink::default();
        let (output, _flusher) = buffered(sink.clone());
        output.make_writer().write_all(b"one line\n").unwrap();
        let start = Instant::now();
        while sink.0.lock().unwrap().is_empty() {
            assert!(start.elapsed() < FLUSH_EVERY * 20, "line not written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&sink.0.lock().unwrap()[..], b"one line\n");
    }

    #[test]
    fn every_pending_line_is_written_when_the_flusher_drops() {
        let sink = Sink::default();
        let (output, flusher) = buffered(sink.clone());
        for i in 0..10_000 {
            writeln!(output.make_writer(), "line {i}").unwrap();
        }
        drop(flusher);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 10_000);
        assert_eq!(text.lines().last(), Some("line 9999"));
    }

    #[test]
    fn lines_beyond_the_bound_are_dropped_and_counted() {
        /// An output that never finishes a write until told.
        struct Stuck(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Stuck {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let (open, cv) = &*self.0;
                let _open = cv.wait_while(open.lock().unwrap(), |open| !*open).unwrap();
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (output, flusher) = buffered(Stuck(gate.clone(), sink.clone()));
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        // Fill to four times the bound while the output is stuck.
        for _ in 0..(MAX_PENDING / 1024) * 4 {
            output.make_writer().write_all(&line).unwrap();
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(flusher);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        // At most what the writer took before it got stuck, plus the bound.
        assert!(
            text.len() <= 2 * MAX_PENDING + 4096,
            "bounded: {} bytes written of {} logged",
            text.len(),
            4 * MAX_PENDING
        );
        assert!(
            text.contains("log lines dropped"),
            "the drop is reported in the output"
        );
    }
}

//! Where log lines go: a buffer that a thread of its own writes out in batches, at least
//! every [`FLUSH_EVERY`] and whenever [`BATCH`] bytes have gathered, the way nginx's
//! `access_log … buffer= flush=` works.
//!
//! Writing each line as it is logged costs the request path a `write(2)` per request when
//! the access log is on (one more system call on top of a keep-alive request's four); here it
//! costs a short, uncontended lock and a copy. Should the output fall far behind
//! ([`MAX_PENDING`] bytes waiting), lines are dropped rather than requests stalled, and the
//! number dropped is reported in the output itself.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

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
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closing: bool,
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
    loop {
        let closing = {
            let pending = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let pending = shared
                .wake
                .wait_while(pending, |p| p.bytes.is_empty() && !p.closing)
                .unwrap_or_else(PoisonError::into_inner);
            let (mut pending, _) = shared
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| {
                    p.bytes.len() < BATCH && !p.closing
                })
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut pending.bytes, &mut batch);
            pending.closing
        };
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
        if pending.bytes.len() + line.len() > MAX_PENDING {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            let first = pending.bytes.is_empty();
            pending.bytes.extend_from_slice(line);
            // The first line starts the writer's wait; a full batch ends it.
            if first || pending.bytes.len() >= BATCH {
                self.shared.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

//! Log output for the binary: formatted lines are gathered in memory and written to stderr
//! together, at most [`FLUSH_EVERY`] after they were logged, or at once when [`LIMIT`] bytes
//! wait. A log line then costs the core a copy instead of a system call (at info level the
//! proxy logs one line per call). Warnings and errors are written at once, with what waited
//! before them, so that nothing serious waits for the next tick. The process flushes before
//! it exits and from its panic hook.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// The longest a line waits in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Bytes waiting that trigger a write straight away.
pub const LIMIT: usize = 64 * 1024;

#[derive(Clone, Default)]
pub struct Buffered {
    buf: Arc<Mutex<Vec<u8>>>,
}

static GLOBAL: OnceLock<Buffered> = OnceLock::new();

impl Buffered {
    /// The process-wide buffer, with the thread that flushes it every [`FLUSH_EVERY`] and a
    /// panic hook that flushes it before the panic message.
    pub fn install() -> Buffered {
        GLOBAL
            .get_or_init(|| {
                let b = Buffered::default();
                let ticker = b.clone();
                let _ = std::thread::Builder::new()
                    .name("log-flush".into())
                    .spawn(move || loop {
                        std::thread::sleep(FLUSH_EVERY);
                        ticker.flush();
                    });
                let on_panic = b.clone();
                let default_hook = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    on_panic.flush();
                    default_hook(info);
                }));
                b
            })
            .clone()
    }

    /// Writes out what waits.
    pub fn flush(&self) {
        let mut buf = match self.buf.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        write_out(&mut buf);
    }

    fn append(&self, data: &[u8], urgent: bool) {
        let mut buf = match self.buf.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        buf.extend_from_slice(data);
        if urgent || buf.len() >= LIMIT {
            write_out(&mut buf);
        }
    }
}

/// Writes out what waits in the process-wide buffer, if it was installed.
pub fn flush() {
    if let Some(b) = GLOBAL.get() {
        b.flush();
    }
}

fn write_out(buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    // Nothing sensible to do when stderr is gone.
    let _ = std::io::stderr().lock().write_all(buf);
    buf.clear();
}

/// The writer of one log line.
pub struct Line {
    to: Buffered,
    urgent: bool,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.to.append(data, self.urgent);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            to: self.clone(),
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            to: self.clone(),
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(b: &Buffered) -> usize {
        b.buf.lock().map(|v| v.len()).unwrap_or(usize::MAX)
    }

    #[test]
    fn info_lines_wait_and_warnings_or_a_full_buffer_write_out() {
        let b = Buffered::default();
        let mut info = Line {
            to: b.clone(),
            urgent: false,
        };
        assert!(info.write_all(b"one\n").is_ok());
        assert!(info.write_all(b"two\n").is_ok());
        assert_eq!(waiting(&b), 8, "info lines wait for the tick");
        let mut warn = Line {
            to: b.clone(),
            urgent: true,
        };
        assert!(warn.write_all(b"warn\n").is_ok());
        assert_eq!(
            waiting(&b),
            0,
            "a warning writes out what waited and itself"
        );
        assert!(info.write_all(&vec![b'x'; LIMIT]).is_ok());
        assert_eq!(waiting(&b), 0, "a full buffer is written at once");
        assert!(info.write_all(b"three\n").is_ok());
        b.flush();
        assert_eq!(waiting(&b), 0);
    }
}

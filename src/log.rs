//! The library's one log sink: a host-installed callback (none by default, so nothing is printed
//! behind the host's back). Used for decisions a host may want to know about, such as why `auto`
//! skipped a backend.

use std::sync::RwLock;

/// Severity of a log message (stable numbers, shared with the C ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

type Sink = Box<dyn Fn(LogLevel, &str) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Installs (or with `None`, removes) the process-wide log callback. It may be called from any
/// thread the library runs on, so it must be thread-safe.
pub fn set_sink(sink: Option<Sink>) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = sink;
}

/// Sends a message to the installed callback, if any.
pub fn emit(level: LogLevel, message: &str) {
    if let Some(sink) = SINK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        sink(level, message);
    }
}

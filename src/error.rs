//! The one error type of the safe API. Every variant maps 1:1 onto a stable C status code
//! (`ffi::Status`), so the kind is what a host branches on and the message is what a person reads.

use std::fmt;

/// What went wrong, coarse enough for a host to branch on. The C ABI maps each kind to its own
/// stable `gpt2rt_status` number; kinds are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An argument is invalid in a way no more specific kind describes.
    InvalidArgument,
    /// A required pointer was NULL (C ABI only).
    NullPointer,
    /// An options struct's `struct_size` is not one this library knows.
    StructSize,
    /// A caller buffer is smaller than the result; the required size is reported.
    BufferTooSmall,
    /// Text given to the library is not valid UTF-8.
    InvalidUtf8,
    /// A token id is outside the model's vocabulary.
    TokenOutOfRange,
    /// More sequences than the session's profile allows.
    BatchExceedsProfile,
    /// A sequence would grow past the session's profile (or the model's positions).
    SequenceExceedsProfile,
    /// A requested profile is outside what the engine supports.
    ProfileUnsupported,
    /// `step` or a read was called before a successful `prefill`.
    NotPrefilled,
    /// Lengths that must agree do not (e.g. batch vs. number of lengths).
    LengthMismatch,
    /// A session was used from two threads at once.
    SessionBusy,
    /// Reading a file failed.
    Io,
    /// A required file is missing.
    FileNotFound,
    /// A model file is malformed, truncated or corrupt.
    ModelFormat,
    /// A tensor the model needs is absent.
    MissingTensor,
    /// A tensor has the wrong shape.
    ShapeMismatch,
    /// A tensor has a dtype this library cannot load.
    UnsupportedDtype,
    /// `config.json` is missing fields or is inconsistent.
    InvalidConfig,
    /// The tokenizer could not be loaded or could not encode/decode.
    Tokenizer,
    /// The requested backend is not available on this machine or in this build.
    BackendUnavailable,
    /// Host or device memory for a request could not be reserved.
    OutOfMemory,
    /// The device reported an error.
    Device,
    /// A bug: an invariant of the library itself was broken.
    Internal,
}

/// An error with its kind and a human-readable message naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with where it happened, keeping the kind.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `bail!(Kind, "fmt", args)` returns `Err(Error::new(ErrorKind::Kind, format!(..)))`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*)))
    };
}

/// `err!(Kind, "fmt", args)` builds the error without returning.
#[macro_export]
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*))
    };
}

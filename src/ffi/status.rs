//! `gpt2rt_status`: stable numbers, grouped, never reused.

use crate::error::ErrorKind;
use std::ffi::c_char;

/// The result of every gpt2rt function. Numbers are stable and never reused; new ones are only
/// appended within their group (0-99 arguments and calls, 100-199 files and models, 200-299
/// backends and devices, 900+ internal).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum gpt2rt_status {
    Ok = 0,
    InvalidArgument = 1,
    NullPointer = 2,
    StructSize = 3,
    BufferTooSmall = 4,
    InvalidUtf8 = 5,
    TokenOutOfRange = 6,
    BatchExceedsProfile = 7,
    SequenceExceedsProfile = 8,
    ProfileUnsupported = 9,
    NotPrefilled = 10,
    LengthMismatch = 11,
    SessionBusy = 12,
    Io = 100,
    FileNotFound = 101,
    ModelFormat = 102,
    MissingTensor = 103,
    ShapeMismatch = 104,
    UnsupportedDtype = 105,
    InvalidConfig = 106,
    Tokenizer = 107,
    BackendUnavailable = 200,
    OutOfMemory = 201,
    Device = 202,
    Panic = 900,
    Internal = 901,
}

impl gpt2rt_status {
    pub fn from_kind(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::InvalidArgument => Self::InvalidArgument,
            ErrorKind::NullPointer => Self::NullPointer,
            ErrorKind::StructSize => Self::StructSize,
            ErrorKind::BufferTooSmall => Self::BufferTooSmall,
            ErrorKind::InvalidUtf8 => Self::InvalidUtf8,
            ErrorKind::TokenOutOfRange => Self::TokenOutOfRange,
            ErrorKind::BatchExceedsProfile => Self::BatchExceedsProfile,
            ErrorKind::SequenceExceedsProfile => Self::SequenceExceedsProfile,
            ErrorKind::ProfileUnsupported => Self::ProfileUnsupported,
            ErrorKind::NotPrefilled => Self::NotPrefilled,
            ErrorKind::LengthMismatch => Self::LengthMismatch,
            ErrorKind::SessionBusy => Self::SessionBusy,
            ErrorKind::Io => Self::Io,
            ErrorKind::FileNotFound => Self::FileNotFound,
            ErrorKind::ModelFormat => Self::ModelFormat,
            ErrorKind::MissingTensor => Self::MissingTensor,
            ErrorKind::ShapeMismatch => Self::ShapeMismatch,
            ErrorKind::UnsupportedDtype => Self::UnsupportedDtype,
            ErrorKind::InvalidConfig => Self::InvalidConfig,
            ErrorKind::Tokenizer => Self::Tokenizer,
            ErrorKind::BackendUnavailable => Self::BackendUnavailable,
            ErrorKind::OutOfMemory => Self::OutOfMemory,
            ErrorKind::Device => Self::Device,
            ErrorKind::Internal => Self::Internal,
        }
    }

    fn name(code: u32) -> &'static str {
        match code {
            0 => "GPT2RT_STATUS_OK\0",
            1 => "GPT2RT_STATUS_INVALID_ARGUMENT\0",
            2 => "GPT2RT_STATUS_NULL_POINTER\0",
            3 => "GPT2RT_STATUS_STRUCT_SIZE\0",
            4 => "GPT2RT_STATUS_BUFFER_TOO_SMALL\0",
            5 => "GPT2RT_STATUS_INVALID_UTF8\0",
            6 => "GPT2RT_STATUS_TOKEN_OUT_OF_RANGE\0",
            7 => "GPT2RT_STATUS_BATCH_EXCEEDS_PROFILE\0",
            8 => "GPT2RT_STATUS_SEQUENCE_EXCEEDS_PROFILE\0",
            9 => "GPT2RT_STATUS_PROFILE_UNSUPPORTED\0",
            10 => "GPT2RT_STATUS_NOT_PREFILLED\0",
            11 => "GPT2RT_STATUS_LENGTH_MISMATCH\0",
            12 => "GPT2RT_STATUS_SESSION_BUSY\0",
            100 => "GPT2RT_STATUS_IO\0",
            101 => "GPT2RT_STATUS_FILE_NOT_FOUND\0",
            102 => "GPT2RT_STATUS_MODEL_FORMAT\0",
            103 => "GPT2RT_STATUS_MISSING_TENSOR\0",
            104 => "GPT2RT_STATUS_SHAPE_MISMATCH\0",
            105 => "GPT2RT_STATUS_UNSUPPORTED_DTYPE\0",
            106 => "GPT2RT_STATUS_INVALID_CONFIG\0",
            107 => "GPT2RT_STATUS_TOKENIZER\0",
            200 => "GPT2RT_STATUS_BACKEND_UNAVAILABLE\0",
            201 => "GPT2RT_STATUS_OUT_OF_MEMORY\0",
            202 => "GPT2RT_STATUS_DEVICE\0",
            900 => "GPT2RT_STATUS_PANIC\0",
            901 => "GPT2RT_STATUS_INTERNAL\0",
            _ => "GPT2RT_STATUS_UNKNOWN\0",
        }
    }
}

/// The name of a status code as a static NUL-terminated string ("GPT2RT_STATUS_UNKNOWN" for a
/// number this library does not know). Takes the raw number so any value is safe to pass.
#[unsafe(no_mangle)]
pub extern "C" fn gpt2rt_status_name(status: u32) -> *const c_char {
    gpt2rt_status::name(status).as_ptr().cast()
}

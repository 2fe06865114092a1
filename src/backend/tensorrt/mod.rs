//! The TensorRT engine backend. This build does not contain it; asking for it answers why.

use crate::error::Result;

/// Why the TensorRT backend cannot be used in this build (or `Ok` when it can).
pub fn availability() -> Result<()> {
    bail!(
        BackendUnavailable,
        "the tensorrt backend is not part of this build of gpt2rt {} (build with the `tensorrt` feature and TensorRT 10)",
        env!("CARGO_PKG_VERSION")
    )
}

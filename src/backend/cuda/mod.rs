//! The native CUDA backend. This build does not contain it yet; asking for it answers why, through
//! the same calls a CUDA build uses, so hosts can be written once.

use crate::error::Result;

/// Why the CUDA backend cannot be used in this build (or `Ok` when it can).
pub fn availability() -> Result<()> {
    bail!(
        BackendUnavailable,
        "the cuda backend is not part of this build of gpt2rt {} (CPU reference only)",
        env!("CARGO_PKG_VERSION")
    )
}

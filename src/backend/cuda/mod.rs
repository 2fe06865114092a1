//! The native CUDA backend, through the driver API only (`cudarc`, loaded at run time): kernels are
//! compiled ahead into `kernels/gpt2rt.fatbin` and embedded, so a user's machine needs only the
//! NVIDIA driver. Weights live on the device in f32, f16 or bf16, and so does the KV cache (the
//! weights' type); activations and every accumulation are f32. Per-sequence positions live on the
//! device and advance there; each step is captured once per batch size as a CUDA graph and
//! replayed.

#[cfg(not(feature = "cuda"))]
mod imp {
    use crate::error::Result;

    /// This build has no CUDA backend.
    pub fn availability() -> Result<()> {
        bail!(BackendUnavailable, "this build of gpt2rt was compiled without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp;

pub use imp::*;

//! The CUDA backend against the same PyTorch fixtures as the CPU reference. Skips (and says so)
//! where no usable NVIDIA GPU and driver exist, as on CI.

mod common;

use common::*;
use gpt2rt::{BackendKind, DType, Engine, EngineOptions, ErrorKind, Preset, SessionOptions};

fn gpu_available() -> bool {
    match gpt2rt::backend::cuda::availability() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("GPU test skipped: {e}");
            false
        }
    }
}

#[test]
fn cuda_f32_matches_pytorch_tokens_and_logits() {
    if !gpu_available() {
        return;
    }
    for name in ["tiny", "distilgpt2"] {
        let fx = fixture(name);
        let engine = engine(&fx, BackendKind::Cuda, Some(DType::F32)).unwrap();
        assert_eq!(engine.backend_kind(), BackendKind::Cuda);
        for case in cases(&fx) {
            check_tokens(&engine, &case, true, usize::MAX);
        }
        let ragged = cases(&fx).into_iter().find(|c| c.name == "batch3_ragged").unwrap();
        check_tokens(&engine, &ragged, false, 16);
        check_case_logits(&engine, &fx);
    }
}

#[test]
fn cuda_half_precision_agreement_is_reported() {
    if !gpu_available() {
        return;
    }
    let fx = fixture("distilgpt2");
    for dtype in [DType::F16, DType::BF16] {
        let engine = engine(&fx, BackendKind::Cuda, Some(dtype)).unwrap();
        let (agree, total, worst) = agreement(&engine, &fx);
        println!(
            "cuda {dtype} vs PyTorch fp32 (distilgpt2): greedy tokens agree on {agree}/{total} positions before the first divergence; max relative prefill logit difference {worst:.2e}"
        );
        assert!(worst < 5e-2, "{dtype}: logits too far from fp32 ({worst})");
    }
}

#[test]
fn a_missing_device_is_a_clear_error() {
    if !gpu_available() {
        return;
    }
    let e = Engine::load(&EngineOptions {
        builtin: Preset::Tiny,
        backend: BackendKind::Cuda,
        device: 99,
        ..EngineOptions::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackendUnavailable);
    assert!(e.message().contains("device 99"), "{e}");
    // A profile past the engine's limits never reaches a kernel.
    let engine =
        Engine::load(&EngineOptions { builtin: Preset::Tiny, backend: BackendKind::Cuda, ..EngineOptions::default() })
            .unwrap();
    let e = engine.new_session(SessionOptions { max_batch: 1, max_seq: 100_000, kv_cache: true }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ProfileUnsupported);
}

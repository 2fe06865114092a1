//! Asking for the TensorRT backend where it cannot run (a build without the `tensorrt` feature, or
//! no TensorRT 10 runtime) fails with its own status and a message that says why, through the C
//! ABI and the CLI. The engine-metadata logic itself is unit-tested in src/backend/tensorrt/.

use gpt2rt::ffi::*;
use std::ffi::{CStr, c_char};
use std::process::Command;
use std::ptr::null_mut;

/// What this build says when the tensorrt backend cannot run here.
fn expected_reason() -> &'static str {
    if cfg!(feature = "tensorrt") { "TensorRT runtime not found (libnvinfer.so.10)" } else { "not part of this build" }
}

fn runtime_present() -> bool {
    cfg!(feature = "tensorrt")
        && gpt2rt::api::backend_availability().iter().any(|(k, r)| *k == gpt2rt::BackendKind::TensorRt && r.is_ok())
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(gpt2rt_last_error_message()) }.to_string_lossy().into_owned()
}

fn load(backend: gpt2rt_backend, model_dir: &str) -> (gpt2rt_status, *mut gpt2rt_engine) {
    unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_engine_options>();
        assert_eq!(gpt2rt_engine_options_default(&mut o), gpt2rt_status::Ok);
        o.backend = backend as u32;
        o.model_dir = model_dir.as_ptr().cast::<c_char>();
        o.model_dir_len = model_dir.len();
        let mut engine = null_mut();
        (gpt2rt_engine_load(&o, &mut engine), engine)
    }
}

#[test]
fn the_c_abi_answers_backend_unavailable_with_the_reason() {
    if runtime_present() {
        eprintln!("skipped: a TensorRT runtime is present here");
        return;
    }
    let engine_file = std::env::temp_dir().join("gpt2rt-test-missing-runtime.engine");
    std::fs::write(&engine_file, b"not an engine").unwrap();
    for model_dir in [engine_file.to_str().unwrap(), ""] {
        let (status, engine) = load(gpt2rt_backend::Tensorrt, model_dir);
        assert_eq!(status, gpt2rt_status::BackendUnavailable, "{}", last_error());
        assert!(engine.is_null(), "out-param untouched on failure");
        assert!(last_error().contains(expected_reason()), "{}", last_error());
    }
    assert_eq!(gpt2rt_status::BackendUnavailable as u32, 200, "the status number is stable");
}

#[test]
fn an_engine_file_is_refused_by_the_other_backends() {
    let engine_file = std::env::temp_dir().join("gpt2rt-test-cpu.engine");
    std::fs::write(&engine_file, b"not an engine").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2rt"))
        .args(["generate", "--backend", "cpu", "--engine"])
        .arg(&engine_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only the tensorrt backend runs"), "{stderr}");
}

#[test]
fn inspect_engine_says_why_tensorrt_cannot_run_here() {
    if runtime_present() {
        eprintln!("skipped: a TensorRT runtime is present here");
        return;
    }
    let out =
        Command::new(env!("CARGO_BIN_EXE_gpt2rt")).args(["inspect", "--engine", "model.engine"]).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("tensorrt unavailable: ") && stdout.contains(expected_reason()), "{stdout}");
    assert!(stderr.contains("BackendUnavailable") && stderr.contains(expected_reason()), "{stderr}");
}

#[test]
fn trt_command_refuses_a_file_that_is_not_onnx() {
    let bogus = std::env::temp_dir().join("gpt2rt-test-bogus.onnx");
    std::fs::write(&bogus, [0xffu8; 32]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2rt"))
        .args(["trt-command", "--max-batch", "1", "--max-seq", "8", "--onnx"])
        .arg(&bogus)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ModelFormat") && stderr.contains("is not a readable ONNX model"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2rt"))
        .args(["trt-command", "--max-batch", "1", "--max-seq", "8", "--onnx", "/nonexistent.onnx"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("FileNotFound"));
}

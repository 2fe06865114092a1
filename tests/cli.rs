//! The command-line tool's own checks of its arguments.

use std::process::Command;

#[test]
fn bench_refuses_zero_repetitions_before_running_anything() {
    // Zero timed repetitions leave no time to take the median of (it used to panic there, after
    // the whole warm-up had run).
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2rt"))
        .args(["bench", "--builtin", "tiny", "--backend", "cpu", "--reps", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value '0' for '--reps"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // One repetition runs and prints the table.
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2rt"))
        .args(["bench", "--builtin", "tiny", "--backend", "cpu", "--reps", "1", "--batches", "1", "--new-tokens", "2"])
        .args(["--no-kv-off"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("| 1 | 2 |")));
}

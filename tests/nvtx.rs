//! NVTX ranges through the NVTX v3 injection protocol, with a fake tool: tests/nvtx/fake_injection.c
//! attaches to the `gpt2rt` CLI the way Nsight Systems' injection library does
//! (`NVTX_INJECTION64_PATH`) and logs every push and pop. Each case runs the CLI in its own
//! process, since NVTX attaches once per process. Nsight Systems itself is not installed on any
//! machine this project runs on; this fake is what checks our side of the protocol.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const NEW_TOKENS: usize = 5;
const INJECTION_VAR: &str =
    if cfg!(target_pointer_width = "32") { "NVTX_INJECTION32_PATH" } else { "NVTX_INJECTION64_PATH" };

/// Builds the fake injection library once, or says why it cannot (no C compiler).
fn fake_injection() -> Option<&'static Path> {
    static LIB: OnceLock<Option<PathBuf>> = OnceLock::new();
    LIB.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvtx/fake_injection.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{}fake_nvtx_injection{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
        let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        let mut cmd = Command::new(&cc);
        cmd.args(["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-shared"]);
        if !cfg!(windows) {
            cmd.arg("-fPIC");
        }
        match cmd.arg("-o").arg(&out).arg(&src).output() {
            Ok(o) if o.status.success() => Some(out),
            Ok(o) => panic!(
                "{} failed to build the fake injection:\n{}",
                cc.to_string_lossy(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => {
                eprintln!("skipped: no C compiler ({}: {e}); set CC to run the NVTX tests", cc.to_string_lossy());
                None
            }
        }
    })
    .as_deref()
}

/// A log file of its own for one case (tests run in parallel).
fn log_path(case: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nvtx_{case}_{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Runs the CLI on the tiny CPU model with `args` appended and `env` set; NVTX variables of the
/// parent are not inherited.
fn cli(args: &[&str], env: &[(&str, &OsStr)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpt2rt"));
    cmd.args(["generate", "--backend", "cpu", "--builtin", "tiny", "--threads", "1", "--print-tokens"])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string()])
        .args(args)
        .arg("Hello, my name is")
        .env_remove("GPT2RT_NVTX")
        .env_remove(INJECTION_VAR)
        .env_remove("FAKE_NVTX_LOG")
        .env_remove("FAKE_NVTX_FAIL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the gpt2rt CLI runs");
    assert!(
        out.status.success(),
        "gpt2rt {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One closed range: its name and the names of its direct children, in order.
#[derive(Debug)]
struct Node {
    name: String,
    children: Vec<Node>,
}

/// What the fake tool saw: its init line and the tree of ranges, checked to be balanced with the
/// depths the tool tracked.
fn read_log(path: &Path) -> (String, Vec<Node>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let init = lines.next().expect("an init line").to_string();
    let mut stack: Vec<Node> = Vec::new();
    let mut roots = Vec::new();
    for line in lines {
        let mut parts = line.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("push"), Some(depth), Some(name)) => {
                assert_eq!(depth.parse::<usize>().unwrap(), stack.len(), "push depth in {line:?}");
                stack.push(Node { name: name.to_string(), children: Vec::new() });
            }
            (Some("pop"), Some(depth), None) => {
                let node = stack.pop().unwrap_or_else(|| panic!("a pop without a push: {text}"));
                assert_eq!(depth.parse::<usize>().unwrap(), stack.len(), "pop depth in {line:?}");
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => roots.push(node),
                }
            }
            _ => panic!("unexpected log line {line:?}"),
        }
    }
    assert!(stack.is_empty(), "ranges left open: {stack:?}");
    (init, roots)
}

fn names(nodes: &[Node]) -> Vec<&str> {
    nodes.iter().map(|n| n.name.as_str()).collect()
}

/// prefill, then select; then (step, select) for every further token, with `between` after each
/// forward pass.
fn expected_decode(between: &[&'static str]) -> Vec<&'static str> {
    let mut want = vec!["gpt2rt prefill"];
    want.extend(between);
    want.push("gpt2rt select");
    for _ in 1..NEW_TOKENS {
        want.push("gpt2rt step");
        want.extend(between);
        want.push("gpt2rt select");
    }
    want
}

fn assert_generate_ranges(log: &Path) {
    let (init, roots) = read_log(log);
    assert_eq!(init, "init version=3 core_size=16 core2_size=16 ends_null=1");
    assert_eq!(names(&roots), ["gpt2rt generate"], "one generation, nothing outside it: {roots:?}");
    let generate = &roots[0];
    assert_eq!(names(&generate.children), expected_decode(&[]));
    let prefills = generate.children.iter().filter(|n| n.name == "gpt2rt prefill").count();
    let steps = generate.children.iter().filter(|n| n.name == "gpt2rt step").count();
    assert_eq!((prefills, steps), (1, NEW_TOKENS - 1));
    // The CPU backend has no copies: nothing nested deeper.
    assert!(generate.children.iter().all(|n| n.children.is_empty()), "{generate:?}");
}

#[test]
fn nvtx_flag_sends_balanced_decode_ranges_to_the_tool() {
    let Some(lib) = fake_injection() else { return };
    let log = log_path("flag");
    let out = cli(&["--nvtx"], &[(INJECTION_VAR, lib.as_os_str()), ("FAKE_NVTX_LOG", log.as_os_str())]);
    assert!(stderr(&out).contains("nvtx: ranges on"), "{}", stderr(&out));
    assert_generate_ranges(&log);
    let plain = cli(&[], &[]);
    assert_eq!(stdout(&out), stdout(&plain), "NVTX does not change the tokens");
}

#[test]
fn gpt2rt_nvtx_env_turns_ranges_on_without_the_flag() {
    let Some(lib) = fake_injection() else { return };
    let log = log_path("env");
    let one = OsStr::new("1");
    cli(&[], &[("GPT2RT_NVTX", one), (INJECTION_VAR, lib.as_os_str()), ("FAKE_NVTX_LOG", log.as_os_str())]);
    assert_generate_ranges(&log);
}

#[test]
fn the_session_verbs_have_their_ranges() {
    // `generate --json` runs prefill, read_logits, select and step one by one.
    let Some(lib) = fake_injection() else { return };
    let log = log_path("verbs");
    let json = log.with_extension("json");
    cli(
        &["--nvtx", "--json", json.to_str().unwrap()],
        &[(INJECTION_VAR, lib.as_os_str()), ("FAKE_NVTX_LOG", log.as_os_str())],
    );
    let (_, roots) = read_log(&log);
    assert_eq!(names(&roots), expected_decode(&["gpt2rt read_logits"]));
}

#[test]
fn without_the_option_the_tool_is_never_loaded() {
    let Some(lib) = fake_injection() else { return };
    let log = log_path("off");
    let out = cli(&[], &[(INJECTION_VAR, lib.as_os_str()), ("FAKE_NVTX_LOG", log.as_os_str())]);
    assert!(!log.exists(), "the injection was initialized without --nvtx or GPT2RT_NVTX");
    let zero = OsStr::new("0");
    cli(&[], &[("GPT2RT_NVTX", zero), (INJECTION_VAR, lib.as_os_str()), ("FAKE_NVTX_LOG", log.as_os_str())]);
    assert!(!log.exists(), "GPT2RT_NVTX=0 attached the injection");
    assert!(!stderr(&out).contains("nvtx"), "{}", stderr(&out));
}

#[test]
fn a_missing_or_failing_tool_leaves_generation_unchanged() {
    let plain = stdout(&cli(&[], &[]));
    // No tool at all.
    let out = cli(&["--nvtx"], &[]);
    assert!(stderr(&out).contains(&format!("{INJECTION_VAR} is not set")), "{}", stderr(&out));
    assert_eq!(stdout(&out), plain);
    // A path that does not exist.
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no_such_nvtx_injection.so");
    let out = cli(&["--nvtx"], &[(INJECTION_VAR, missing.as_os_str())]);
    assert!(stderr(&out).contains("could not load the injection library"), "{}", stderr(&out));
    assert_eq!(stdout(&out), plain);
    // A tool whose initialization returns 0: what it installed is never called.
    let Some(lib) = fake_injection() else { return };
    let log = log_path("fail");
    let one = OsStr::new("1");
    let out = cli(
        &["--nvtx"],
        &[(INJECTION_VAR, lib.as_os_str()), ("FAKE_NVTX_LOG", log.as_os_str()), ("FAKE_NVTX_FAIL", one)],
    );
    assert!(stderr(&out).contains("returned 0 from InitializeInjectionNvtx2"), "{}", stderr(&out));
    assert_eq!(stdout(&out), plain);
    let (init, roots) = read_log(&log);
    assert!(init.starts_with("init "), "{init}");
    assert!(roots.is_empty(), "a failed tool received ranges: {roots:?}");
}

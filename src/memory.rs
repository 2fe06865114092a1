//! Host memory limits: a request whose buffers would not fit in the memory this process can still
//! get is refused up front with `OutOfMemory`, before anything is allocated.
//!
//! Why not just `try_reserve`: on Linux, memory is overcommitted, so reserving a few gigabytes
//! "succeeds" for any size below RAM + swap, and the process is killed later, when the pages are
//! touched. So on Linux the total a request needs is compared first with what is available:
//! `MemAvailable` from `/proc/meminfo`, lowered to the cgroup's remaining allowance when the process
//! runs in a container with a memory limit (cgroup v2 `memory.max - memory.current`, or v1
//! `limit_in_bytes - usage_in_bytes`). Elsewhere, and when none of these can be read, only the
//! fallible allocations (`try_reserve`) guard the request.

use crate::error::Result;

/// Bytes the process may still allocate on this machine, when the platform says (Linux).
pub fn available_host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut available = meminfo_available(&meminfo)?;
    if let Some(room) = cgroup_room() {
        available = available.min(room);
    }
    Some(available)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What the process's memory cgroup still allows, if it has a limit.
fn cgroup_room() -> Option<u64> {
    let read = |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    // cgroup v2: the process's own group ("0::/path" in /proc/self/cgroup).
    let group = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| text.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
    if let Some(group) = group {
        let dir = format!("/sys/fs/cgroup{}", group.trim_end_matches('/'));
        if let (Some(max), Some(current)) = (read(&format!("{dir}/memory.max")), read(&format!("{dir}/memory.current")))
        {
            return Some(max.saturating_sub(current));
        }
    }
    let (limit, usage) =
        (read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?, read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?);
    // v1 reports "no limit" as a huge number (page-rounded i64::MAX).
    (limit < 1 << 60).then(|| limit.saturating_sub(usage))
}

/// Refuses with `OutOfMemory` when `needed` bytes exceed what is available (see the module docs).
/// `what` names the request in the message, e.g. "a session of max_batch 8 x max_seq 1024".
pub(crate) fn ensure_host_memory(needed: u128, what: &dyn std::fmt::Display) -> Result<()> {
    check_host_memory(needed, available_host_memory(), what)
}

pub(crate) fn check_host_memory(needed: u128, available: Option<u64>, what: &dyn std::fmt::Display) -> Result<()> {
    let Some(available) = available else { return Ok(()) };
    if needed > available as u128 {
        bail!(
            OutOfMemory,
            "{what} needs {} of host memory, but only {} is available on this machine: nothing was allocated",
            human(needed),
            human(available as u128)
        );
    }
    Ok(())
}

/// "1.5 GiB", "12.0 MiB", "512 bytes".
pub(crate) fn human(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24684096 kB\nMemFree:        21586132 kB\nMemAvailable:   23824776 kB\n";
        assert_eq!(meminfo_available(text), Some(23_824_776 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn requests_above_the_available_memory_are_refused_with_a_message() {
        let e = check_host_memory(10 << 30, Some(8 << 30), &"a session").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory);
        assert!(e.message().contains("a session needs 10.0 GiB") && e.message().contains("8.0 GiB"), "{e}");
        check_host_memory(1 << 30, Some(8 << 30), &"a session").unwrap();
        check_host_memory(u128::MAX, None, &"anything").unwrap();
    }

    #[test]
    fn this_machine_reports_its_memory_on_linux() {
        if cfg!(target_os = "linux") {
            let available = available_host_memory().expect("/proc/meminfo has MemAvailable");
            assert!(available > 1 << 20, "{available}");
        }
    }
}

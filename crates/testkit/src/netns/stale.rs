//! Names of harness namespaces, and removal of those left behind by dead processes
//! (a test run killed with SIGKILL never runs its destructors).

use std::process::Command;
use std::sync::Once;

use super::enter::NETNS_RUN_DIR;
use super::exec::{ip, ip_binary};

/// Names of all named network namespaces (entries of [`NETNS_RUN_DIR`]), sorted.
pub fn list_netns() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_RUN_DIR)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Pid of the process that created a harness namespace named `kpt<pid>x<n>-...`, or
/// `None` for any other name (so the testbed scripts' `kpt-*` are never touched).
pub(crate) fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix("kpt")?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, suffix) = rest.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) || suffix.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Removes harness namespaces whose creating process no longer exists, killing the
/// processes still running inside them first. Returns the names removed.
pub fn remove_stale_namespaces() -> Vec<String> {
    let mut removed = Vec::new();
    for ns in list_netns() {
        let Some(pid) = owner_pid(&ns) else { continue };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_processes_in(&ns);
        if ip(&["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    if !removed.is_empty() {
        tracing::info!(?removed, "removed stale test namespaces");
    }
    removed
}

/// Runs [`remove_stale_namespaces`] once per process.
pub(crate) fn remove_stale_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        remove_stale_namespaces();
    });
}

/// SIGKILLs processes whose network namespace is `ns` (only test servers and clients
/// run in harness namespaces), never this process itself.
pub(crate) fn kill_processes_in(ns: &str) {
    let Ok(output) = Command::new(ip_binary())
        .args(["netns", "pids", ns])
        .output()
    else {
        return;
    };
    let own = std::process::id();
    for pid in String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).is_ok_and(|pid| pid != own))
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_parses_only_harness_names() {
        assert_eq!(owner_pid("kpt123x4-node1"), Some(123));
        assert_eq!(owner_pid("kpt9x0-pod17"), Some(9));
        assert_eq!(owner_pid("kpt-node"), None);
        assert_eq!(owner_pid("kpt123x4"), None);
        assert_eq!(owner_pid("kpt12ax4-node1"), None);
        assert_eq!(owner_pid("kptx4-node1"), None);
        assert_eq!(owner_pid("other123x4-node1"), None);
    }
}

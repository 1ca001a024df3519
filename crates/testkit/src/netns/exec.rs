//! Running programs inside a namespace: one-shot commands (`ip netns exec`) and
//! long-running children that are killed and reaped when their guard goes away.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{
    Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio,
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::NetnsError;
use super::enter::{open_netns, validate_ns_name};

/// Full path of iproute2's `ip`, so tests work even when `/usr/sbin` is not on `PATH`.
pub(crate) fn ip_binary() -> &'static str {
    static IP: OnceLock<&'static str> = OnceLock::new();
    IP.get_or_init(|| {
        ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .find(|candidate| std::path::Path::new(candidate).exists())
            .unwrap_or("ip")
    })
}

/// Runs `ip <args>` and fails with its stderr when it exits non-zero.
pub(crate) fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let output = Command::new(ip_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            program: ip_binary().to_string(),
            source,
        })?;
    check_output(&format!("ip {}", args.join(" ")), &output)
}

/// Runs many `ip` commands in one process (`ip [-n ns] -batch -`), which is much faster
/// than one process per command. Stops at the first failing line.
pub(crate) fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<(), NetnsError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut command = Command::new(ip_binary());
    if let Some(ns) = ns {
        validate_ns_name(ns)?;
        command.args(["-n", ns]);
    }
    command
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| NetnsError::Spawn {
        program: ip_binary().to_string(),
        source,
    })?;
    let script = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means `ip` exited early; its status and stderr explain why.
        let _ = stdin.write_all(script.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| NetnsError::Io {
        what: "wait for ip -batch".to_string(),
        source,
    })?;
    let what = format!("ip -n {} -batch:\n{script}", ns.unwrap_or("<root>"));
    check_output(&what, &output)
}

fn check_output(what: &str, output: &Output) -> Result<(), NetnsError> {
    if output.status.success() {
        return Ok(());
    }
    Err(NetnsError::CommandFailed {
        command: what.to_string(),
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Runs `argv` inside namespace `ns` via `ip netns exec` and returns its output,
/// whatever its exit status (check `output.status`).
pub fn netns_exec(ns: &str, argv: &[&str]) -> Result<Output, NetnsError> {
    validate_ns_name(ns)?;
    if argv.is_empty() {
        return Err(NetnsError::EmptyCommand);
    }
    Command::new(ip_binary())
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            program: argv[0].to_string(),
            source,
        })
}

/// Like [`netns_exec`] but fails (with stderr) when the command exits non-zero, and
/// returns its stdout as text.
pub fn netns_exec_ok(ns: &str, argv: &[&str]) -> Result<String, NetnsError> {
    let output = netns_exec(ns, argv)?;
    check_output(&format!("ip netns exec {ns} {}", argv.join(" ")), &output)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Starts `cmd` inside namespace `ns` and returns a guard that kills and reaps it.
///
/// Like `ip netns exec`, the child also gets a private mount namespace with `/sys`
/// remounted, so tools reading `/sys/class/net` see the namespace's interfaces. The
/// child is put in its own process group so that killing it also kills anything it
/// started.
pub fn spawn_in_netns(ns: &str, mut cmd: Command) -> Result<ChildGuard, NetnsError> {
    let netns_file = open_netns(ns)?;
    let netns_fd = netns_file.as_raw_fd();
    let program = cmd.get_program().to_string_lossy().into_owned();
    // SAFETY: the closure runs in the forked child before exec and only makes raw
    // syscalls (no allocation, no locks), which is async-signal-safe. `netns_fd` stays
    // open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::unshare(libc::CLONE_NEWNS) == 0 {
                // Best effort: without it /sys just shows the root namespace's devices.
                libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_SLAVE | libc::MS_REC,
                    std::ptr::null(),
                );
                if libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) == 0 {
                    libc::mount(
                        c"sysfs".as_ptr(),
                        c"/sys".as_ptr(),
                        c"sysfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    );
                }
            }
            Ok(())
        });
    }
    cmd.process_group(0);
    let child = cmd
        .spawn()
        .map_err(|source| NetnsError::Spawn { program, source })?;
    drop(netns_file);
    Ok(ChildGuard {
        slot: Arc::new(ChildSlot {
            ns: ns.to_string(),
            child: Mutex::new(Some(child)),
        }),
    })
}

/// Shared between a [`ChildGuard`] and the topology's registry, so whichever is dropped
/// first kills the process.
pub(crate) struct ChildSlot {
    pub(crate) ns: String,
    child: Mutex<Option<Child>>,
}

impl ChildSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
    ///
    /// The group is only signalled while the leader is unreaped, so its pid (and with it
    /// the group id) cannot have been reused by an unrelated process.
    fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        let mut status = None;
        if !grace.is_zero() {
            signal_group(child, Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(exited)) = child.try_wait() {
                    status = Some(exited);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if status.is_none() {
            if let Ok(Some(exited)) = child.try_wait() {
                status = Some(exited);
            } else {
                signal_group(child, Signal::SIGKILL);
                status = child.wait().ok();
            }
        }
        guard.take();
        status
    }
}

/// Signals the child's whole process group (it leads its own group, see
/// [`spawn_in_netns`]).
fn signal_group(child: &Child, signal: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // ESRCH just means everything in the group is gone already.
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// A process running inside a namespace; killed (SIGKILL to its process group) and
/// reaped when dropped, or when the owning [`super::Topology`] is dropped.
pub struct ChildGuard {
    slot: Arc<ChildSlot>,
}

impl ChildGuard {
    pub(crate) fn registry_entry(&self) -> Weak<ChildSlot> {
        Arc::downgrade(&self.slot)
    }

    /// The namespace the process runs in.
    pub fn ns(&self) -> &str {
        &self.slot.ns
    }

    /// Process id, or `None` once the process has been stopped and reaped.
    pub fn id(&self) -> Option<u32> {
        self.slot.lock().as_ref().map(Child::id)
    }

    /// Exit status if the process has exited (reaps it), `None` while it runs.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, NetnsError> {
        match self.slot.lock().as_mut() {
            Some(child) => child.try_wait().map_err(|source| NetnsError::Io {
                what: "wait for child".to_string(),
                source,
            }),
            None => Ok(None),
        }
    }

    /// Takes the child's stdout pipe (when the command was set up with
    /// `Stdio::piped()`).
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.slot
            .lock()
            .as_mut()
            .and_then(|child| child.stdout.take())
    }

    /// Takes the child's stderr pipe.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.slot
            .lock()
            .as_mut()
            .and_then(|child| child.stderr.take())
    }

    /// Takes the child's stdin pipe.
    pub fn take_stdin(&self) -> Option<ChildStdin> {
        self.slot
            .lock()
            .as_mut()
            .and_then(|child| child.stdin.take())
    }

    /// Graceful stop: SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit
    /// status, or `None` if the process was already stopped.
    pub fn terminate(&self, grace: Duration) -> Option<ExitStatus> {
        self.slot.stop(grace)
    }

    /// SIGKILL and reap now.
    pub fn kill(&self) -> Option<ExitStatus> {
        self.slot.stop(Duration::ZERO)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.slot.stop(Duration::ZERO);
    }
}

/// Children started through a topology, so dropping the topology stops them even if
/// their guards were leaked.
#[derive(Default)]
pub(crate) struct ChildRegistry {
    entries: Mutex<Vec<Weak<ChildSlot>>>,
}

impl ChildRegistry {
    pub(crate) fn register(&self, guard: &ChildGuard) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|entry| entry.strong_count() > 0);
        entries.push(guard.registry_entry());
    }

    /// Stops the live children, only those in `ns` when given.
    pub(crate) fn stop_all(&self, ns: Option<&str>) {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for slot in entries.iter().filter_map(Weak::upgrade) {
            if ns.is_none_or(|ns| slot.ns == ns) {
                slot.stop(Duration::ZERO);
            }
        }
    }
}

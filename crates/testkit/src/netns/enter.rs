//! Entering a network namespace from a dedicated thread.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, and a socket
//! keeps the namespace it was created in for its whole life. So we create sockets on a
//! short-lived thread that has entered the namespace, and hand them back to any thread.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};

use super::NetnsError;

/// Directory where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Path of a named namespace, refusing names that could escape [`NETNS_RUN_DIR`].
pub fn netns_path(ns: &str) -> Result<PathBuf, NetnsError> {
    validate_ns_name(ns)?;
    Ok(PathBuf::from(NETNS_RUN_DIR).join(ns))
}

/// Names must be single path components; `ip` has the same rule.
pub(crate) fn validate_ns_name(ns: &str) -> Result<(), NetnsError> {
    if ns.is_empty() || ns == "." || ns == ".." || ns.contains('/') || ns.contains('\0') {
        return Err(NetnsError::InvalidName(ns.to_string()));
    }
    Ok(())
}

/// Opens the namespace file (the handle `setns` needs).
pub(crate) fn open_netns(ns: &str) -> Result<File, NetnsError> {
    let path = netns_path(ns)?;
    File::open(&path).map_err(|source| NetnsError::Open {
        ns: ns.to_string(),
        source,
    })
}

/// Runs `f` on a fresh thread that has entered network namespace `ns`, and returns its
/// result. The calling thread's namespace is untouched.
///
/// A panic inside `f` is re-raised on the caller, so assertions inside `f` behave as
/// if they ran inline.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let file = open_netns(ns)?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Setns {
                    ns: ns.to_string(),
                    source: errno.into(),
                })?;
                drop(file);
                Ok(f())
            })
            .map_err(NetnsError::Thread)?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Binds a TCP listener whose socket lives in namespace `ns`.
pub fn bind_tcp_in(ns: &str, addr: SocketAddr) -> Result<TcpListener, NetnsError> {
    in_netns(ns, || TcpListener::bind(addr))?.map_err(|source| NetnsError::Io {
        what: format!("bind tcp {addr} in {ns}"),
        source,
    })
}

/// Binds a UDP socket that lives in namespace `ns`.
pub fn bind_udp_in(ns: &str, addr: SocketAddr) -> Result<UdpSocket, NetnsError> {
    in_netns(ns, || UdpSocket::bind(addr))?.map_err(|source| NetnsError::Io {
        what: format!("bind udp {addr} in {ns}"),
        source,
    })
}

/// Sets sysctls (dotted names, as `sysctl -w` takes them) inside namespace `ns`.
///
/// `/proc/sys/net` resolves against the namespace of the calling *thread*, so writing
/// from a thread inside `ns` is equivalent to `ip netns exec ns sysctl -w`, without
/// starting a process per value.
pub fn set_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<(), NetnsError> {
    in_netns(ns, || {
        for (key, value) in settings {
            let path = sysctl_path(key)?;
            std::fs::write(&path, value).map_err(|source| NetnsError::Io {
                what: format!("sysctl {key}={value} in {ns}"),
                source,
            })?;
        }
        Ok(())
    })?
}

/// Reads one sysctl inside namespace `ns` (trimmed).
pub fn get_sysctl(ns: &str, key: &str) -> Result<String, NetnsError> {
    in_netns(ns, || {
        let path = sysctl_path(key)?;
        std::fs::read_to_string(&path)
            .map(|value| value.trim().to_string())
            .map_err(|source| NetnsError::Io {
                what: format!("read sysctl {key} in {ns}"),
                source,
            })
    })?
}

fn sysctl_path(key: &str) -> Result<PathBuf, NetnsError> {
    let valid = !key.is_empty()
        && key
            .split('.')
            .all(|part| !part.is_empty() && part != ".." && !part.contains('/'));
    if !valid {
        return Err(NetnsError::InvalidSysctl(key.to_string()));
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

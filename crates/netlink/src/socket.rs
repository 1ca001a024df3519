//! A `NETLINK_NETFILTER` socket (libc), opened in the calling thread's network namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const SOL_NETLINK: libc::c_int = 270;
/// Acks and errors do not echo the request payload (smaller replies).
const NETLINK_CAP_ACK: libc::c_int = 10;
/// Errors carry the kernel's message, when it has one.
const NETLINK_EXT_ACK: libc::c_int = 11;

/// A netfilter netlink socket bound to the kernel.
#[derive(Debug)]
pub struct NetfilterSocket {
    fd: OwnedFd,
    sndbuf: usize,
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn setopt(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> libc::c_int {
    // SAFETY: `v` lives for the call and its size is passed.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    }
}

/// The kernel's address (pid 0).
fn kernel() -> libc::sockaddr_nl {
    // SAFETY: an all-zero sockaddr_nl is valid.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa
}

impl NetfilterSocket {
    /// Opens and binds the socket, asking for a `rcvbuf`-byte receive buffer (forced
    /// past `rmem_max` when the process may; replies to a whole batch queue at once).
    pub fn open(rcvbuf: libc::c_int) -> io::Result<NetfilterSocket> {
        // SAFETY: plain syscall; the result is checked before it is wrapped.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        check(raw, "socket(AF_NETLINK, NETLINK_NETFILTER)")?;
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sa = kernel();
        // SAFETY: `sa` is a valid sockaddr_nl of the given size; pid 0 lets the kernel
        // pick our port id.
        let r = unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        check(r, "bind(netlink)")?;
        setopt(raw, SOL_NETLINK, NETLINK_CAP_ACK, 1);
        setopt(raw, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        if setopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf) < 0 {
            setopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf);
        }
        Ok(NetfilterSocket { fd, sndbuf: 0 })
    }

    /// Sends one datagram (a whole batch: the kernel processes it before returning).
    pub fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // netlink_sendmsg refuses datagrams larger than the send buffer.
        if buf.len() + 4096 > self.sndbuf {
            let want = (buf.len() + 65536).min(i32::MAX as usize) as libc::c_int;
            if setopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want) < 0 {
                check(
                    setopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, want),
                    "setsockopt(SO_SNDBUF)",
                )?;
            }
            self.sndbuf = want as usize;
        }
        let sa = kernel();
        loop {
            // SAFETY: `buf` and `sa` are valid for the given lengths.
            let n = unsafe {
                libc::sendto(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::new(e.kind(), format!("sendto(netlink): {e}")));
            }
            if n as usize != buf.len() {
                return Err(io::Error::other("short netlink send"));
            }
            return Ok(());
        }
    }

    /// Receives one datagram into `buf`, waiting at most `wait` (`Duration::ZERO`: only
    /// what is queued). `Ok(None)`: nothing arrived. A datagram larger than `buf` is an
    /// `InvalidData` error, never silently cut. Other errors keep their errno (ENOBUFS:
    /// replies were dropped because the receive buffer overflowed).
    pub fn recv(&self, buf: &mut [u8], wait: Duration) -> io::Result<Option<usize>> {
        let fd = self.fd.as_raw_fd();
        let timeout_ms = wait.as_millis().min(i32::MAX as u128) as i32;
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if timeout_ms == 0 => return Ok(None),
                    io::ErrorKind::WouldBlock => continue,
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "netlink datagram of {n} bytes larger than the {}-byte buffer",
                        buf.len()
                    ),
                ));
            }
            return Ok(Some(n));
        }
    }
}

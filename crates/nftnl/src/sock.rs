//! A NETLINK_NETFILTER socket (libc), opened in the calling thread's network namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// Receive buffer asked for: error and ACK replies of a whole batch are queued at once.
const RCVBUF: libc::c_int = 8 << 20;

pub(crate) struct NlSocket {
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

impl NlSocket {
    pub fn open() -> io::Result<NlSocket> {
        // SAFETY: plain syscall; the result is checked before it is wrapped.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        check(raw, "socket(AF_NETLINK, NETLINK_NETFILTER)")?;
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is valid; pid 0 lets the kernel pick the port id.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `sa` is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        check(r, "bind(netlink)")?;
        // Errors carry only the offending header, plus the kernel's message if any.
        setopt(raw, SOL_NETLINK, NETLINK_CAP_ACK, 1);
        setopt(raw, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        if setopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF) < 0 {
            setopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF);
        }
        Ok(NlSocket { fd, sndbuf: 0 })
    }

    /// Sends one datagram (a whole batch: the kernel processes it before returning).
    pub fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // netlink_sendmsg refuses datagrams larger than the send buffer.
        if buf.len() + 4096 > self.sndbuf {
            let want = (buf.len() + 65536).min(i32::MAX as usize) as libc::c_int;
            check(
                setopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want),
                "setsockopt(SO_SNDBUFFORCE)",
            )?;
            self.sndbuf = want as usize;
        }
        // SAFETY: zeroed sockaddr_nl with pid 0 addresses the kernel.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
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

    /// Receives one datagram; `Ok(None)` when nothing arrives within `timeout_ms`.
    pub fn recv(&self, buf: &mut [u8], timeout_ms: i32) -> io::Result<Option<usize>> {
        let fd = self.fd.as_raw_fd();
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
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                    _ => return Err(e),
                }
            }
            return Ok(Some(n as usize));
        }
    }
}

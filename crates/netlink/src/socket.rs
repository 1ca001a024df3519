//! Netlink sockets (libc), opened in the calling thread's network namespace: any protocol
//! ([`NetlinkSocket`]), with [`NetfilterSocket`] for `NETLINK_NETFILTER`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const SOL_NETLINK: libc::c_int = 270;
/// Acks and errors do not echo the request payload (smaller replies).
const NETLINK_CAP_ACK: libc::c_int = 10;
/// Errors carry the kernel's message, when it has one.
const NETLINK_EXT_ACK: libc::c_int = 11;

/// A netlink socket of one protocol (`NETLINK_NETFILTER`, `NETLINK_GENERIC`, ...) bound
/// to the kernel.
#[derive(Debug)]
pub struct NetlinkSocket {
    fd: OwnedFd,
    sndbuf: usize,
}

/// A `NETLINK_NETFILTER` socket (nf_tables, ctnetlink).
#[derive(Debug)]
pub struct NetfilterSocket(NetlinkSocket);

impl NetfilterSocket {
    /// Opens a `NETLINK_NETFILTER` socket; see [`NetlinkSocket::open`].
    pub fn open(rcvbuf: libc::c_int) -> io::Result<NetfilterSocket> {
        NetlinkSocket::open(libc::NETLINK_NETFILTER, rcvbuf).map(NetfilterSocket)
    }

    /// See [`NetlinkSocket::send`].
    pub fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.send(buf)
    }

    /// See [`NetlinkSocket::recv`].
    pub fn recv(&self, buf: &mut [u8], wait: Duration) -> io::Result<Option<usize>> {
        self.0.recv(buf, wait)
    }
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

impl NetlinkSocket {
    /// Opens and binds a socket of netlink `protocol`, asking for a `rcvbuf`-byte receive
    /// buffer (forced past `rmem_max` when the process may; replies to a whole batch
    /// queue at once). Acks do not echo the request (`NETLINK_CAP_ACK`) and errors carry
    /// the kernel's message when it has one (`NETLINK_EXT_ACK`).
    pub fn open(protocol: libc::c_int, rcvbuf: libc::c_int) -> io::Result<NetlinkSocket> {
        // SAFETY: plain syscall; the result is checked before it is wrapped.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        check(raw, &format!("socket(AF_NETLINK, protocol {protocol})"))?;
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
        Ok(NetlinkSocket { fd, sndbuf: 0 })
    }

    /// Opens a `NETLINK_GENERIC` socket (generic netlink families: IPVS, ...).
    pub fn generic(rcvbuf: libc::c_int) -> io::Result<NetlinkSocket> {
        NetlinkSocket::open(libc::NETLINK_GENERIC, rcvbuf)
    }

    /// The receive buffer the kernel granted, in bytes (`SO_RCVBUF`: twice what was
    /// asked, for its bookkeeping overhead).
    pub fn rcvbuf(&self) -> io::Result<usize> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` live for the call; `len` holds the size of `v`.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        check(r, "getsockopt(SO_RCVBUF)")?;
        Ok(v.max(0) as usize)
    }

    /// Discards every datagram already queued (replies of an earlier, interrupted
    /// exchange must not be taken for the next one's). Errors such as a pending ENOBUFS
    /// are consumed too.
    pub fn drain(&self, buf: &mut [u8]) {
        loop {
            match self.recv(buf, Duration::ZERO) {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => return,
            }
        }
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

//! Replacing the binary, or restarting, without refusing a connection: listening sockets that are already bound
//! and listening, taken over instead of bound.
//!
//! They come from one of two places:
//! - **The process being replaced** (binary upgrade). On `SIGUSR2` a running tern starts its successor: the binary
//!   at the path it was itself started from (so a package manager may have replaced the file), with the same
//!   arguments, one end of a Unix datagram socket pair as its standard input and [`HANDOVER_ENV`] set. It sends
//!   every listening socket with its listener's name over that pair (`SCM_RIGHTS`, [`send_sockets`]). The
//!   successor uses them instead of binding, loads everything else, and answers `ready` ([`Successor::ready`]);
//!   only then does the old process stop accepting and drain its connections (`server.shutdown_grace`). In between
//!   both processes accept from the same kernel queues, so no connection is refused and none waits in a queue
//!   nobody reads. A successor that exits or is not ready within `server.upgrade_timeout` is killed, and the old
//!   process goes on serving as if nothing happened.
//! - **systemd** (socket activation): `LISTEN_FDS` and `LISTEN_FDNAMES`, when `LISTEN_PID` is this process.
//!
//! A socket is matched to a listener by its bound address (addresses are unique among listeners); a listener
//! bound to port 0 takes the socket of its name on the same IP. A listener whose address changed in the config
//! binds anew, and a socket no listener took is closed (logged).
//!
//! Readiness and the main process are also told to systemd's notification socket ([`notify_systemd`]), so under
//! `Type=notify` with `NotifyAccess=all` systemd follows the successor as the service's main process.

use std::ffi::OsString;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use tokio::io::Interest;

/// Set in a successor's environment (to the old process's id): its standard input is the hand-over socket.
pub const HANDOVER_ENV: &str = "TERN_HANDOVER";

/// At most this many sockets fit in one hand-over message (the kernel's `SCM_MAX_FD`).
const MAX_SOCKETS: usize = 253;

/// The old process sends the sockets as soon as the successor runs; waiting longer means it is gone.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest hand-over message (the names of the sockets, as JSON).
const MAX_MESSAGE: usize = 64 * 1024;

/// What the successor answers once it serves.
const READY: &[u8] = b"ready";

/// Listening sockets taken over from an earlier process or from systemd, until listeners claim them.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Mutex<Vec<(String, std::net::TcpListener)>>,
}

/// Why the sockets could not be handed over or taken.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The message did not have the expected shape.
    #[error("hand-over message: {0}")]
    Message(String),
    /// The successor exited before it was ready.
    #[error("the new process exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    /// The successor said it could not start.
    #[error("the new process could not start: {0}")]
    Failed(String),
    /// The successor was not ready in time.
    #[error("the new process was not ready within {0:?} (server.upgrade_timeout); it was stopped")]
    Timeout(Duration),
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
    move |source| HandoverError::Io { what, source }
}

impl Inherited {
    /// No sockets: every listener binds its own.
    pub fn none() -> Self {
        Self::default()
    }

    /// The sockets systemd passed (socket activation), if `LISTEN_PID` names this process; none otherwise.
    pub fn from_systemd() -> Self {
        let Some(count) = systemd_count() else {
            return Self::none();
        };
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|names| names.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut sockets = Vec::with_capacity(count);
        for (index, fd) in (SD_LISTEN_FDS_START..).take(count).enumerate() {
            let name = names.get(index).cloned().unwrap_or_else(|| format!("fd{fd}"));
            let Some(owned) = take_systemd_fd(fd) else { continue };
            match listening(owned) {
                Ok(socket) => sockets.push((name, socket)),
                Err(err) => {
                    tracing::warn!(fd, %name, error = %err, "systemd passed a socket tern cannot listen on; closed")
                }
            }
        }
        tracing::info!(sockets = sockets.len(), "listening sockets from systemd");
        Self { sockets: Mutex::new(sockets) }
    }

    /// The socket for a listener named `name` bound to `addr`, if one was inherited (see the module's matching
    /// rules), ready for tokio.
    pub(crate) fn take(&self, name: &str, addr: SocketAddr) -> Option<io::Result<tokio::net::TcpListener>> {
        let mut sockets = self.sockets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let matches = |(socket_name, socket): &(String, std::net::TcpListener)| {
            let Ok(bound) = socket.local_addr() else { return false };
            if addr.port() == 0 { socket_name == name && bound.ip() == addr.ip() } else { bound == addr }
        };
        let index = sockets.iter().position(matches)?;
        let (_, socket) = sockets.swap_remove(index);
        Some(socket.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(socket)))
    }

    /// Closes the sockets no listener took, naming them in the log (the config no longer has their listener).
    pub(crate) fn close_unclaimed(&self) {
        let mut sockets = self.sockets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, socket) in sockets.drain(..) {
            let addr = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(%name, %addr, "an inherited listening socket matches no listener of the config; closed");
        }
    }
}

/// File descriptors systemd passes start here (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: i32 = 3;

/// How many sockets systemd passed to this very process.
fn systemd_count() -> Option<usize> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let count: usize = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    Some(count.min(MAX_SOCKETS))
}

/// Takes ownership of a descriptor systemd passed, once per process.
#[allow(unsafe_code)]
fn take_systemd_fd(fd: i32) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    // A bit per descriptor number already taken (systemd_count caps the count, so fd < 3 + 253 < 3 + 64 * 4).
    static TAKEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
    let bit = usize::try_from(fd - SD_LISTEN_FDS_START).ok()?;
    let word = TAKEN.get(bit / 64)?;
    if word.fetch_or(1 << (bit % 64), Ordering::SeqCst) & (1 << (bit % 64)) != 0 {
        return None;
    }
    // Is the number open at all? fcntl on a closed descriptor fails; it touches nothing else.
    // SAFETY: `borrow_raw` needs `fd` open for the borrow's lifetime; if it is not, fcntl_getfd reports EBADF and
    // the borrow ends there without use.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).ok()?;
    // SAFETY: by the socket-activation protocol (LISTEN_PID is this process), descriptors 3..3+LISTEN_FDS are open
    // and belong to this process; nothing else in tern refers to them, and TAKEN makes this the only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not inherited by anything tern starts (its successor gets its own copies).
    let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
    Some(owned)
}

/// A descriptor as a TCP listener, if it is a listening stream socket.
fn listening(fd: OwnedFd) -> io::Result<std::net::TcpListener> {
    if !rustix::net::sockopt::socket_acceptconn(&fd)? {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a listening socket"));
    }
    let socket = std::net::TcpListener::from(fd);
    socket.local_addr()?; // a TCP socket (a Unix one has no IP address)
    Ok(socket)
}

/// This process as the successor of an upgrade: the socket to its predecessor.
#[derive(Debug)]
pub struct Successor {
    socket: tokio::net::UnixDatagram,
}

impl Successor {
    /// If this process was started by an upgrade ([`HANDOVER_ENV`] set), its link to the old process (its
    /// standard input). Must run inside the tokio runtime.
    pub fn from_env() -> Result<Option<Self>, HandoverError> {
        if std::env::var_os(HANDOVER_ENV).is_none() {
            return Ok(None);
        }
        let stdin = io::stdin().as_fd().try_clone_to_owned().map_err(io_error("standard input"))?;
        let socket = std::os::unix::net::UnixDatagram::from(stdin);
        socket.set_nonblocking(true).map_err(io_error("the hand-over socket (standard input)"))?;
        let socket = tokio::net::UnixDatagram::from_std(socket).map_err(io_error("the hand-over socket"))?;
        Ok(Some(Self { socket }))
    }

    /// The listening sockets the old process sends.
    pub async fn receive(&self) -> Result<Inherited, HandoverError> {
        let mut data = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let socket = &self.socket;
        let received = socket.async_io(Interest::READABLE, || {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [io::IoSliceMut::new(&mut data)];
            let message = rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
            let fds: Vec<OwnedFd> = control
                .drain()
                .filter_map(|m| match m {
                    RecvAncillaryMessage::ScmRights(fds) => Some(fds),
                    _ => None,
                })
                .flatten()
                .collect();
            Ok((message.bytes, message.flags, fds))
        });
        let (bytes, flags, fds) = tokio::time::timeout(RECEIVE_TIMEOUT, received)
            .await
            .map_err(|_| HandoverError::Message(format!("nothing received within {RECEIVE_TIMEOUT:?}")))?
            .map_err(io_error("receiving the listening sockets"))?;
        if flags.contains(rustix::net::ReturnFlags::CTRUNC) || flags.contains(rustix::net::ReturnFlags::TRUNC) {
            return Err(HandoverError::Message("truncated".into()));
        }
        let names: Vec<String> = serde_json::from_slice(&data[..bytes.min(data.len())])
            .map_err(|e| HandoverError::Message(format!("names: {e}")))?;
        if names.len() != fds.len() {
            return Err(HandoverError::Message(format!("{} names for {} sockets", names.len(), fds.len())));
        }
        let mut sockets = Vec::with_capacity(fds.len());
        for (name, fd) in names.into_iter().zip(fds) {
            match listening(fd) {
                Ok(socket) => sockets.push((name, socket)),
                Err(err) => return Err(HandoverError::Message(format!("socket {name:?}: {err}"))),
            }
        }
        tracing::info!(sockets = sockets.len(), "listening sockets taken over from the old process");
        Ok(Inherited { sockets: Mutex::new(sockets) })
    }

    /// Tells the old process that this one serves: it stops accepting and drains.
    pub async fn ready(self) -> Result<(), HandoverError> {
        self.socket.send(READY).await.map_err(io_error("telling the old process"))?;
        Ok(())
    }

    /// Tells the old process why this one cannot start (it goes on serving).
    pub async fn failed(self, why: &str) {
        let mut text = format!("failed: {why}").into_bytes();
        text.truncate(MAX_MESSAGE);
        let _ = self.socket.send(&text).await;
    }
}

/// Starts `exe` with `args` as this process's successor, hands it `sockets`, and waits until it is ready (then
/// returns its process id) or until `timeout` (then kills it).
pub async fn start_successor(
    exe: &Path,
    args: &[OsString],
    sockets: &[(String, OwnedFd)],
    timeout: Duration,
) -> Result<u32, HandoverError> {
    if sockets.len() > MAX_SOCKETS {
        return Err(HandoverError::Message(format!("{} listening sockets; at most {MAX_SOCKETS}", sockets.len())));
    }
    let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().map_err(io_error("socket pair"))?;
    ours.set_nonblocking(true).map_err(io_error("socket pair"))?;
    let ours = tokio::net::UnixDatagram::from_std(ours).map_err(io_error("socket pair"))?;
    let mut child = tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
        .env(HANDOVER_ENV, std::process::id().to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .spawn()
        .map_err(io_error("starting the new binary"))?;
    let pid = child.id().unwrap_or_default();
    let handed = async {
        send_sockets(&ours, sockets).await?;
        let mut answer = vec![0u8; MAX_MESSAGE];
        let n = ours.recv(&mut answer).await.map_err(io_error("waiting for the new process"))?;
        match &answer[..n] {
            READY => Ok(()),
            other => {
                Err(HandoverError::Failed(String::from_utf8_lossy(other).trim_start_matches("failed: ").to_string()))
            }
        }
    };
    let outcome = tokio::select! {
        handed = tokio::time::timeout(timeout, handed) => handed.unwrap_or(Err(HandoverError::Timeout(timeout))),
        status = child.wait() => match status {
            Ok(status) => Err(HandoverError::Exited(status)),
            Err(err) => Err(HandoverError::Io { what: "waiting for the new process", source: err }),
        },
    };
    match outcome {
        Ok(()) => Ok(pid),
        Err(err) => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            Err(err)
        }
    }
}

/// Sends the sockets and their names in one message.
async fn send_sockets(socket: &tokio::net::UnixDatagram, sockets: &[(String, OwnedFd)]) -> Result<(), HandoverError> {
    let names: Vec<&str> = sockets.iter().map(|(name, _)| name.as_str()).collect();
    let data = serde_json::to_vec(&names).map_err(|e| HandoverError::Message(e.to_string()))?;
    if data.len() > MAX_MESSAGE {
        return Err(HandoverError::Message(format!("listener names take {} bytes; at most {MAX_MESSAGE}", data.len())));
    }
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    socket
        .async_io(Interest::WRITABLE, || {
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("control buffer too small"));
            }
            Ok(rustix::net::sendmsg(socket, &[io::IoSlice::new(&data)], &mut control, rustix::net::SendFlags::empty())?)
        })
        .await
        .map_err(io_error("sending the listening sockets"))?;
    Ok(())
}

/// Sends `state` (e.g. `READY=1`) to systemd's notification socket, if this process runs under one
/// (`NOTIFY_SOCKET`); does nothing otherwise. Failures are logged, never fatal.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        match bytes.strip_prefix(b"@") {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    })();
    if let Err(err) = sent {
        tracing::warn!(error = %err, "cannot notify systemd");
    }
}

//! QMP addresses and sockets: a Unix socket path or `tcp:HOST:PORT`, as QEMU's `-qmp`
//! takes them (`unix:PATH` and QEMU's `,server=on,wait=off` options are accepted too).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a QMP server listens or a client connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Address {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP host (name or address; empty means all interfaces for a server, localhost
    /// for a client) and port.
    Tcp(String, u16),
}

impl Address {
    /// Parses `PATH`, `unix:PATH` or `tcp:HOST:PORT` (IPv6 hosts in brackets), each
    /// optionally followed by QEMU's `,server`, `,server=on`, `,nowait`, `,wait=off`
    /// (which change nothing: the server never waits for a client).
    pub(crate) fn parse(s: &str) -> Result<Address, String> {
        let (scheme, rest) = if let Some(rest) = s.strip_prefix("tcp:") {
            ("tcp", rest)
        } else if let Some(rest) = s.strip_prefix("unix:") {
            ("unix", rest)
        } else {
            if s.is_empty() {
                return Err("empty address".into());
            }
            return Ok(Address::Unix(PathBuf::from(s)));
        };
        let mut parts = rest.split(',');
        let target = parts.next().unwrap_or("");
        for opt in parts {
            if !matches!(opt, "server" | "server=on" | "nowait" | "wait=off") {
                return Err(format!("unsupported option '{opt}'"));
            }
        }
        if scheme == "unix" {
            if target.is_empty() {
                return Err("empty socket path".into());
            }
            return Ok(Address::Unix(PathBuf::from(target)));
        }
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| format!("expected tcp:HOST:PORT, got 'tcp:{target}'"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("invalid TCP port '{port}'"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Ok(Address::Tcp(host.to_string(), port))
    }

    /// Connects to the address, waiting at most `timeout` for a TCP connection.
    pub(crate) fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        match self {
            Address::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Address::Tcp(host, port) => {
                let host = if host.is_empty() { "localhost" } else { host };
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
                for addr in (host, *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
}

/// A connected QMP socket.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Unix socket.
    Unix(UnixStream),
    /// TCP connection.
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle to the same socket.
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shuts down both directions: blocked reads and writes on every handle return.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sets the read timeout (`None`: block).
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    /// Sets the write timeout (`None`: block).
    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tcp(s) => s.set_write_timeout(timeout),
        }
    }

    fn set_blocking(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(false),
            Stream::Tcp(s) => s.set_nonblocking(false),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket (non-blocking: the accept loop polls it).
#[derive(Debug)]
pub(crate) enum Listener {
    /// Unix socket, with the identity of its file (to remove only our own on stop).
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path.
        path: PathBuf,
        /// Device and inode of the socket file.
        id: (u64, u64),
    },
    /// TCP socket.
    Tcp(TcpListener),
}

/// Why a listening socket could not be set up (turned into `QmpServerError`).
#[derive(Debug)]
pub(crate) enum ListenError {
    /// A file that is not a socket is in the way.
    NotASocket,
    /// Another process is listening on the socket.
    InUse,
    /// An I/O error.
    Io(io::Error),
}

impl From<io::Error> for ListenError {
    fn from(e: io::Error) -> Self {
        ListenError::Io(e)
    }
}

impl Listener {
    /// Listens on `address`.
    pub(crate) fn bind(address: &Address) -> Result<Listener, ListenError> {
        let listener = match address {
            Address::Unix(path) => bind_unix(path)?,
            Address::Tcp(host, port) => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                Listener::Tcp(TcpListener::bind((host, *port))?)
            }
        };
        match &listener {
            Listener::Unix { listener, .. } => listener.set_nonblocking(true)?,
            Listener::Tcp(l) => l.set_nonblocking(true)?,
        }
        Ok(listener)
    }

    /// The address clients connect to (`tcp:IP:PORT` with the bound port, or the path).
    pub(crate) fn local_address(&self) -> String {
        match self {
            Listener::Unix { path, .. } => path.display().to_string(),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(std::net::SocketAddr::V4(a)) => format!("tcp:{}:{}", a.ip(), a.port()),
                Ok(std::net::SocketAddr::V6(a)) => format!("tcp:[{}]:{}", a.ip(), a.port()),
                Err(_) => "tcp:?".into(),
            },
        }
    }

    /// Accepts a pending connection (`WouldBlock` when there is none), in blocking mode.
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Unix { listener, .. } => Stream::Unix(listener.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        stream.set_blocking()?;
        Ok(stream)
    }

    /// Removes the socket file if it is still the one this listener created.
    fn remove_file(&self) {
        if let Listener::Unix { path, id, .. } = self {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.file_type().is_socket() && (m.dev(), m.ino()) == *id {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.remove_file();
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// Creates a listening Unix socket at `path` with mode 0600 that is never reachable by
/// others, even briefly: it is bound inside a fresh private (0700) folder next to
/// `path`, made 0600, then renamed into place (which also atomically replaces a stale
/// socket). This avoids changing the process-wide umask under other threads.
fn bind_unix(path: &Path) -> Result<Listener, ListenError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse);
            }
            // Stale: replaced by the rename below.
        }
        Ok(_) => return Err(ListenError::NotASocket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut attempt = 0;
    let private = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".qmp{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    };
    let result = (|| -> Result<Listener, ListenError> {
        let temp = private.join("s");
        let listener = UnixListener::bind(&temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temp, path)?;
        let m = std::fs::symlink_metadata(path)?;
        Ok(Listener::Unix {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(private.join("s"));
    }
    let _ = std::fs::remove_dir(&private);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("vm.sock"),
            Ok(Address::Unix("vm.sock".into()))
        );
        assert_eq!(
            Address::parse("unix:/tmp/q.sock,server=on,wait=off"),
            Ok(Address::Unix("/tmp/q.sock".into()))
        );
        assert_eq!(
            Address::parse("tcp:127.0.0.1:4444"),
            Ok(Address::Tcp("127.0.0.1".into(), 4444))
        );
        assert_eq!(
            Address::parse("tcp:[::1]:0,server,nowait"),
            Ok(Address::Tcp("::1".into(), 0))
        );
        assert_eq!(
            Address::parse("tcp::4444"),
            Ok(Address::Tcp("".into(), 4444))
        );
        assert!(Address::parse("tcp:localhost").is_err());
        assert!(Address::parse("tcp:localhost:http").is_err());
        assert!(Address::parse("tcp:localhost:1,reconnect=1").is_err());
        assert!(Address::parse("").is_err());
    }
}

//! The QMP server's threads: one accepts connections; each client has a reader (parses
//! requests, runs commands, queues replies) and a writer (sends queued replies and
//! events), so that a client that stops reading stalls only itself.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zeroize::Zeroize;

use super::commands;
use super::lexer::JsonStreamer;
use super::protocol::{self, Effect, Session};
use super::transport::{Address, ListenError, Listener, Stream};
use super::writer;
use super::{EventBus, QmpBackend};
use crate::control::Action;

/// Clients served at once; further connections wait in the listen backlog.
pub const MAX_CLIENTS: usize = 128;

/// Messages queued for one client; a client whose queue of events is full is
/// disconnected.
const QUEUE_LEN: usize = 1024;

/// Bytes read from a client at a time.
const READ_CHUNK: usize = 64 << 10;

/// A client must finish `qmp_capabilities` within this long of connecting, or is
/// disconnected (so idle connections cannot hold all [`MAX_CLIENTS`] places).
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// A client that does not read its replies and events for this long (its socket
/// buffer full) is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `quit` waits for its reply to be written before stopping the VM.
const QUIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    /// The address is not a path, `unix:PATH` or `tcp:HOST:PORT`.
    #[error("invalid QMP address '{address}': {reason}")]
    InvalidAddress {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something other than a socket is at the socket path.
    #[error("QMP socket '{0}': the file exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process listens on the socket path.
    #[error("QMP socket '{0}' is in use by another process")]
    InUse(PathBuf),
    /// Creating the listening socket failed.
    #[error("listening on QMP socket '{address}': {source}")]
    Listen {
        /// The address given.
        address: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating the server's thread or wake-up descriptors failed.
    #[error("starting the QMP server: {0}")]
    Start(#[source] io::Error),
}

/// QMP over TCP is unauthenticated and `blockdev-add` opens host files: the host
/// must be named (QEMU's `tcp::PORT` means every interface), and anything but a
/// loopback address gets a warning.
fn check_tcp_host(address: &str, host: &str, port: u16) -> Result<(), QmpServerError> {
    if host.is_empty() {
        return Err(QmpServerError::InvalidAddress {
            address: address.to_string(),
            reason: format!(
                "no host: QMP is unauthenticated, so name the interface \
                 (tcp:127.0.0.1:{port}, or tcp:0.0.0.0:{port} to listen on every one)"
            ),
        });
    }
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        eprintln!(
            "cryptvm: warning: QMP on '{address}' is reachable from other machines and \
             unauthenticated; anyone who connects controls the VM and can open host files"
        );
    }
    Ok(())
}

/// A message for a client's writer thread.
pub(crate) enum Outgoing {
    /// A reply or event, terminated by `\r\n`.
    Line(Arc<str>),
    /// Acknowledge once everything queued before has been written.
    Flush(SyncSender<()>),
}

/// The connected clients, for `stop()` to disconnect them.
struct Clients {
    streams: HashMap<u64, Stream>,
    stopping: bool,
}

/// State shared by the server's threads.
struct Shared {
    backend: Arc<dyn QmpBackend>,
    events: Arc<EventBus>,
    clients: Mutex<Clients>,
    /// Signalled when a client leaves or the server stops.
    changed: Condvar,
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The listening server; dropping or stop() closes the socket and disconnects clients.
pub struct QmpServer {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    accept_thread: Option<JoinHandle<()>>,
    address: String,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("address", &self.address)
            .finish()
    }
}

/// epoll data of the listening socket and of the stop event.
const LISTENER_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

impl QmpServer {
    /// Listens on `address` (a Unix socket path, created with mode 0600, replacing a
    /// stale socket; or `tcp:HOST:PORT`) and serves QMP clients until stopped.
    pub fn start(
        address: &str,
        backend: Arc<dyn QmpBackend>,
        events: Arc<EventBus>,
    ) -> Result<QmpServer, QmpServerError> {
        let parsed = Address::parse(address).map_err(|reason| QmpServerError::InvalidAddress {
            address: address.to_string(),
            reason,
        })?;
        if let Address::Tcp(host, port) = &parsed {
            check_tcp_host(address, host, *port)?;
        }
        let listener = Listener::bind(&parsed).map_err(|e| match (e, &parsed) {
            (ListenError::NotASocket, Address::Unix(p)) => QmpServerError::NotASocket(p.clone()),
            (ListenError::InUse, Address::Unix(p)) => QmpServerError::InUse(p.clone()),
            (ListenError::Io(source), _) => QmpServerError::Listen {
                address: address.to_string(),
                source,
            },
            (_, _) => QmpServerError::Listen {
                address: address.to_string(),
                source: io::Error::from(io::ErrorKind::AddrInUse),
            },
        })?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(QmpServerError::Start)?);
        let epoll = Epoll::new().map_err(QmpServerError::Start)?;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER_TOKEN),
            (stop.as_raw_fd(), STOP_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(QmpServerError::Start)?;
        }
        let shared = Arc::new(Shared {
            backend,
            events,
            clients: Mutex::new(Clients {
                streams: HashMap::new(),
                stopping: false,
            }),
            changed: Condvar::new(),
        });
        let local = listener.local_address();
        let thread_shared = Arc::clone(&shared);
        let accept_thread = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                crate::seccomp::thread_start(crate::seccomp::ThreadKind::QmpAccept);
                accept_loop(&thread_shared, &listener, &epoll)
            })
            .map_err(QmpServerError::Start)?;
        Ok(QmpServer {
            shared,
            stop,
            accept_thread: Some(accept_thread),
            address: local,
        })
    }

    /// Where clients connect: the socket path, or `tcp:IP:PORT` with the port actually
    /// bound (useful with port 0).
    pub fn local_address(&self) -> &str {
        &self.address
    }

    /// Closes the listening socket (removing its file) and disconnects every client.
    pub fn stop(self) {
        // Drop does it.
    }

    fn shutdown(&mut self) {
        self.shared.clients().stopping = true;
        self.shared.changed.notify_all();
        let _ = self.stop.write(1);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let streams: Vec<Stream> = self
            .shared
            .clients()
            .streams
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in streams {
            s.shutdown();
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepts clients until the stop event; the listener (and its file) go when the thread
/// ends.
fn accept_loop(shared: &Arc<Shared>, listener: &Listener, epoll: &Epoll) {
    let mut ready = [EpollEvent::default(); 2];
    loop {
        {
            let mut clients = shared.clients();
            while clients.streams.len() >= MAX_CLIENTS && !clients.stopping {
                clients = shared
                    .changed
                    .wait(clients)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if clients.stopping {
                break;
            }
        }
        match epoll.wait(-1, &mut ready) {
            Ok(n) if ready[..n].iter().any(|e| e.data() == STOP_TOKEN) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        loop {
            match listener.accept() {
                Ok(stream) => spawn_client(shared, stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(_) => {
                    // Out of descriptors or memory: wait instead of spinning.
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
            if shared.clients().streams.len() >= MAX_CLIENTS {
                break;
            }
        }
    }
}

/// Client ids, unique across servers (they may share an event bus).
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

fn spawn_client(shared: &Arc<Shared>, stream: Stream) {
    let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    {
        let mut clients = shared.clients();
        if clients.stopping {
            stream.shutdown();
            return;
        }
        clients.streams.insert(id, handle);
    }
    let thread_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("qmp-client-{id}"))
        .spawn(move || {
            crate::seccomp::thread_start(crate::seccomp::ThreadKind::QmpClient);
            serve_client(&thread_shared, id, stream)
        });
    if spawned.is_err() {
        if let Some(s) = shared.clients().streams.remove(&id) {
            s.shutdown();
        }
        shared.changed.notify_all();
    }
}

/// On leaving (however): no more events, no longer a client.
struct ClientGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.shared.events.unsubscribe(self.id);
        self.shared.clients().streams.remove(&self.id);
        self.shared.changed.notify_all();
    }
}

fn queue_line(queue: &SyncSender<Outgoing>, value: &Value) -> Result<(), ()> {
    let line = format!("{}\r\n", writer::to_json(value));
    queue.send(Outgoing::Line(line.into())).map_err(drop)
}

/// One client's reader: greeting, then requests until the client leaves.
fn serve_client(shared: &Shared, id: u64, mut stream: Stream) {
    let _guard = ClientGuard { shared, id };
    let (queue, outgoing) = sync_channel(QUEUE_LEN);
    let Ok(writer_stream) = stream.try_clone() else {
        return;
    };
    if writer_stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .is_err()
    {
        return;
    }
    // Until negotiation, every read waits only for what is left of the deadline.
    let mut deadline = Some(std::time::Instant::now() + NEGOTIATION_TIMEOUT);
    let spawned = std::thread::Builder::new()
        .name(format!("qmp-writer-{id}"))
        .spawn(move || {
            crate::seccomp::thread_start(crate::seccomp::ThreadKind::QmpWriter);
            write_loop(outgoing, writer_stream)
        });
    if spawned.is_err() || queue_line(&queue, &protocol::greeting()).is_err() {
        return;
    }
    let mut session = Session::new();
    let mut streamer = JsonStreamer::new();
    // What clients send may hold a passphrase: each chunk is zeroed once lexed.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; READ_CHUNK]);
    let mut messages = Vec::new();
    loop {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        streamer.feed(&buf[..n], &mut messages);
        buf[..n].zeroize();
        for message in messages.drain(..) {
            let (reply, effect) = session.handle(message, &*shared.backend);
            let line = Outgoing::Line(format!("{}\r\n", writer::to_json(&reply)).into());
            if effect == Effect::Negotiated {
                // Negotiated clients may wait for events as long as they like.
                deadline = None;
                if stream.set_read_timeout(None).is_err() {
                    return;
                }
                let Ok(events_stream) = stream.try_clone() else {
                    return;
                };
                if shared
                    .events
                    .subscribe(id, queue.clone(), events_stream, line)
                    .is_err()
                {
                    return;
                }
                continue;
            }
            if queue.send(line).is_err() {
                return;
            }
            match effect {
                Effect::None | Effect::Negotiated => {}
                Effect::Quit => {
                    let (ack, written) = sync_channel(1);
                    if queue.send(Outgoing::Flush(ack)).is_ok() {
                        let _ = written.recv_timeout(QUIT_FLUSH_TIMEOUT);
                    }
                    let _ = commands::run(&*shared.backend, Action::Quit);
                }
            }
        }
    }
}

/// One client's writer: sends what is queued until the queue closes or a write fails.
fn write_loop(outgoing: Receiver<Outgoing>, mut stream: Stream) {
    for message in outgoing {
        match message {
            Outgoing::Line(line) => {
                if stream.write_all(line.as_bytes()).is_err() {
                    // Wake the reader: this client is gone.
                    stream.shutdown();
                    return;
                }
            }
            Outgoing::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
}

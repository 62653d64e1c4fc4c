//! The connection layer under the routes: accepting sockets, the limits on
//! them, and how they end.
//!
//! axum's own `serve` loop has no header or idle timeouts and no connection
//! limit, writes with `writev` (which raises SIGPIPE on a reset socket in a
//! process that has not ignored the signal) and answers malformed HTTP with
//! an empty 400. This module drives hyper's HTTP/1.1 connections itself:
//!
//! - `Socket` is a TCP stream whose writes never raise a signal (`send` /
//!   `sendmsg` with `MSG_NOSIGNAL`, so the server does not depend on the
//!   process's signal disposition), that records its `Activity`, and that
//!   turns hyper's empty parse-error responses into OpenAI-style JSON ones.
//! - A watchdog per connection closes it when a request head takes longer
//!   than [`Limits::header_timeout`] to arrive, when it sits idle between
//!   requests longer than [`Limits::idle_timeout`], or when the client has
//!   not taken any of a response for that long.
//! - Past [`Limits::max_connections`] open connections, new ones are closed
//!   as soon as they are accepted; everyone else is served as before.
//! - An accept error (out of file descriptors, say) is logged and retried
//!   after a pause: it never ends the server.
//!
//! Request bodies that stall are the handlers' business (`read_body` gives up
//! after the header timeout without a byte); a request being answered is
//! never timed out here.

use crate::AppState;
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// Bounds on connections (`minnow serve --max-connections`,
/// `--header-timeout`, `--idle-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections beyond which new ones are closed at once.
    pub max_connections: usize,
    /// A request head must arrive within this long of its first byte, and a
    /// request body may not stall for longer.
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long, and
    /// so is one whose client has read nothing of a response for this long.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 512, header_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60) }
    }
}

/// How far a shutdown has gone; [`crate::serve`] watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// Serving.
    Run,
    /// Stop accepting, refuse new generations, let in-flight ones run for the
    /// grace period, then cut them short with an error.
    Graceful,
    /// Cut everything short with an error now (a second signal).
    Now,
}

/// "Not set" in an [`Activity`] timestamp.
const NONE: u64 = u64::MAX;

/// What one connection is doing, shared by its socket, its service and its
/// watchdog. Times are milliseconds since `epoch`.
struct Activity {
    epoch: Instant,
    /// Requests whose response has not been sent to the end (or dropped).
    busy: AtomicUsize,
    /// When the first byte of the next request head arrived (`NONE`: none yet).
    head_since: AtomicU64,
    /// When the connection last became idle: opened, or a response ended.
    idle_since: AtomicU64,
    /// When a write first found the socket's buffer full with no progress since.
    write_stalled_since: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            busy: AtomicUsize::new(0),
            head_since: AtomicU64::new(NONE),
            idle_since: AtomicU64::new(0),
            write_stalled_since: AtomicU64::new(NONE),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn bytes_read(&self) {
        if self.busy.load(Ordering::SeqCst) == 0 && self.head_since.load(Ordering::SeqCst) == NONE {
            self.head_since.store(self.now(), Ordering::SeqCst);
        }
    }

    fn request_began(&self) {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.head_since.store(NONE, Ordering::SeqCst);
    }

    fn request_ended(&self) {
        self.idle_since.store(self.now(), Ordering::SeqCst);
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    fn write_blocked(&self) {
        let _ = self.write_stalled_since.compare_exchange(NONE, self.now(), Ordering::SeqCst, Ordering::SeqCst);
    }

    fn write_progressed(&self) {
        self.write_stalled_since.store(NONE, Ordering::SeqCst);
    }

    /// Why the connection should be closed now, if it should.
    fn expired(&self, limits: &Limits) -> Option<&'static str> {
        let now = self.now();
        let over = |since: u64, limit: Duration| since != NONE && now.saturating_sub(since) >= limit.as_millis() as u64;
        if over(self.write_stalled_since.load(Ordering::SeqCst), limits.idle_timeout) {
            return Some("the client stopped reading its response");
        }
        if self.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::SeqCst);
        if head != NONE {
            return over(head, limits.header_timeout).then_some("the request head did not arrive in time");
        }
        over(self.idle_since.load(Ordering::SeqCst), limits.idle_timeout).then_some("idle")
    }
}

/// Counts a request as in flight from the moment hyper hands it over until
/// its response body is dropped (sent to the end, or the connection gone).
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body carrying its request's [`RequestGuard`].
struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The open connections: their count (the `/metrics` gauge is the count
/// itself) and a wake-up when it reaches zero.
struct Open {
    state: Arc<AppState>,
    all_closed: Notify,
}

/// One open connection, counted from accept until its task ends.
struct OpenGuard(Arc<Open>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.state.metrics.connections_open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

impl Open {
    fn count(&self) -> usize {
        self.state.metrics.connections_open.load(Ordering::SeqCst).max(0) as usize
    }

    /// Counts a new connection.
    fn guard(self: &Arc<Open>) -> OpenGuard {
        self.state.metrics.connections_open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(self.clone())
    }

    /// Waits until no connection is open, or `limit` has passed; true if none is.
    async fn wait_closed(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let closed = self.all_closed.notified();
            if self.count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return self.count() == 0;
            }
        }
    }
}

/// Prints at most one line per `every` for a kind of event that can repeat
/// thousands of times a second (refused connections, accept errors).
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
    every: Duration,
}

impl RateLimitedLog {
    fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog { last: None, suppressed: 0, every }
    }

    fn log(&mut self, enabled: bool, msg: impl FnOnce() -> String) {
        if !enabled {
            return;
        }
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.suppressed += 1;
            return;
        }
        let more = if self.suppressed > 0 {
            format!(" ({} more since the last line)", self.suppressed)
        } else {
            String::new()
        };
        eprintln!("minnow serve: {}{more}", msg());
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Accepts and serves connections until `stop` leaves [`Stop::Run`], then
/// closes the listener (new connections are refused by the OS), asks every
/// open connection to close once its request is answered, and waits until
/// they have closed, the grace period has passed, or a second stop says
/// [`Stop::Now`]. What is left then is cut short through the scheduler, so
/// each client gets an error; the connections get a moment to send it.
pub(crate) async fn serve_connections(
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    mut stop: watch::Receiver<Stop>,
) -> io::Result<()> {
    let limits = state.opts.limits;
    let log = state.opts.log_requests;
    let open = Arc::new(Open { state: state.clone(), all_closed: Notify::new() });
    let mut refused_log = RateLimitedLog::new(Duration::from_secs(10));
    let mut accept_log = RateLimitedLog::new(Duration::from_secs(10));
    loop {
        if *stop.borrow() != Stop::Run {
            break;
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _peer)) => {
                    if open.count() >= limits.max_connections {
                        state.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                        refused_log.log(log, || format!(
                            "{} connections open (--max-connections): closing new ones until some end",
                            limits.max_connections
                        ));
                        drop(tcp);
                        continue;
                    }
                    let guard = open.guard();
                    tokio::spawn(connection(tcp, router.clone(), state.clone(), stop.clone(), guard));
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ECONNABORTED: transient; a
                    // tight retry loop would only burn the CPU.
                    accept_log.log(log, || format!("cannot accept a connection: {e}; retrying"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => {}
        }
    }
    drop(listener);
    state.begin_shutdown();
    let now = |stop: &watch::Receiver<Stop>| *stop.borrow() == Stop::Now;
    if !now(&stop) {
        let grace = state.opts.shutdown_grace;
        let mut stop2 = stop.clone();
        tokio::select! {
            _ = open.wait_closed(grace) => {}
            _ = stop2.wait_for(|s| *s == Stop::Now) => {}
        }
    }
    if open.count() > 0 {
        if log {
            let why = if now(&stop) { "second signal" } else { "grace period over" };
            eprintln!("minnow serve: {why}: ending the requests still in flight with an error");
        }
        // `shutdown(true)` joins the scheduler thread after its current step.
        let sched = state.scheduler.clone();
        let _ = tokio::task::spawn_blocking(move || sched.shutdown(true)).await;
        // Each cut request now ends with an error its client sees; give the
        // connections a moment to send it, but no more.
        let linger = if now(&stop) { Duration::from_millis(500) } else { Duration::from_millis(1500) };
        open.wait_closed(linger).await;
    }
    Ok(())
}

/// Serves one connection: hyper's HTTP/1.1 state machine over a [`Socket`],
/// the router as its service, and a watchdog for the timeouts.
async fn connection(
    tcp: TcpStream,
    router: Router,
    state: Arc<AppState>,
    mut stop: watch::Receiver<Stop>,
    _open: OpenGuard,
) {
    let limits = state.opts.limits;
    // Server-sent events are many small writes; do not hold them back.
    let _ = tcp.set_nodelay(true);
    let act = Arc::new(Activity::new());
    let socket = match Socket::new(tcp, act.clone()) {
        Ok(s) => s,
        Err(_) => return,
    };
    let svc_act = act.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        svc_act.request_began();
        let guard = RequestGuard(svc_act.clone());
        let mut router = router.clone();
        async move {
            let resp = tower_service::Service::call(&mut router, req.map(Body::new)).await;
            resp.map(|r| r.map(|inner| GuardedBody { inner, _guard: guard }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(socket), svc);
    tokio::pin!(conn);
    // Coarse enough to cost nothing, fine enough for short test limits.
    let tick =
        (limits.header_timeout.min(limits.idle_timeout) / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut watchdog = tokio::time::interval(tick);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        if !closing && *stop.borrow() != Stop::Run {
            // No keep-alive from here: idle connections close now, busy ones
            // after their response.
            conn.as_mut().graceful_shutdown();
            closing = true;
        }
        tokio::select! {
            _ = conn.as_mut() => return,
            r = stop.changed(), if !closing => {
                if r.is_err() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = watchdog.tick() => {
                if act.expired(&limits).is_some() {
                    state.metrics.connections_timed_out.fetch_add(1, Ordering::Relaxed);
                    // Dropping the connection closes the socket.
                    return;
                }
            }
        }
    }
}

/// A TCP stream as the server writes to it: no signals, activity recorded,
/// parse-error responses rewritten (see the module doc).
struct Socket {
    tcp: TcpStream,
    act: Arc<Activity>,
    /// A rewritten response still to be sent, and how much of it has been.
    pending: Option<(Vec<u8>, usize)>,
}

impl Socket {
    fn new(tcp: TcpStream, act: Arc<Activity>) -> io::Result<Socket> {
        sys::no_sigpipe(&tcp)?;
        Ok(Socket { tcp, act, pending: None })
    }

    /// Writes what is left of a rewritten response.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((buf, done)) = &mut self.pending {
            if *done == buf.len() {
                self.pending = None;
                break;
            }
            let slice = [IoSlice::new(&buf[*done..])];
            let n = ready!(poll_send(&self.tcp, &self.act, cx, &slice))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if let Some((_, done)) = &mut self.pending {
                *done += n;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Socket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if this.act.busy.load(Ordering::SeqCst) == 0 {
            if let Some(replacement) = parse_error_replacement(bufs) {
                this.pending = Some((replacement, 0));
                // Sent from here and from flush/shutdown; hyper's bytes count as written.
                if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
            }
        }
        poll_send(&this.tcp, &this.act, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP itself buffers nothing in user space.
        self.poll_pending(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// When `bufs` is hyper's automatic answer to a request it could not parse
/// (a 400, 414 or 431 with no body, written while no request is in flight),
/// the same status with an OpenAI-style JSON body saying what was wrong.
/// The caller has checked that no request is in flight: every response of
/// the routes is written while its request counts as busy, or has a body.
fn parse_error_replacement(bufs: &[IoSlice<'_>]) -> Option<Vec<u8>> {
    let head: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).take(1024).collect();
    let text = std::str::from_utf8(&head).ok()?;
    let (status_line, rest) = text.split_once("\r\n")?;
    let (status, message, code) = match status_line {
        "HTTP/1.1 400 Bad Request" => (
            status_line,
            "malformed HTTP request: expected a request line `METHOD /path HTTP/1.1`, well-formed headers, \
             and at most one Content-Length, a non-negative integer",
            "malformed_request",
        ),
        "HTTP/1.1 414 URI Too Long" => (status_line, "the request URI is too long", "uri_too_long"),
        "HTTP/1.1 431 Request Header Fields Too Large" => {
            (status_line, "the request headers are too large", "headers_too_large")
        }
        _ => return None,
    };
    let lower = rest.to_ascii_lowercase();
    if !lower.contains("content-length: 0\r\n") || !lower.ends_with("\r\n\r\n") {
        return None;
    }
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": null,
        "code": code,
    }})
    .to_string();
    Some(
        format!(
            "{status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// `bufs` written when the socket is writable; records stalls and progress.
fn poll_send(tcp: &TcpStream, act: &Activity, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
    loop {
        match tcp.poll_write_ready(cx) {
            Poll::Pending => {
                act.write_blocked();
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        match sys::try_send(tcp, bufs) {
            Ok(n) => {
                act.write_progressed();
                return Poll::Ready(Ok(n));
            }
            // Readiness was stale; `try_send` cleared it, so wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

#[cfg(unix)]
mod sys {
    //! Writes that report a reset peer as `EPIPE`, never as a signal.
    use std::io::{self, IoSlice};
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    #[cfg(any(target_os = "linux", target_os = "android"))]
    const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const SEND_FLAGS: libc::c_int = 0;

    /// Where `MSG_NOSIGNAL` does not exist, the socket option does the same.
    pub(super) fn no_sigpipe(_tcp: &TcpStream) -> io::Result<()> {
        #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
        {
            let one: libc::c_int = 1;
            // SAFETY: a valid socket and a pointer to a c_int of the given size.
            let r = unsafe {
                libc::setsockopt(
                    _tcp.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NOSIGPIPE,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// One `sendmsg` of `bufs`, without blocking.
    pub(super) fn try_send(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tcp.try_io(Interest::WRITABLE, || {
            // IOV_MAX is at least 1024 on the systems we build for.
            let n = bufs.len().min(1024);
            // SAFETY: msghdr is plain data; zeroed is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // IoSlice is ABI-compatible with iovec on Unix (std guarantees
            // it); sendmsg only reads the buffers.
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = n as _;
            // SAFETY: `msg` points at `n` valid iovecs that outlive the call.
            let r = unsafe { libc::sendmsg(tcp.as_raw_fd(), &msg, SEND_FLAGS) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        })
    }
}

#[cfg(not(unix))]
mod sys {
    //! Elsewhere there is no SIGPIPE: tokio's own writes.
    use std::io::{self, IoSlice};
    use tokio::net::TcpStream;

    pub(super) fn no_sigpipe(_tcp: &TcpStream) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn try_send(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tcp.try_write_vectored(bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(header_ms: u64, idle_ms: u64) -> Limits {
        Limits {
            max_connections: 8,
            header_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
        }
    }

    #[test]
    fn idle_head_and_stalled_writes_expire_busy_requests_do_not() {
        let l = limits(10, 20);
        let a = Activity::new();
        assert_eq!(a.expired(&l), None);
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(a.expired(&l), Some("idle"));
        // A request in flight is never timed out, however long it runs.
        a.request_began();
        assert_eq!(a.expired(&l), None);
        a.request_ended();
        assert_eq!(a.expired(&l), None);
        // A head that started arriving has the header timeout.
        a.bytes_read();
        std::thread::sleep(Duration::from_millis(12));
        assert_eq!(a.expired(&l), Some("the request head did not arrive in time"));
        a.request_began();
        // Body bytes of a running request start no head timer.
        a.bytes_read();
        assert_eq!(a.head_since.load(Ordering::SeqCst), NONE);
        a.write_blocked();
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(a.expired(&l), Some("the client stopped reading its response"));
        a.write_progressed();
        assert_eq!(a.expired(&l), None);
    }

    #[test]
    fn only_hypers_empty_parse_error_answers_are_rewritten() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 05:00:00 GMT\r\n\r\n";
        let r = parse_error_replacement(&[IoSlice::new(hyper_400)]).expect("rewritten");
        let text = String::from_utf8(r).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "malformed_request");
        // Split over two slices, as a vectored write may be.
        let (a, b) = hyper_400.split_at(30);
        assert!(parse_error_replacement(&[IoSlice::new(a), IoSlice::new(b)]).is_some());
        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(parse_error_replacement(&[IoSlice::new(big)]).is_some());
        // The routes' own errors have bodies; other statuses are left alone.
        let ours =
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n{\"error\":{}}";
        assert!(parse_error_replacement(&[IoSlice::new(ours)]).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(parse_error_replacement(&[IoSlice::new(ok)]).is_none());
        assert!(parse_error_replacement(&[IoSlice::new(b"0\r\n\r\n")]).is_none());
    }
}

//! Serving an axum router over HTTP/1.1 with the bounds a server open to
//! untrusted clients needs (the agent's local API and the controller's API).
//!
//! `axum::serve` has neither: a client that opens a connection and sends its
//! headers one byte a minute (or nothing at all) holds a task and a socket for
//! ever, and nothing limits how many such clients there are. Here:
//! - at most [`ConnectionLimits::max_connections`] connections are served at
//!   once; further ones wait in the kernel's listen backlog (they cost this
//!   process nothing) until one closes;
//! - a connection that does not deliver a request's complete headers within
//!   [`ConnectionLimits::header_timeout`] is closed: the first request's and
//!   every later one's on a kept-alive connection, so an idle connection is
//!   also closed after that long (hyper's header-read timer, which needs a
//!   timer that `axum::serve` does not give it).
//!
//! Shutdown: when `shutdown` completes, no connection is accepted any more,
//! idle ones close, requests in flight are answered, then `serve` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};

/// How many connections a server holds and how long one may take to send a
/// request's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest wait for a request's complete headers (also the longest a
    /// kept-alive connection stays idle).
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes,
/// then finishes the requests in flight (see the module documentation).
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("HTTP connection closed: {e}");
                    }
                }
                _ = async { closing.wait_for(|closing| *closing).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    if let Err(e) = conn.await {
                        tracing::debug!("HTTP connection closed at shutdown: {e}");
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection holds one slot until it closes: all slots back means
    // every connection is done.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// An error answer a server did not write itself (axum's rejections, 404 for
/// an unknown route, 405 are plain text): its status and message (the text,
/// or the status's reason when there is none), for the server to re-send in
/// its own error format. Any other answer (a success, or an error already in
/// JSON) comes back untouched as `Err`.
pub async fn plain_error(
    resp: axum::response::Response,
) -> Result<(axum::http::StatusCode, String), axum::response::Response> {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return Err(resp);
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    Ok((status, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::io::{Read, Write};

    fn limits(max_connections: usize, header_ms: u64) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            header_timeout: Duration::from_millis(header_ms),
        }
    }

    async fn start(
        limits: ConnectionLimits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/", get(|| async { "ok" }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, router, limits, async move {
            let _ = stop_rx.await;
        }));
        (addr, stop_tx, task)
    }

    fn get_root(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_slow_to_send_its_headers_is_closed() {
        let (addr, stop, task) = start(limits(8, 300)).await;
        let started = std::time::Instant::now();
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s.write_all(b"GET / HTTP/1.1\r\nhost:").expect("write");
            let mut buf = Vec::new();
            // The server closes the connection (EOF or reset), well before 5 s.
            let _ = s.read_to_end(&mut buf);
        });
        closed.await.expect("join");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(4), "closed only after {took:?}");
        assert!(took >= Duration::from_millis(250), "closed after {took:?}");
        let _ = stop.send(());
        task.await.expect("serve");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_connection_is_closed_after_the_header_timeout() {
        let (addr, stop, task) = start(limits(8, 300)).await;
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let started = std::time::Instant::now();
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).unwrap_or(0);
            (n, started.elapsed())
        });
        let (n, took) = closed.await.expect("join");
        assert_eq!(n, 0, "the server sent bytes to a silent client");
        assert!(took < Duration::from_secs(4), "closed only after {took:?}");
        let _ = stop.send(());
        task.await.expect("serve");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_cap_wait_until_one_closes() {
        let (addr, stop, task) = start(limits(2, 1_000)).await;
        let answered = tokio::task::spawn_blocking(move || {
            // Two silent connections take both slots.
            let a = std::net::TcpStream::connect(addr).expect("connect a");
            let b = std::net::TcpStream::connect(addr).expect("connect b");
            std::thread::sleep(Duration::from_millis(100));
            // A third is accepted by the kernel but not served while they stay.
            let mut c = std::net::TcpStream::connect(addr).expect("connect c");
            c.set_read_timeout(Some(Duration::from_millis(400)))
                .expect("timeout");
            c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .expect("write");
            let mut buf = [0u8; 64];
            let early = c.read(&mut buf);
            assert!(
                early.is_err(),
                "served past the cap of 2 connections: {early:?}"
            );
            // One slot frees: the third is served.
            drop(a);
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut out = String::new();
            c.read_to_string(&mut out).expect("read");
            drop(b);
            out
        });
        let out = answered.await.expect("join");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let _ = stop.send(());
        task.await.expect("serve");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_answers_and_returns() {
        let (addr, stop, task) = start(ConnectionLimits::default()).await;
        let out = tokio::task::spawn_blocking(move || get_root(addr))
            .await
            .expect("join")
            .expect("request");
        assert!(out.ends_with("ok"), "{out}");
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve");
    }
}

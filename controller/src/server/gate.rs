//! The embedded broker's gate: a TLS front that confines each device to its own
//! topics, which rumqttd cannot do (docs/controller.md).
//!
//! Devices connect to the gate with mutual TLS. The gate maps the client
//! certificate to a device id (the SHA-256 fingerprints recorded at enrollment),
//! then relays the MQTT 3.1.1 stream to rumqttd in process (an in-memory
//! stream handed to the broker: no socket, so a device costs the controller
//! one file descriptor, its TLS connection), judging
//! every field of every packet the client sends ([`DeviceSession`]): the first
//! packet is one CONNECT with the device id as client id, no user name, and no
//! will but the device's own offline state; PUBLISH names one of the device's own
//! upstream topics (retained only for its state); SUBSCRIBE and UNSUBSCRIBE ask
//! only for the device's command topic and bundle chunk topics. A packet is
//! relayed only in the codec's canonical encoding of the fields judged. Anything
//! else closes the connection before the broker sees it. The broker's answers are
//! copied unread. The controller's own certificate passes unchecked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub use edgefleet_gate::{DeviceSession, MAX_DEVICE_PACKET, Refusal, Verdict, fixed_header};
use edgefleet_shared::DeviceId;
use edgefleet_shared::protocol::Topics;
use rumqttd::StreamAcceptor;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The in-memory stream between the gate and the broker buffers this much
/// each way. Small on purpose: the stream keeps what its buffer grew to for
/// the connection's life (at 10,000 devices, 8 KiB each way is 160 MB at
/// most); a window of bundle chunks waits in rumqttd's write buffer, which
/// gives its memory back after the batch.
const LINK_BUFFER: usize = 8 * 1024;

/// Encrypted data a connection holds for a device that reads slower than the
/// broker sends (rustls's default is 64 KiB: 640 MB for 10,000 devices in a
/// rollout's last wave). Past it the broker's link waits, as for a full socket.
const TLS_BUFFER: usize = 16 * 1024;

/// Who a certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An enrolled device.
    Device(String),
    /// The controller itself: not confined.
    Controller,
}

/// Fingerprint (SHA-256 of the DER certificate, hex) -> identity. Refreshed by
/// enrollment.
pub type Identities = Arc<RwLock<HashMap<String, Identity>>>;

/// Counters, and the signal that the enrolled certificates changed.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Connections accepted and relayed.
    pub connections: AtomicU64,
    /// Connections closed for breaking the rules (or unknown certificates).
    pub refused: AtomicU64,
    /// Connections closed because their certificate was revoked or replaced.
    pub revoked: AtomicU64,
    /// Bumped after certificates are removed: open connections re-check theirs.
    pub identities_changed: tokio::sync::watch::Sender<u64>,
}

impl GateStats {
    /// Tells open connections that certificates were revoked or replaced.
    pub fn identities_changed(&self) {
        self.identities_changed.send_modify(|n| *n += 1);
    }
}

/// SHA-256 of a DER certificate, hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Accepts device connections on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    broker: StreamAcceptor,
    identities: Identities,
    topics: Topics,
    stats: Arc<GateStats>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, broker, identities, topics, stats) = (
            acceptor.clone(),
            broker.clone(),
            identities.clone(),
            topics.clone(),
            stats.clone(),
        );
        tokio::spawn(async move {
            if let Err(why) = relay(acceptor, tcp, &broker, identities, topics, &stats).await {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "gate closed a connection: {why}");
            }
        });
    }
}

/// Why the gate closed a connection (logged and counted in `refused`).
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("no client certificate")]
    NoCertificate,
    #[error("certificate not enrolled on this controller (or revoked)")]
    NotEnrolled,
    #[error("enrolled device id {0:?} is not a device id")]
    EnrolledId(String),
    #[error("broker: {0}")]
    Broker(std::io::Error),
    #[error("relaying the controller's connection: {0}")]
    Relay(std::io::Error),
    #[error("certificate revoked or replaced: connection closed")]
    Revoked,
    #[error("{device}: packet of {len} bytes")]
    TooLarge { device: DeviceId, len: usize },
    #[error(transparent)]
    Refused(#[from] Refusal),
}

async fn relay(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    broker: &StreamAcceptor,
    identities: Identities,
    topics: Topics,
    stats: &GateStats,
) -> Result<(), Closed> {
    let mut tls = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .map_err(|_| Closed::HandshakeTimeout)?
        .map_err(Closed::Tls)?;
    tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or(Closed::NoCertificate)?;
    let print = fingerprint(&der);
    // Subscribed before the check, so a revocation right after it is not missed.
    let mut changes = stats.identities_changed.subscribe();
    let admitted = |identities: &Identities| {
        identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&print)
            .cloned()
    };
    let who = admitted(&identities).ok_or(Closed::NotEnrolled)?;
    let (ours, theirs) = tokio::io::duplex(LINK_BUFFER);
    // The broker's side ends when the gate drops its end (the device gone:
    // rumqttd sends its will) or on the broker's own close.
    broker.accept(theirs);
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let (mut client_r, mut client_w) = tokio::io::split(tls);
    let (mut broker_r, mut broker_w) = tokio::io::split(ours);
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut broker_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    });
    let relayed = async {
        match who {
            Identity::Controller => tokio::io::copy(&mut client_r, &mut broker_w)
                .await
                .map(|_| ())
                .map_err(Closed::Relay),
            Identity::Device(device) => {
                let device = DeviceId::new(&device).map_err(|_| Closed::EnrolledId(device))?;
                up(
                    &mut client_r,
                    &mut broker_w,
                    DeviceSession::new(topics, device),
                )
                .await
            }
        }
    };
    // A revoked (or replaced) certificate loses its open connection at once.
    let revoked = async {
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if admitted(&identities).is_none() {
                return;
            }
        }
    };
    let result = tokio::select! {
        r = relayed => r,
        () = revoked => {
            stats.revoked.fetch_add(1, Ordering::Relaxed);
            Err(Closed::Revoked)
        }
    };
    down.abort();
    result
}

/// What one read from a device asks for at least (the buffer grows to a
/// whole packet, up to [`MAX_DEVICE_PACKET`]).
const READ_SIZE: usize = 4096;

/// Client to broker, one whole packet at a time, each judged first.
async fn up<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    client: &mut R,
    broker: &mut W,
    mut session: DeviceSession,
) -> Result<(), Closed> {
    // Read straight into the packet buffer: a device's packets are small, and
    // a fixed 64 KiB read buffer per connection was 640 MB at 10,000 devices.
    let mut buf: Vec<u8> = Vec::with_capacity(READ_SIZE);
    loop {
        // Whole packets in the buffer: judge and forward them.
        while let Some((_, len, head)) = fixed_header(&buf)? {
            if len > MAX_DEVICE_PACKET {
                return Err(Closed::TooLarge {
                    device: session.device().clone(),
                    len,
                });
            }
            if buf.len() < head + len {
                break;
            }
            if let Verdict::Refuse(why) = session.judge(&buf[..head + len]) {
                return Err(why.into());
            }
            broker
                .write_all(&buf[..head + len])
                .await
                .map_err(Closed::Broker)?;
            buf.drain(..head + len);
        }
        if buf.is_empty() && buf.capacity() > 4 * READ_SIZE {
            // After a large packet, give the memory back.
            buf = Vec::with_capacity(READ_SIZE);
        }
        buf.reserve(READ_SIZE);
        let n = match client.read_buf(&mut buf).await {
            Ok(n) => n,
            // The device went away without DISCONNECT (power cut, network, or
            // no TLS close_notify): the broker sends its will; not a refusal.
            Err(e) => {
                tracing::debug!(device = %session.device(), "connection lost: {e}");
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
    }
}

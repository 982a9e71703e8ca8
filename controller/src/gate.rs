//! The embedded broker's gate: a TLS front that confines each device to its own
//! topics, which rumqttd cannot do (docs/controller.md).
//!
//! Devices connect to the gate with mutual TLS. The gate maps the client
//! certificate to a device id (the SHA-256 fingerprints recorded at enrollment),
//! then relays the MQTT 3.1.1 stream to rumqttd on a loopback listener, reading
//! every packet the client sends: CONNECT must use the device id as client id;
//! PUBLISH must name one of the device's own upstream topics; SUBSCRIBE may only
//! ask for the device's command topic and bundle chunk topics. Anything else
//! closes the connection. The broker's answers are copied unread. The controller's
//! own certificate passes unchecked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use edgefleet_shared::protocol::{DeviceTopic, Topic, Topics};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest packet a device may send (a fetch request or telemetry is far below).
pub const MAX_DEVICE_PACKET: usize = 1 << 20;

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

/// What the gate decided about one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Relay it.
    Pass,
    /// Close the connection, for this reason.
    Refuse(String),
}

/// Splits an MQTT fixed header: packet type and remaining length, with the
/// header's own length. `None` if more bytes are needed; `Err` if malformed.
pub fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let kind = buf[0] >> 4;
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((kind, len, 2 + i)));
        }
    }
    Err("remaining length longer than 4 bytes".into())
}

fn string_at(body: &[u8], at: usize) -> Result<(&str, usize), String> {
    let len = body
        .get(at..at + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or("truncated string length")?;
    let bytes = body.get(at + 2..at + 2 + len).ok_or("truncated string")?;
    let s = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")?;
    Ok((s, at + 2 + len))
}

/// Judges one client packet (`kind` from the fixed header, `body` after it) from
/// `device` under `topics`.
pub fn judge(topics: &Topics, device: &str, kind: u8, flags: u8, body: &[u8]) -> Verdict {
    let run = || -> Result<Verdict, String> {
        match kind {
            // CONNECT: protocol name, level, flags, keep alive, then the client id.
            1 => {
                let (name, at) = string_at(body, 0)?;
                let level = *body.get(at).ok_or("truncated CONNECT")?;
                if name != "MQTT" || level != 4 {
                    return Ok(Verdict::Refuse(format!(
                        "only MQTT 3.1.1 is accepted (got {name} level {level})"
                    )));
                }
                let (client_id, _) = string_at(body, at + 4)?;
                if client_id != device {
                    return Ok(Verdict::Refuse(format!(
                        "client id {client_id:?} is not the certificate's device {device}"
                    )));
                }
                Ok(Verdict::Pass)
            }
            // PUBLISH: the topic comes first.
            3 => {
                let (topic, _) = string_at(body, 0)?;
                match topics.parse(topic) {
                    Some(Topic::Device { device: d, kind })
                        if d.as_str() == device && kind.device_publishes() =>
                    {
                        Ok(Verdict::Pass)
                    }
                    _ => Ok(Verdict::Refuse(format!(
                        "{device} may not publish on {topic}"
                    ))),
                }
            }
            // SUBSCRIBE: packet id, then (filter, options) pairs.
            8 => {
                if flags != 0b0010 {
                    return Err("SUBSCRIBE with wrong flags".into());
                }
                let mut at = 2;
                let own = format!(
                    "{}/devices/{device}/{}",
                    topics.prefix(),
                    DeviceTopic::Commands.segment()
                );
                let all_chunks = format!("{}/bundles/+/chunks", topics.prefix());
                while at < body.len() {
                    let (filter, next) = string_at(body, at)?;
                    at = next + 1;
                    let ok = filter == own
                        || filter == all_chunks
                        || matches!(topics.parse(filter), Some(Topic::BundleChunks { .. }));
                    if !ok {
                        return Ok(Verdict::Refuse(format!(
                            "{device} may not subscribe to {filter}"
                        )));
                    }
                }
                Ok(Verdict::Pass)
            }
            // PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBSCRIBE, PINGREQ, DISCONNECT.
            4..=7 | 10 | 12 | 14 => Ok(Verdict::Pass),
            other => Ok(Verdict::Refuse(format!(
                "packet type {other} is not expected from a client"
            ))),
        }
    };
    run().unwrap_or_else(|e| Verdict::Refuse(format!("malformed packet: {e}")))
}

/// SHA-256 of a DER certificate, hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Accepts device connections on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    upstream: SocketAddr,
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
        let (acceptor, identities, topics, stats) = (
            acceptor.clone(),
            identities.clone(),
            topics.clone(),
            stats.clone(),
        );
        tokio::spawn(async move {
            if let Err(why) = relay(acceptor, tcp, upstream, identities, topics, &stats).await {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "gate closed a connection: {why}");
            }
        });
    }
}

async fn relay(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    upstream: SocketAddr,
    identities: Identities,
    topics: Topics,
    stats: &GateStats,
) -> Result<(), String> {
    let tls = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or("no client certificate")?;
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
    let who =
        admitted(&identities).ok_or("certificate not enrolled on this controller (or revoked)")?;
    let broker = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("broker: {e}"))?;
    let _ = broker.set_nodelay(true);
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let (mut client_r, mut client_w) = tokio::io::split(tls);
    let (mut broker_r, mut broker_w) = broker.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut broker_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    });
    let relayed = async {
        match who {
            Identity::Controller => tokio::io::copy(&mut client_r, &mut broker_w)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Identity::Device(device) => up(&mut client_r, &mut broker_w, &topics, &device).await,
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
            Err("certificate revoked or replaced: connection closed".into())
        }
    };
    down.abort();
    result
}

/// Client to broker, one whole packet at a time, each judged first.
async fn up<R: AsyncRead + Unpin>(
    client: &mut R,
    broker: &mut tokio::net::tcp::OwnedWriteHalf,
    topics: &Topics,
    device: &str,
) -> Result<(), String> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Whole packets in the buffer: judge and forward them.
        while let Some((kind, len, head)) = fixed_header(&buf)? {
            if len > MAX_DEVICE_PACKET {
                return Err(format!("{device}: packet of {len} bytes"));
            }
            if buf.len() < head + len {
                break;
            }
            let flags = buf[0] & 0x0f;
            if let Verdict::Refuse(why) = judge(topics, device, kind, flags, &buf[head..head + len])
            {
                return Err(why);
            }
            broker
                .write_all(&buf[..head + len])
                .await
                .map_err(|e| format!("broker: {e}"))?;
            buf.drain(..head + len);
        }
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|e| format!("{device}: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn connect(client_id: &str, level: u8) -> Vec<u8> {
        let mut b = string("MQTT");
        b.extend_from_slice(&[level, 0x02, 0, 30]);
        b.extend(string(client_id));
        b
    }

    fn publish(topic: &str) -> Vec<u8> {
        let mut b = string(topic);
        b.extend_from_slice(&[0, 1, 0xa1, 0x01]);
        b
    }

    fn subscribe(filters: &[&str]) -> Vec<u8> {
        let mut b = vec![0, 7];
        for f in filters {
            b.extend(string(f));
            b.push(1);
        }
        b
    }

    #[test]
    fn a_device_may_use_only_its_own_topics() {
        let t = Topics::default();
        let pass = |kind, flags, body: Vec<u8>| judge(&t, "pi-01", kind, flags, &body);
        assert_eq!(pass(1, 0, connect("pi-01", 4)), Verdict::Pass);
        assert!(
            matches!(pass(1, 0, connect("pi-02", 4)), Verdict::Refuse(r) if r.contains("pi-02"))
        );
        assert!(matches!(
            pass(1, 0, connect("pi-01", 5)),
            Verdict::Refuse(_)
        ));
        for own in ["state", "events", "telemetry", "fetch", "samples"] {
            assert_eq!(
                pass(3, 2, publish(&format!("edgefleet/v1/devices/pi-01/{own}"))),
                Verdict::Pass,
                "{own}"
            );
        }
        for bad in [
            "edgefleet/v1/devices/pi-02/telemetry",
            "edgefleet/v1/devices/pi-01/cmd",
            "edgefleet/v1/bundles/aa/chunks",
            "other/topic",
        ] {
            assert!(
                matches!(pass(3, 2, publish(bad)), Verdict::Refuse(_)),
                "{bad}"
            );
        }
        let digest = "ab".repeat(32);
        assert_eq!(
            pass(
                8,
                2,
                subscribe(&[
                    "edgefleet/v1/devices/pi-01/cmd",
                    &format!("edgefleet/v1/bundles/{digest}/chunks"),
                ])
            ),
            Verdict::Pass
        );
        for bad in [
            "edgefleet/v1/devices/+/cmd",
            "edgefleet/v1/#",
            "edgefleet/v1/devices/pi-02/cmd",
        ] {
            assert!(
                matches!(
                    pass(8, 2, subscribe(&["edgefleet/v1/devices/pi-01/cmd", bad])),
                    Verdict::Refuse(_)
                ),
                "{bad}"
            );
        }
        assert_eq!(pass(12, 0, vec![]), Verdict::Pass);
        assert!(
            matches!(pass(2, 0, vec![]), Verdict::Refuse(_)),
            "CONNACK from a client"
        );
        assert!(
            matches!(pass(3, 2, vec![0, 50, b'a']), Verdict::Refuse(r) if r.contains("malformed"))
        );
    }

    #[test]
    fn fixed_headers_need_their_bytes_and_refuse_overlong_lengths() {
        assert_eq!(fixed_header(&[]), Ok(None));
        assert_eq!(fixed_header(&[0x30]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0x05]), Ok(Some((3, 5, 2))));
        assert_eq!(fixed_header(&[0x30, 0x80, 0x01]), Ok(Some((3, 128, 3))));
        assert_eq!(fixed_header(&[0x30, 0x80]), Ok(None));
        assert!(fixed_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn the_judge_never_panics(kind in 0u8..16, flags in 0u8..16, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = judge(&Topics::default(), "pi-01", kind, flags, &body);
            let _ = fixed_header(&body);
        }
    }
}

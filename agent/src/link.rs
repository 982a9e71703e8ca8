//! The MQTT link to the controller: connection options (plain TCP for development,
//! mutual TLS with rustls and ring for production), reconnection with exponential
//! backoff and jitter, and delivery tracking so spooled records are forgotten only
//! once the broker has acknowledged them.
//!
//! Delivery tracking: every QoS 1 publish is given a [`Tag`] when it is handed to
//! the client. rumqttc assigns packet ids in the order requests are sent, so the
//! link task pairs each `Outgoing::Publish(pkid)` with the oldest untagged request
//! and reports [`LinkEvent::Delivered`] when the PUBACK for that id arrives.
//! Publishing is only allowed while connected, under the same lock that the link
//! task takes to mark a disconnect and drain the request channel; so no request
//! of an old connection is ever paired with an id of a new one. The session is
//! clean on every connect: what was not acknowledged is sent again from the spool.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::mpsc;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Mutual TLS (`mqtts://`) or plain TCP (`mqtt://`).
    pub tls: bool,
}

/// Why a broker URL is refused (each names the URL or its part).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://`.
    #[error("{0:?} does not look like mqtts://host:port")]
    NotAUrl(String),
    /// A scheme other than mqtt or mqtts.
    #[error("scheme {0:?} is not mqtt or mqtts")]
    Scheme(String),
    /// No `:port`.
    #[error("{0:?} has no port")]
    NoPort(String),
    /// A port that is not 1-65535.
    #[error("{0:?}: the port is not 1-65535")]
    Port(String),
    /// An empty host.
    #[error("{0:?} has no host")]
    NoHost(String),
    /// A list mixing `mqtts://` and `mqtt://`.
    #[error("{0:?}: every broker of a list must use the same scheme")]
    MixedSchemes(String),
}

impl Endpoint {
    /// Parses `mqtt://host:port` or `mqtts://host:port`.
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| UrlError::NotAUrl(url.to_owned()))?;
        let tls = match scheme {
            "mqtts" => true,
            "mqtt" => false,
            other => return Err(UrlError::Scheme(other.to_owned())),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| UrlError::NoPort(url.to_owned()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| UrlError::Port(url.to_owned()))?;
        if host.is_empty() {
            return Err(UrlError::NoHost(url.to_owned()));
        }
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            tls,
        })
    }

    /// Parses one URL or several separated by commas (the nodes of a broker
    /// cluster, tried in turn), all with the same scheme.
    pub fn parse_list(urls: &str) -> Result<Vec<Endpoint>, UrlError> {
        let list = urls
            .split(',')
            .map(|u| Endpoint::parse(u.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if list.iter().any(|e| e.tls != list[0].tls) {
            return Err(UrlError::MixedSchemes(urls.to_owned()));
        }
        Ok(list)
    }
}

/// The MQTT options for each broker a client may use, in the order it tries
/// them: one broker, or the nodes of a broker cluster. After a failed or lost
/// connection the link dials the next one (docs/scale.md, "A clustered broker").
#[derive(Debug, Clone)]
pub struct Brokers {
    list: Vec<MqttOptions>,
    dialled: usize,
    subscribe_qos: QoS,
}

/// The QoS of a link's subscriptions from its setting (`subscribe_qos`: 0 or
/// 1), or why the setting is refused.
pub fn subscribe_qos(level: u8) -> Result<QoS, &'static str> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        _ => Err("must be 0 or 1 (0 on a NATS cluster, see docs/scale.md)"),
    }
}

impl Brokers {
    /// Options for each endpoint, made by `options` (at least one endpoint).
    pub fn new(endpoints: &[Endpoint], options: impl Fn(&Endpoint) -> MqttOptions) -> Brokers {
        Brokers {
            list: endpoints.iter().map(options).collect(),
            dialled: 0,
            subscribe_qos: QoS::AtLeastOnce,
        }
    }

    /// Subscriptions at `qos` rather than QoS 1. QoS 0 is for a NATS cluster,
    /// which makes every QoS 1 subscription a replicated JetStream consumer
    /// (docs/scale.md, "NATS at scale"). Publishes stay at QoS 1.
    pub fn subscribing_at(mut self, qos: QoS) -> Brokers {
        self.subscribe_qos = qos;
        self
    }

    /// The QoS of the subscriptions.
    pub fn subscribe_qos(&self) -> QoS {
        self.subscribe_qos
    }

    /// The options of the broker dialled first.
    pub fn first(&self) -> &MqttOptions {
        &self.list[0]
    }

    /// Changes every broker's options.
    pub fn for_each(&mut self, f: impl Fn(&mut MqttOptions)) {
        self.list.iter_mut().for_each(f);
    }

    /// After a failed or lost connection: `eventloop` will dial the next
    /// broker (the same one when there is one). Returns its address.
    pub fn dial_next(&mut self, eventloop: &mut rumqttc::EventLoop) -> (String, u16) {
        if self.list.len() > 1 {
            self.dialled = (self.dialled + 1) % self.list.len();
            eventloop.mqtt_options = self.list[self.dialled].clone();
        }
        eventloop.mqtt_options.broker_address()
    }
}

/// Problems setting up the link (files, certificates).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Tls(String),
}

fn pem_err(path: &Path, detail: impl std::fmt::Display) -> LinkError {
    LinkError::Pem {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// A rustls client configuration for mutual TLS, with the ring provider (smaller
/// than aws-lc-rs and easier to cross-compile; see ../shared/STACK.md).
pub fn tls_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs_in = |path: &Path| -> Result<Vec<CertificateDer<'static>>, LinkError> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| pem_err(path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(path, e))?;
        if certs.is_empty() {
            return Err(pem_err(path, "no CERTIFICATE block"));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_in(ca)? {
        roots.add(c).map_err(|e| pem_err(ca, e))?;
    }
    let chain = certs_in(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| LinkError::Tls(e.to_string()))
}

/// Largest packet the agent accepts: a bundle chunk (4 MiB) plus its envelope.
pub const MAX_INCOMING_PACKET: usize = 4 * 1024 * 1024 + 4096;
/// Largest packet the agent sends: a sample upload (1 MiB) plus its envelope.
pub const MAX_OUTGOING_PACKET: usize = 1024 * 1024 + 4096;

/// MQTT options for a device: its id as client id, clean session, 30 s keep-alive,
/// packet limits raised for bundle chunks (rumqttc's default is 10 KiB).
pub fn options(
    client_id: &str,
    endpoint: &Endpoint,
    tls: Option<rustls::ClientConfig>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    if let Some(config) = tls {
        o.set_transport(Transport::tls_with_config(config.into()));
    }
    o
}

/// Exponential backoff with jitter for reconnects: 0.5 s doubling to 60 s, each
/// delay drawn uniformly from its upper half so a fleet that lost its broker at
/// the same instant does not come back at the same instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(60))
    }
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay; `random` is any value, scaled into the jitter.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ns = u128::from(random) % (half.as_nanos().max(1));
        half + Duration::from_nanos(u64::try_from(jitter_ns).unwrap_or(0))
    }

    /// Back to the first delay (after a successful connect).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What a publish is, for delivery reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tag {
    /// Nothing to report (state, fetch requests).
    None,
    /// An event record with this sequence number.
    Event(u64),
    /// A telemetry record with this sequence number.
    Telemetry(u64),
    /// The device's state (published again when the broker does not take it).
    State,
}

/// What the link tells the agent.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected (again): subscribe, announce, resend.
    Connected,
    /// The connection failed or was lost; the link retries by itself.
    Disconnected(String),
    /// A message arrived.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// The broker acknowledged a tagged publish.
    Delivered(Tag),
}

#[derive(Debug, Default)]
struct Tracking {
    connected: bool,
    untagged: VecDeque<Tag>,
    by_pkid: HashMap<u16, Tag>,
    will: Option<LastWill>,
}

impl Tracking {
    /// The client sent the oldest untagged publish as packet `pkid`.
    fn sent(&mut self, pkid: u16) {
        if let Some(tag) = self.untagged.pop_front()
            && pkid != 0
        {
            self.by_pkid.insert(pkid, tag);
        }
    }

    /// A new connection: no packet of the old one is tracked.
    fn connected_anew(&mut self) {
        self.connected = true;
        self.untagged.clear();
        self.by_pkid.clear();
    }
}

/// The agent's handle on the link.
#[derive(Debug, Clone)]
pub struct Link {
    client: AsyncClient,
    tracking: Arc<Mutex<Tracking>>,
    go: Arc<tokio::sync::Notify>,
    subscribe_qos: QoS,
}

fn lock(m: &Mutex<Tracking>) -> MutexGuard<'_, Tracking> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a publish was not handed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotSent {
    /// Not connected: keep it for later.
    #[error("not connected")]
    Offline,
    /// The client's queue is full: try again later.
    #[error("the outgoing queue is full")]
    Busy,
}

impl Link {
    /// Hands a QoS 1 publish to the client if connected.
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        tag: Tag,
    ) -> Result<(), NotSent> {
        let mut t = lock(&self.tracking);
        if !t.connected {
            return Err(NotSent::Offline);
        }
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|_| NotSent::Busy)?;
        t.untagged.push_back(tag);
        Ok(())
    }

    /// Subscribes at the brokers' subscription QoS, 1 unless set (if
    /// connected; subscriptions are renewed on connect).
    pub fn subscribe(&self, filter: &str) -> Result<(), NotSent> {
        let t = lock(&self.tracking);
        if !t.connected {
            return Err(NotSent::Offline);
        }
        self.client
            .try_subscribe(filter, self.subscribe_qos)
            .map_err(|_| NotSent::Busy)
    }

    /// Unsubscribes (if connected).
    pub fn unsubscribe(&self, filter: &str) -> Result<(), NotSent> {
        let t = lock(&self.tracking);
        if !t.connected {
            return Err(NotSent::Offline);
        }
        self.client
            .try_unsubscribe(filter)
            .map_err(|_| NotSent::Busy)
    }

    /// The last will used from the next connect on (the retained offline state).
    pub fn set_will(&self, topic: &str, payload: Vec<u8>) {
        lock(&self.tracking).will = Some(LastWill::new(topic, payload, QoS::AtLeastOnce, true));
    }

    /// Whether the link is up.
    pub fn is_connected(&self) -> bool {
        lock(&self.tracking).connected
    }

    /// Lets the link connect: it waits for this so that the first connection
    /// already carries the will set with [`Link::set_will`] (without it, a
    /// device that lost its first connection would never be marked offline).
    pub fn connect(&self) {
        self.go.notify_one();
    }

    /// Disconnects cleanly (the broker does not send the will).
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

/// In a second, tells the daemon to subscribe and announce again, as after
/// a connect.
fn announce_later(events: &mpsc::Sender<LinkEvent>) {
    let events = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = events.send(LinkEvent::Connected).await;
    });
}

/// Whether the broker refused any subscription of this SUBACK.
pub fn refused(ack: &rumqttc::SubAck) -> bool {
    ack.return_codes
        .iter()
        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
}

/// A random number (the OS generator; the clock if it fails).
pub fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos().into())
    })
}

/// After a connection error: drains the requests queued for the old
/// connection (they are resent from the spool instead), forgets its packet
/// ids, and sets the current will for the next connect. Returns whether the
/// link was connected.
fn forget_connection(eventloop: &mut rumqttc::EventLoop, tracking: &Mutex<Tracking>) -> bool {
    let mut t = lock(tracking);
    let was_connected = t.connected;
    t.connected = false;
    eventloop.clean();
    eventloop.pending.clear();
    t.untagged.clear();
    t.by_pkid.clear();
    if let Some(will) = t.will.clone() {
        eventloop.mqtt_options.set_last_will(will);
    }
    was_connected
}

/// After a connection error: tells the daemon (unless it already knows the
/// broker is unreachable) and waits the backoff's next delay.
async fn wait_to_reconnect(
    error: &rumqttc::ConnectionError,
    was_connected: bool,
    backoff: &mut Backoff,
    events: &mpsc::Sender<LinkEvent>,
) -> Result<(), mpsc::error::SendError<LinkEvent>> {
    let delay = backoff.next_delay(random_u64());
    let detail = format!("{error}; retrying in {:.1} s", delay.as_secs_f64());
    let sent = if was_connected || backoff.attempt <= 1 {
        events.send(LinkEvent::Disconnected(detail)).await
    } else {
        tracing::debug!("broker unreachable: {detail}");
        Ok(())
    };
    tokio::time::sleep(delay).await;
    sent
}

/// Starts the link task. Once [`Link::connect`] is called it connects,
/// reconnects with backoff for ever, and sends what happens to `events`; it ends
/// when `events` is closed.
pub fn start(
    mut brokers: Brokers,
    events: mpsc::Sender<LinkEvent>,
) -> (Link, tokio::task::JoinHandle<()>) {
    let tracking = Arc::new(Mutex::new(Tracking {
        will: brokers.first().last_will(),
        ..Tracking::default()
    }));
    brokers.for_each(|o| {
        o.set_request_channel_capacity(256);
    });
    let (client, mut eventloop) = AsyncClient::new(brokers.first().clone(), 256);
    let go = Arc::new(tokio::sync::Notify::new());
    let link = Link {
        client,
        tracking: tracking.clone(),
        go: go.clone(),
        subscribe_qos: brokers.subscribe_qos(),
    };
    let task = tokio::spawn(async move {
        go.notified().await;
        if let Some(will) = lock(&tracking).will.clone() {
            eventloop.mqtt_options.set_last_will(will);
        }
        let mut backoff = Backoff::default();
        loop {
            let sent = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code == rumqttc::ConnectReturnCode::Success =>
                {
                    lock(&tracking).connected_anew();
                    backoff.reset();
                    events.send(LinkEvent::Connected).await
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    events
                        .send(LinkEvent::Message {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                        })
                        .await
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let tag = lock(&tracking).by_pkid.remove(&ack.pkid);
                    match tag {
                        Some(tag) if tag != Tag::None => {
                            events.send(LinkEvent::Delivered(tag)).await
                        }
                        _ => Ok(()),
                    }
                }
                // Refused for now (a NATS cluster electing a JetStream
                // leader after a node died): the daemon subscribes and
                // announces again in a second, as after a connect.
                Ok(Event::Incoming(Packet::SubAck(ack))) if refused(&ack) => {
                    tracing::warn!("the broker refused a subscription; asking again in 1 s");
                    announce_later(&events);
                    Ok(())
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    lock(&tracking).sent(pkid);
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    brokers.dial_next(&mut eventloop);
                    let was_connected = forget_connection(&mut eventloop, &tracking);
                    wait_to_reconnect(&e, was_connected, &mut backoff, &events).await
                }
            };
            if sent.is_err() {
                break;
            }
        }
    });
    (link, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_urls_is_a_broker_cluster_with_one_scheme() {
        let list = Endpoint::parse_list("mqtts://n1:8883, mqtts://n2:8884").expect("two");
        assert_eq!(
            list.iter()
                .map(|e| (e.host.as_str(), e.port))
                .collect::<Vec<_>>(),
            [("n1", 8883), ("n2", 8884)]
        );
        assert_eq!(
            Endpoint::parse_list("mqtts://n1:8883,mqtt://n2:1883"),
            Err(UrlError::MixedSchemes(
                "mqtts://n1:8883,mqtt://n2:1883".into()
            ))
        );
        assert!(Endpoint::parse_list("mqtts://n1:8883,").is_err());
        let mut brokers = Brokers::new(&list, |e| options("d1", e, None));
        assert_eq!(brokers.first().broker_address(), ("n1".into(), 8883));
        let mut eventloop = rumqttc::EventLoop::new(brokers.first().clone(), 1);
        assert_eq!(brokers.dial_next(&mut eventloop), ("n2".into(), 8884));
        assert_eq!(
            brokers.dial_next(&mut eventloop),
            ("n1".into(), 8883),
            "round the list"
        );
    }

    #[test]
    fn urls_parse_with_scheme_host_and_port() {
        assert_eq!(
            Endpoint::parse("mqtts://broker.local:8883"),
            Ok(Endpoint {
                host: "broker.local".into(),
                port: 8883,
                tls: true
            })
        );
        assert_eq!(
            Endpoint::parse("mqtt://[::1]:1883").map(|e| (e.host, e.tls)),
            Ok(("::1".into(), false))
        );
        for bad in [
            "broker:1883",
            "http://x:1",
            "mqtt://x",
            "mqtt://:1883",
            "mqtt://x:0",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let lows: Vec<Duration> = (0..6).map(|_| b.next_delay(0)).collect();
        assert_eq!(
            lows,
            [500, 1000, 2000, 4000, 4000, 4000].map(Duration::from_millis)
        );
        b.reset();
        for (i, ceiling) in [1u64, 2, 4, 8, 8].iter().enumerate() {
            let d = b.next_delay(u64::MAX - i as u64);
            assert!(d >= Duration::from_secs(*ceiling) / 2, "{d:?}");
            assert!(d < Duration::from_secs(*ceiling), "{d:?}");
        }
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(500));
    }
}

//! The gate's judge: what a device may send to the broker, decided packet by
//! packet with no I/O (the controller's gate, `controller/src/server/gate.rs`, does the
//! TLS and the relaying; docs/controller.md).
//!
//! Every packet is decoded with rumqttc's MQTT 3.1.1 codec, judged field by
//! field against the device the certificate names, and passes only if it is
//! byte for byte the codec's own encoding of those fields, so the broker reads
//! exactly what was judged. Its own crate so that it is fuzzed on its own
//! (`fuzz/fuzz_targets/gate.rs`) without the controller's dependencies.

use bytes::BytesMut;
use edgefleet_shared::DeviceId;
use edgefleet_shared::protocol::{self, DeviceState, DeviceTopic, Topic, Topics};
/// The codec the judge reads with (for tests and the fuzz target).
pub use rumqttc::mqttbytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet, Publish};

/// Largest packet a device may send (a fetch request or telemetry is far below).
pub const MAX_DEVICE_PACKET: usize = 1 << 20;

/// Why the gate closed a device's connection. Each names the field it judged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The bytes are not an MQTT 3.1.1 packet (the codec's reason).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// The packet decodes, but its bytes are not what its fields encode to:
    /// reserved bits set, bytes after its last field, a flag without its field
    /// or an overlong length. The broker could read such bytes differently from
    /// the gate, so only the canonical form is relayed.
    #[error(
        "packet type {0} is not in canonical MQTT 3.1.1 form (reserved bits, trailing bytes, a flag without its field, or an overlong length)"
    )]
    NotCanonical(u8),
    /// A packet only a server sends (CONNACK, SUBACK, ...).
    #[error("packet type {0} is not expected from a client")]
    NotFromClient(u8),
    /// Anything before CONNECT (MQTT 3.1.1, 3.1.0-1).
    #[error("the first packet must be CONNECT")]
    NotConnected,
    /// A second CONNECT on an open connection (MQTT 3.1.1, 3.1.0-2).
    #[error("a second CONNECT on an open connection")]
    SecondConnect,
    /// MQTT 3.1 or 5 (MQTT 5 never passes the gate, so none of its properties do).
    #[error("only MQTT 3.1.1 is accepted (got {name} level {level})")]
    Protocol { name: String, level: u8 },
    /// CONNECT under another client id than the certificate's device.
    #[error("client id {got:?} is not the certificate's device {device}")]
    ClientId { got: String, device: String },
    /// Devices authenticate by certificate; a user name could select another
    /// identity in a broker that reads it.
    #[error("devices authenticate by certificate: CONNECT may not carry a user name or password")]
    Login,
    /// A last will the device may not leave (docs/protocol.md, "Last will").
    #[error("{device}'s last will is refused: {why}")]
    Will { device: String, why: String },
    /// PUBLISH on a topic that is not one of the device's own upstream topics.
    #[error("{device} may not publish on {topic}")]
    Publish { device: String, topic: String },
    /// A retained PUBLISH other than the device's state.
    #[error("{device} may retain only its state, not a message on {topic}")]
    Retain { device: String, topic: String },
    /// QoS 2 is not part of the protocol.
    #[error("{device} published on {topic} at QoS 2; the protocol uses QoS 0 and 1")]
    Qos { device: String, topic: String },
    /// SUBSCRIBE to anything but the device's command topic and bundle chunks.
    #[error("{device} may not subscribe to {filter}")]
    Subscribe { device: String, filter: String },
}

/// What the gate decided about one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Relay it.
    Pass,
    /// Close the connection, for this reason.
    Refuse(Refusal),
}

/// Splits an MQTT fixed header: packet type and remaining length, with the
/// header's own length. `None` if more bytes are needed; `Err` if malformed.
pub fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, Refusal> {
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
    Err(Refusal::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// One device's connection as the gate sees it: which device the certificate
/// names and whether CONNECT has passed. Pure: takes whole packets, returns
/// verdicts; the controller's gate does the I/O.
///
/// Every packet is decoded with rumqttc's MQTT 3.1.1 codec, judged field by
/// field, and relayed only if it is byte for byte the codec's own encoding of
/// those fields, so the broker reads exactly what the gate judged.
#[derive(Debug, Clone)]
pub struct DeviceSession {
    topics: Topics,
    device: DeviceId,
    connected: bool,
}

impl DeviceSession {
    /// A connection from `device`'s certificate, before its CONNECT.
    pub fn new(topics: Topics, device: DeviceId) -> DeviceSession {
        DeviceSession {
            topics,
            device,
            connected: false,
        }
    }

    /// The device the certificate names.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Judges one whole packet (fixed header included).
    pub fn judge(&mut self, packet: &[u8]) -> Verdict {
        match self.check(packet) {
            Ok(()) => Verdict::Pass,
            Err(refusal) => Verdict::Refuse(refusal),
        }
    }

    fn check(&mut self, raw: &[u8]) -> Result<(), Refusal> {
        let kind = raw.first().map_or(0, |b| b >> 4);
        if kind == 1 {
            if self.connected {
                return Err(Refusal::SecondConnect);
            }
            protocol_level(raw)?;
        }
        let mut bytes = BytesMut::from(raw);
        let packet = Packet::read(&mut bytes, MAX_DEVICE_PACKET)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        if !bytes.is_empty() {
            return Err(Refusal::Malformed("bytes after the packet".into()));
        }
        let mut canonical = BytesMut::with_capacity(raw.len());
        if packet.write(&mut canonical, MAX_DEVICE_PACKET).is_err() || canonical[..] != *raw {
            return Err(Refusal::NotCanonical(kind));
        }
        match (&packet, self.connected) {
            (Packet::Connect(c), false) => {
                self.connect(c)?;
                self.connected = true;
                Ok(())
            }
            (_, false) => Err(Refusal::NotConnected),
            (Packet::Publish(p), true) => self.publish(p),
            (Packet::Subscribe(s), true) => s
                .filters
                .iter()
                .try_for_each(|f| self.may_subscribe(&f.path)),
            (Packet::Unsubscribe(u), true) => {
                u.topics.iter().try_for_each(|f| self.may_subscribe(f))
            }
            (
                Packet::PubAck(_)
                | Packet::PubRec(_)
                | Packet::PubRel(_)
                | Packet::PubComp(_)
                | Packet::PingReq
                | Packet::Disconnect,
                true,
            ) => Ok(()),
            (_, true) => Err(Refusal::NotFromClient(kind)),
        }
    }

    fn connect(&self, c: &Connect) -> Result<(), Refusal> {
        if c.client_id != self.device.as_str() {
            return Err(Refusal::ClientId {
                got: c.client_id.clone(),
                device: self.device.to_string(),
            });
        }
        if c.login.is_some() {
            return Err(Refusal::Login);
        }
        match &c.last_will {
            None => Ok(()),
            Some(will) => self.will(will),
        }
    }

    /// A will is the device's own offline state, as the agent leaves it
    /// (docs/protocol.md): the broker publishes it in the device's name later,
    /// when no packet of the connection can be judged any more.
    fn will(&self, will: &LastWill) -> Result<(), Refusal> {
        let refuse = |why: String| {
            Err(Refusal::Will {
                device: self.device.to_string(),
                why,
            })
        };
        let own = self.topics.device(&self.device, DeviceTopic::State);
        if will.topic != own {
            return refuse(format!(
                "its topic is {}, not the device's own state topic {own}",
                will.topic
            ));
        }
        if will.qos != QoS::AtLeastOnce || !will.retain {
            return refuse("it must be QoS 1 and retained, like the state it replaces".into());
        }
        let state: DeviceState = match protocol::decode(&will.message) {
            Ok(s) => s,
            Err(e) => return refuse(format!("its payload is not a device state: {e}")),
        };
        if state.device != self.device {
            return refuse(format!(
                "its state names device {}, not {}",
                state.device, self.device
            ));
        }
        if state.online {
            return refuse("its state says online; a will says the device went offline".into());
        }
        Ok(())
    }

    fn publish(&self, p: &Publish) -> Result<(), Refusal> {
        let kind = match self.topics.parse(&p.topic) {
            Some(Topic::Device { device, kind })
                if device == self.device && kind.device_publishes() =>
            {
                kind
            }
            _ => {
                return Err(Refusal::Publish {
                    device: self.device.to_string(),
                    topic: p.topic.clone(),
                });
            }
        };
        if p.retain && kind != DeviceTopic::State {
            return Err(Refusal::Retain {
                device: self.device.to_string(),
                topic: p.topic.clone(),
            });
        }
        if p.qos == QoS::ExactlyOnce {
            return Err(Refusal::Qos {
                device: self.device.to_string(),
                topic: p.topic.clone(),
            });
        }
        Ok(())
    }

    /// The device's command and telemetry-acknowledgement topics, bundle
    /// chunk topics, or all chunk topics (chunks are public to enrolled
    /// devices: a bundle is signed, not secret).
    fn may_subscribe(&self, filter: &str) -> Result<(), Refusal> {
        let own = self.topics.device(&self.device, DeviceTopic::Commands);
        let acks = self.topics.device(&self.device, DeviceTopic::Acks);
        let all_chunks = format!("{}/bundles/+/chunks", self.topics.prefix());
        let ok = filter == own
            || filter == acks
            || filter == all_chunks
            || matches!(self.topics.parse(filter), Some(Topic::BundleChunks { .. }));
        if ok {
            Ok(())
        } else {
            Err(Refusal::Subscribe {
                device: self.device.to_string(),
                filter: filter.to_string(),
            })
        }
    }
}

/// CONNECT's protocol name and level, read before the codec (which would take
/// an MQTT 5 CONNECT's properties for its client id) so that an MQTT 3.1 or 5
/// client is told plainly.
fn protocol_level(raw: &[u8]) -> Result<(), Refusal> {
    let short = || Refusal::Malformed("truncated CONNECT".into());
    let (_, _, head) = fixed_header(raw)?.ok_or_else(short)?;
    let body = &raw[head..];
    let len = usize::from(u16::from_be_bytes([
        *body.first().ok_or_else(short)?,
        *body.get(1).ok_or_else(short)?,
    ]));
    let name = body.get(2..2 + len).ok_or_else(short)?;
    let level = *body.get(2 + len).ok_or_else(short)?;
    if name != b"MQTT" || level != 4 {
        return Err(Refusal::Protocol {
            name: String::from_utf8_lossy(name).into_owned(),
            level,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::{Arch, UnixTime};
    use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, PubAck, Subscribe, Unsubscribe};

    const ME: &str = "pi-01";

    fn encode(p: Packet) -> Vec<u8> {
        let mut b = BytesMut::new();
        p.write(&mut b, MAX_DEVICE_PACKET).expect("encodes");
        b.to_vec()
    }

    fn session() -> DeviceSession {
        DeviceSession::new(Topics::default(), DeviceId::new(ME).expect("id"))
    }

    fn connected() -> DeviceSession {
        let mut s = session();
        assert_eq!(s.judge(&connect(ME, None)), Verdict::Pass);
        s
    }

    fn connect(client_id: &str, will: Option<LastWill>) -> Vec<u8> {
        let mut c = Connect::new(client_id);
        c.keep_alive = 30;
        c.last_will = will;
        encode(Packet::Connect(c))
    }

    fn state(device: &str, online: bool) -> Vec<u8> {
        protocol::encode(&DeviceState {
            device: DeviceId::new(device).expect("id"),
            at: UnixTime(1_800_000_000),
            online,
            agent_version: "6.6.6-forged".into(),
            arch: Arch::current(),
            slots: vec![],
            last_install: None,
        })
    }

    fn topic(device: &str, kind: &str) -> String {
        format!("edgefleet/v1/devices/{device}/{kind}")
    }

    /// The will the agent leaves: its own state topic, QoS 1, retained, offline.
    fn own_will() -> LastWill {
        LastWill::new(topic(ME, "state"), state(ME, false), QoS::AtLeastOnce, true)
    }

    fn publish(topic: &str, qos: QoS, retain: bool) -> Vec<u8> {
        let mut p = Publish::new(topic, qos, vec![0xa1, 0x01]);
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            p.pkid = 1;
        }
        encode(Packet::Publish(p))
    }

    fn subscribe(filters: &[&str]) -> Vec<u8> {
        let mut s = Subscribe::new(filters[0], QoS::AtLeastOnce);
        for f in &filters[1..] {
            s.add((*f).to_string(), QoS::AtLeastOnce);
        }
        s.pkid = 7;
        encode(Packet::Subscribe(s))
    }

    fn refused(v: Verdict) -> Refusal {
        match v {
            Verdict::Refuse(r) => r,
            Verdict::Pass => panic!("passed"),
        }
    }

    #[test]
    fn a_device_may_use_only_its_own_topics() {
        assert!(matches!(
            refused(session().judge(&connect("pi-02", None))),
            Refusal::ClientId { got, .. } if got == "pi-02"
        ));
        for own in ["state", "events", "telemetry", "fetch", "samples"] {
            let retain = own == "state";
            assert_eq!(
                connected().judge(&publish(&topic(ME, own), QoS::AtLeastOnce, retain)),
                Verdict::Pass,
                "{own}"
            );
        }
        for bad in [
            topic("pi-02", "telemetry"),
            topic(ME, "cmd"),
            "edgefleet/v1/bundles/aa/chunks".into(),
            "other/topic".into(),
        ] {
            assert!(
                matches!(
                    refused(connected().judge(&publish(&bad, QoS::AtLeastOnce, false))),
                    Refusal::Publish { .. }
                ),
                "{bad}"
            );
        }
        let digest = "ab".repeat(32);
        let chunks = format!("edgefleet/v1/bundles/{digest}/chunks");
        assert_eq!(
            connected().judge(&subscribe(&[&topic(ME, "cmd"), &chunks])),
            Verdict::Pass
        );
        assert_eq!(
            connected().judge(&encode(Packet::Unsubscribe(Unsubscribe {
                pkid: 8,
                topics: vec![chunks.clone()],
            }))),
            Verdict::Pass
        );
        for bad in [
            "edgefleet/v1/devices/+/cmd",
            "edgefleet/v1/#",
            &topic("pi-02", "cmd"),
        ] {
            assert!(
                matches!(
                    refused(connected().judge(&subscribe(&[&topic(ME, "cmd"), bad]))),
                    Refusal::Subscribe { .. }
                ),
                "{bad}"
            );
        }
        assert_eq!(connected().judge(&encode(Packet::PingReq)), Verdict::Pass);
        assert_eq!(
            connected().judge(&encode(Packet::PubAck(PubAck::new(3)))),
            Verdict::Pass
        );
        assert_eq!(
            connected().judge(&encode(Packet::Disconnect)),
            Verdict::Pass
        );
        assert_eq!(
            refused(connected().judge(&encode(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false
            ))))),
            Refusal::NotFromClient(2),
        );
    }

    #[test]
    fn retained_messages_other_than_state_and_qos_2_are_refused() {
        assert!(matches!(
            refused(connected().judge(&publish(&topic(ME, "telemetry"), QoS::AtLeastOnce, true))),
            Refusal::Retain { .. }
        ));
        assert!(matches!(
            refused(connected().judge(&publish(&topic(ME, "events"), QoS::ExactlyOnce, false))),
            Refusal::Qos { .. }
        ));
        assert_eq!(
            connected().judge(&publish(&topic(ME, "telemetry"), QoS::AtMostOnce, false)),
            Verdict::Pass
        );
    }

    #[test]
    fn a_will_passes_only_as_the_devices_own_offline_state() {
        assert_eq!(
            session().judge(&connect(ME, Some(own_will()))),
            Verdict::Pass
        );
        let will = |topic: String, payload: Vec<u8>, qos, retain| {
            refused(session().judge(&connect(
                ME,
                Some(LastWill::new(topic, payload, qos, retain)),
            )))
        };
        // Another device's topics, and the device's own topics other than state:
        // the broker would publish these later in the device's or the
        // controller's name (a forged command, telemetry or state).
        for (device, kind) in [
            ("pi-02", "cmd"),
            ("pi-02", "state"),
            ("pi-02", "telemetry"),
            ("pi-02", "events"),
            (ME, "cmd"),
            (ME, "telemetry"),
            (ME, "events"),
        ] {
            let r = will(
                topic(device, kind),
                state(ME, false),
                QoS::AtLeastOnce,
                true,
            );
            assert!(
                matches!(&r, Refusal::Will { why, .. } if why.contains("not the device's own state topic")),
                "{device}/{kind}: {r}"
            );
        }
        for (payload, qos, retain, says) in [
            (
                state(ME, false),
                QoS::AtMostOnce,
                true,
                "QoS 1 and retained",
            ),
            (
                state(ME, false),
                QoS::AtLeastOnce,
                false,
                "QoS 1 and retained",
            ),
            (
                state(ME, false),
                QoS::ExactlyOnce,
                true,
                "QoS 1 and retained",
            ),
            (
                b"offline".to_vec(),
                QoS::AtLeastOnce,
                true,
                "not a device state",
            ),
            (vec![], QoS::AtLeastOnce, true, "not a device state"),
            (
                state("pi-02", false),
                QoS::AtLeastOnce,
                true,
                "names device pi-02",
            ),
            (state(ME, true), QoS::AtLeastOnce, true, "says online"),
        ] {
            let r = will(topic(ME, "state"), payload, qos, retain);
            assert!(
                matches!(&r, Refusal::Will { why, .. } if why.contains(says)),
                "{says}: {r}"
            );
        }
    }

    #[test]
    fn one_connect_first_and_only_once() {
        assert_eq!(
            refused(session().judge(&publish(&topic(ME, "telemetry"), QoS::AtLeastOnce, false))),
            Refusal::NotConnected
        );
        assert_eq!(
            refused(session().judge(&encode(Packet::PingReq))),
            Refusal::NotConnected
        );
        let mut s = connected();
        assert_eq!(
            refused(s.judge(&connect(ME, Some(own_will())))),
            Refusal::SecondConnect
        );
    }

    #[test]
    fn logins_and_other_protocol_levels_are_refused() {
        let mut c = Connect::new(ME);
        c.set_login("admin", "secret");
        assert_eq!(
            refused(session().judge(&encode(Packet::Connect(c)))),
            Refusal::Login
        );
        let mut five = connect(ME, None);
        five[8] = 5;
        assert_eq!(
            refused(session().judge(&five)),
            Refusal::Protocol {
                name: "MQTT".into(),
                level: 5
            }
        );
        let mut v31 = vec![0x10, 0];
        v31.extend_from_slice(&[0, 6]);
        v31.extend_from_slice(b"MQIsdp");
        v31.extend_from_slice(&[3, 2, 0, 30, 0, 5]);
        v31.extend_from_slice(ME.as_bytes());
        v31[1] = (v31.len() - 2) as u8;
        assert!(matches!(
            refused(session().judge(&v31)),
            Refusal::Protocol { level: 3, .. }
        ));
    }

    #[test]
    fn bytes_the_codec_would_not_write_are_refused() {
        // CONNECT: reserved flag bit, bytes after the client id, a will QoS
        // without the will flag, a user-name flag with an empty name.
        let plain = connect(ME, None);
        let flags_at = 2 + 6 + 1;
        for (what, bad) in [
            ("reserved bit", {
                let mut b = plain.clone();
                b[flags_at] |= 0x01;
                b
            }),
            ("trailing bytes", {
                let mut b = plain.clone();
                b.extend_from_slice(&[0, 0]);
                b[1] += 2;
                b
            }),
            ("will QoS without will", {
                let mut b = plain.clone();
                b[flags_at] |= 0x08;
                b
            }),
            ("user-name flag, empty name", {
                let mut b = plain.clone();
                b[flags_at] |= 0x80;
                b.extend_from_slice(&[0, 0]);
                b[1] += 2;
                b
            }),
            ("CONNECT flags in the fixed header", {
                let mut b = plain.clone();
                b[0] |= 0x01;
                b
            }),
            ("overlong remaining length", {
                let mut b = vec![0x10, 0x80 | plain[1], 0x00];
                b.extend_from_slice(&plain[2..]);
                b
            }),
        ] {
            assert!(
                matches!(
                    refused(session().judge(&bad)),
                    Refusal::NotCanonical(1) | Refusal::Malformed(_)
                ),
                "{what}"
            );
        }
        // Other packets: a PINGREQ with a body, a PUBACK with reason code and
        // properties (MQTT 5 form), SUBSCRIBE options with reserved bits.
        assert!(matches!(
            refused(connected().judge(&[0xc0, 0x01, 0x00])),
            Refusal::NotCanonical(12) | Refusal::Malformed(_)
        ));
        assert!(matches!(
            refused(connected().judge(&[0x40, 0x04, 0x00, 0x03, 0x00, 0x00])),
            Refusal::NotCanonical(4)
        ));
        let mut sub = subscribe(&[&topic(ME, "cmd")]);
        *sub.last_mut().expect("options") |= 0x40;
        assert!(matches!(
            refused(connected().judge(&sub)),
            Refusal::NotCanonical(8)
        ));
        assert!(matches!(
            refused(connected().judge(&[0x30, 0x03, 0x00, 0x32, b'a'])),
            Refusal::Malformed(_)
        ));
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

    fn arbitrary_will() -> impl proptest::strategy::Strategy<Value = Option<LastWill>> {
        use proptest::prelude::*;
        let topics = prop::sample::select(vec![
            topic(ME, "state"),
            topic(ME, "cmd"),
            topic(ME, "telemetry"),
            topic("pi-02", "state"),
            topic("pi-02", "cmd"),
            "edgefleet/v1/devices/+/state".to_string(),
            String::new(),
        ]);
        let payloads = prop_oneof![
            Just(state(ME, false)),
            Just(state(ME, true)),
            Just(state("pi-02", false)),
            proptest::collection::vec(any::<u8>(), 0..32),
        ];
        let qos = prop::sample::select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]);
        proptest::option::of(
            (topics, payloads, qos, any::<bool>())
                .prop_map(|(t, p, q, r)| LastWill::new(t, p, q, r)),
        )
    }

    proptest::proptest! {
        #[test]
        fn the_judge_never_panics(kind in 0u8..16, flags in 0u8..16, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut packet = vec![kind << 4 | flags, body.len() as u8];
            packet.extend_from_slice(&body);
            let _ = session().judge(&packet);
            let _ = connected().judge(&packet);
            let _ = fixed_header(&body);
        }

        /// Differential against rumqttc's codec: a CONNECT with any combination
        /// of optional fields, encoded by the codec, passes exactly when every
        /// field is one the device may send.
        #[test]
        fn a_connect_passes_exactly_when_every_field_is_the_devices_own(
            id in proptest::sample::select(vec![ME, "pi-02", "", "pi-01 "]),
            keep_alive in proptest::prelude::any::<u16>(),
            clean in proptest::prelude::any::<bool>(),
            will in arbitrary_will(),
            login in proptest::option::of(("[a-z]{0,3}", "[a-z]{0,3}")),
        ) {
            let mut c = Connect::new(id);
            c.keep_alive = keep_alive;
            c.clean_session = clean;
            c.last_will = will.clone();
            if let Some((u, p)) = &login {
                c.set_login(u.clone(), p.clone());
            }
            let bytes = encode(Packet::Connect(c));
            let has_login = login.is_some_and(|(u, p)| !u.is_empty() || !p.is_empty());
            let will_ok = will.is_none_or(|w| {
                w.topic == topic(ME, "state")
                    && w.qos == QoS::AtLeastOnce
                    && w.retain
                    && w.message[..] == state(ME, false)[..]
            });
            let expected = id == ME && !has_login && will_ok;
            let verdict = session().judge(&bytes);
            proptest::prop_assert_eq!(verdict == Verdict::Pass, expected, "{:?}", verdict);
        }
    }
}

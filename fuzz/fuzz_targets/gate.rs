//! The gate's judge (`edgefleet-gate`) against rumqttc's MQTT codec.
//!
//! Mode 1, raw packets: any bytes, cut into packets by their fixed headers and
//! judged in turn: a refusal, never a panic; every packet that passes is one the
//! codec reads and writes back byte for byte (so the broker reads what was
//! judged).
//!
//! Mode 2, differential: a CONNECT built by the codec from fuzzed fields (client
//! id, login, clean session, keep-alive, and a will with every optional field:
//! topic, QoS, retain, payload) passes exactly when the rules, restated here on
//! the decoded fields, say it may; the same CONNECT with one byte changed either
//! is refused or decodes to fields the rules accept.
#![no_main]

use bytes::BytesMut;
use edgefleet_gate::mqttbytes::QoS;
use edgefleet_gate::mqttbytes::v4::{Connect, LastWill, Login, Packet};
use edgefleet_gate::{DeviceSession, MAX_DEVICE_PACKET, Verdict, fixed_header};
use edgefleet_shared::protocol::{self, DeviceState, DeviceTopic, Topics};
use edgefleet_shared::{Arch, DeviceId, UnixTime};
use libfuzzer_sys::fuzz_target;

const ME: &str = "pi-01";

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn text(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

fn me() -> DeviceId {
    DeviceId::new(ME).expect("id")
}

fn session() -> DeviceSession {
    DeviceSession::new(Topics::default(), me())
}

fn state(device: &str, online: bool) -> Vec<u8> {
    protocol::encode(&DeviceState {
        device: DeviceId::new(device).expect("id"),
        at: UnixTime(1_800_000_000),
        online,
        agent_version: "1.0.0".into(),
        arch: Arch::current(),
        slots: vec![],
        last_install: None,
    })
}

fn qos(b: u8) -> QoS {
    match b % 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The rules of docs/controller.md for a CONNECT, on its decoded fields.
fn allowed(c: &Connect) -> bool {
    let own_state = Topics::default().device(&me(), DeviceTopic::State);
    c.client_id == ME
        && c.login.is_none()
        && c.last_will.as_ref().is_none_or(|w| {
            w.topic == own_state
                && w.qos == QoS::AtLeastOnce
                && w.retain
                && protocol::decode::<DeviceState>(&w.message)
                    .is_ok_and(|s| s.device.as_str() == ME && !s.online)
        })
}

fn encode(p: Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, MAX_DEVICE_PACKET).expect("the codec writes what it built");
    b.to_vec()
}

fn raw_packets(data: &[u8]) {
    let mut s = session();
    let mut buf = data;
    while let Ok(Some((_, len, head))) = fixed_header(buf) {
        let Some(packet) = buf.get(..head + len) else {
            break;
        };
        if let Verdict::Refuse(_) = s.judge(packet) {
            break;
        }
        let mut read = BytesMut::from(packet);
        let decoded =
            Packet::read(&mut read, MAX_DEVICE_PACKET).expect("a packet that passed decodes");
        assert!(read.is_empty(), "a packet that passed has no trailing bytes");
        assert_eq!(encode(decoded), packet, "a packet that passed is canonical");
        buf = &buf[head + len..];
    }
}

fn connect_fields(r: &mut Reader<'_>) {
    let choice = r.byte();
    let client_id = match choice % 3 {
        0 => ME.to_string(),
        1 => "pi-02".to_string(),
        _ => r.text(),
    };
    let mut c = Connect::new(client_id);
    c.keep_alive = u16::from_le_bytes([r.byte(), r.byte()]);
    c.clean_session = r.byte() & 1 == 1;
    let flags = r.byte();
    if flags & 1 == 1 {
        let (user, pass) = (r.text(), r.text());
        c.login = Some(Login::new(user, pass));
    }
    if flags & 2 == 2 {
        let topic = match r.byte() % 5 {
            0 | 1 => format!("edgefleet/v1/devices/{ME}/state"),
            2 => "edgefleet/v1/devices/pi-02/state".to_string(),
            3 => format!("edgefleet/v1/devices/{ME}/telemetry"),
            _ => r.text(),
        };
        let message = match r.byte() % 5 {
            0 | 1 => state(ME, false),
            2 => state(ME, true),
            3 => state("pi-02", false),
            _ => r.bytes().to_vec(),
        };
        c.last_will = Some(LastWill::new(topic, message, qos(r.byte()), r.byte() & 1 == 1));
    }
    let bytes = encode(Packet::Connect(c));
    // The rules apply to what is on the wire: the codec writes no login for
    // an empty user name and password (found by this target: judging the
    // fields as built called that CONNECT a login).
    let mut read = BytesMut::from(&bytes[..]);
    let expected = match Packet::read(&mut read, MAX_DEVICE_PACKET) {
        Ok(Packet::Connect(decoded)) => allowed(&decoded),
        other => panic!("the codec cannot read the CONNECT it wrote: {other:?}"),
    };
    let verdict = session().judge(&bytes);
    assert_eq!(
        verdict == Verdict::Pass,
        expected,
        "judge {verdict:?}, rules say {expected}"
    );
    // One byte changed: refused, or the fields it now carries are allowed.
    let (at, flip) = (usize::from(r.byte()) | usize::from(r.byte()) << 8, r.byte());
    if flip != 0 && !bytes.is_empty() {
        let mut changed = bytes.clone();
        let i = at % changed.len();
        changed[i] ^= flip;
        if session().judge(&changed) == Verdict::Pass {
            let mut read = BytesMut::from(&changed[..]);
            match Packet::read(&mut read, MAX_DEVICE_PACKET) {
                Ok(Packet::Connect(c)) => assert!(allowed(&c), "a changed CONNECT passed: {c:?}"),
                other => panic!("a changed CONNECT passed as {other:?}"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    if r.byte() & 1 == 0 {
        raw_packets(r.0);
    } else {
        connect_fields(&mut r);
    }
});

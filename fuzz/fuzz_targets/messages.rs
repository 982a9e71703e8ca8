//! Every MQTT message decoder on arbitrary bytes: an error, never a panic. A
//! message that decodes must re-encode and decode to the same value.
#![no_main]

use edgefleet_shared::protocol::*;
use libfuzzer_sys::fuzz_target;

fn check<T: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(msg) = decode::<T>(data) {
        let again: T = decode(&encode(&msg)).expect("a decoded message re-encodes");
        assert_eq!(again, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Command>(data);
    check::<edgefleet_shared::commands::SignedCommand>(data);
    // The device's whole check of a command payload: a refusal, never a panic.
    let key = edgefleet_shared::SecretKey::from_seed([3; 32]);
    let policy = edgefleet_shared::commands::CommandPolicy {
        key: key.public(),
        device: edgefleet_shared::DeviceId::new("pi-01").expect("id"),
        max_age_s: 3600,
        max_ahead_s: 300,
    };
    let _ = edgefleet_shared::commands::open_command(
        data,
        &policy,
        edgefleet_shared::UnixTime(1_800_000_000),
        &Default::default(),
    );
    check::<DeviceState>(data);
    check::<Event>(data);
    check::<Telemetry>(data);
    check::<Chunk>(data);
    check::<FetchRequest>(data);
    check::<SampleUpload>(data);
    check::<TelemetryAck>(data);
});

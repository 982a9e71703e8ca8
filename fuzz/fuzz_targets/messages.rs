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
    check::<DeviceState>(data);
    check::<Event>(data);
    check::<Telemetry>(data);
    check::<Chunk>(data);
    check::<FetchRequest>(data);
    check::<SampleUpload>(data);
});

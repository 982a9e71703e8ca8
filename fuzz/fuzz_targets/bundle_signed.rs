//! Reaches past the signature check: the fuzzer's bytes are split into a manifest
//! and a payload, and the harness signs the manifest with a trusted key. Exercises
//! manifest decoding and validation and the streaming payload verifier.
#![no_main]

use edgefleet_shared::bundle::{DiscardSink, RawHeader, verify_stream};
use edgefleet_shared::{Limits, Policy, SecretKey, TrustRoot, UnixTime};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (usize::from(u16::from_be_bytes([data[0], data[1]]))).min(data.len() - 2);
    let (manifest, payload) = data[2..].split_at(split);
    if manifest.is_empty() {
        return;
    }
    let key = SecretKey::from_seed([1; 32]);
    let root = TrustRoot::new(1, UnixTime(i64::MAX), 1, vec![key.public()]);
    let policy = Policy { trust: &root, role: edgefleet_shared::trust::Role::Models, now: UnixTime(0), limits: Limits::default(), installed: None, device: None };
    let mut header = RawHeader { manifest_bytes: manifest.to_vec(), signatures: vec![] };
    header.sign(&key);
    let bundle = [header.to_bytes(), payload.to_vec()].concat();
    let _ = verify_stream(bundle.as_slice(), &policy, &mut DiscardSink);
});

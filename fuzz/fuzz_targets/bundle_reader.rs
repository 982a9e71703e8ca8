//! Arbitrary bytes as a bundle file: the reader must refuse them with a reason,
//! never panic, never read past its caps.
#![no_main]

use edgefleet_shared::bundle::{DiscardSink, RawHeader, verify_stream};
use edgefleet_shared::{Limits, Policy, SecretKey, TrustRoot, UnixTime};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = TrustRoot::new(1, UnixTime(i64::MAX), 1, vec![SecretKey::from_seed([1; 32]).public()]);
    let policy = Policy { trust: &root, role: edgefleet_shared::trust::Role::Models, now: UnixTime(0), limits: Limits::default(), installed: None, device: None };
    let _ = verify_stream(data, &policy, &mut DiscardSink);
    let _ = RawHeader::parse(data);
});

//! The other decoders of outside input: trust root files, golden cases,
//! reference statistics artifacts and joined sample uploads.
#![no_main]

use edgefleet_shared::SignedTrustRoot;
use edgefleet_shared::UnixTime;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = SignedTrustRoot::from_bytes(data) {
        let _ = root.verify_self(UnixTime(0));
        if let Ok(doc) = root.decode() {
            let _ = doc.accept_rotation(&root, UnixTime(0));
        }
    }
    let _ = edgefleet_shared::golden::GoldenSet::from_bytes(data);
    let _ = edgefleet_shared::reference::ReferenceStats::from_bytes(data);
    let _ = edgefleet_shared::protocol::SampleBatch::from_bytes(data);
});

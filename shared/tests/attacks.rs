//! Table-driven attacks: each bad bundle is built from a good one and must be
//! refused with exactly the expected reason. Plus properties that hold for every
//! truncation point and every single-byte change.

use edgefleet_shared::bundle::{
    ArtifactInput, ArtifactSource, DeviceFacts, DiscardSink, InstalledRelease, ManifestDraft,
    manifest_bytes, prepare_manifest, verify_chunk, verify_stream, write_bundle,
};
use edgefleet_shared::manifest::{
    ArtifactKind, Constraints, Dim, ElementType, HealthPolicy, Manifest, ModelSchema, TensorSpec,
};
use edgefleet_shared::unpack::{UnpackStream, unpack_to_dir};
use edgefleet_shared::{
    Arch, ArtifactName, Limits, ModelChannel, Policy, RawHeader, Refusal, SecretKey, TrustRoot,
    UnixTime, VerifiedHeader,
};
use proptest::prelude::*;

const NOW: UnixTime = UnixTime(1_800_000_000);

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn name(s: &str) -> ArtifactName {
    ArtifactName::new(s).expect("valid artifact name")
}

fn draft(release: u64) -> ManifestDraft {
    ManifestDraft {
        channel: ModelChannel::new("iris").expect("valid channel"),
        version: semver::Version::new(1, 2, release),
        release,
        created_at: NOW.plus_days(-1),
        expires_at: NOW.plus_days(30),
        schema: ModelSchema {
            inputs: vec![TensorSpec {
                name: "x".into(),
                dtype: ElementType::F32,
                shape: vec![Dim::Symbol("N".into()), Dim::Fixed(4)],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: ElementType::I64,
                shape: vec![Dim::Symbol("N".into())],
            }],
        },
        constraints: Constraints {
            architectures: vec![
                Arch::new("x86_64").expect("arch"),
                Arch::new("aarch64").expect("arch"),
            ],
            min_agent_version: "0.1.0".into(),
            memory_bytes: 1 << 20,
        },
        health: HealthPolicy::default(),
        chunk_size: 4096,
    }
}

fn model_bytes(seed: u8) -> Vec<u8> {
    (0..10_000u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn inputs(seed: u8) -> Vec<ArtifactInput> {
    vec![
        ArtifactInput {
            name: name("model.onnx"),
            kind: ArtifactKind::Model,
            source: ArtifactSource::Bytes(model_bytes(seed)),
        },
        ArtifactInput {
            name: name("golden.cbor"),
            kind: ArtifactKind::Golden,
            source: ArtifactSource::Bytes(b"golden cases".to_vec()),
        },
    ]
}

/// Builds a bundle from a manifest, signed by `signers`, with `inputs` as payload.
fn assemble(manifest: &Manifest, inputs: &[ArtifactInput], signers: &[&SecretKey]) -> Vec<u8> {
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(manifest),
        signatures: vec![],
    };
    for s in signers {
        header.sign(s);
    }
    let mut out = Vec::new();
    write_bundle(&mut out, &header, inputs).expect("writing to memory");
    out
}

fn good_manifest(release: u64, seed: u8) -> Manifest {
    prepare_manifest(&draft(release), &inputs(seed)).expect("hashing in memory")
}

fn trust(threshold: u16) -> TrustRoot {
    TrustRoot::new(
        1,
        NOW.plus_days(365),
        threshold,
        vec![key(1).public(), key(2).public(), key(3).public()],
    )
}

/// The rules at `NOW` for a device with nothing installed and no constraints checked.
fn plain_policy(trust: &TrustRoot) -> Policy<'_> {
    Policy {
        trust,
        role: edgefleet_shared::trust::Role::Models,
        now: NOW,
        limits: Limits::default(),
        installed: None,
        device: None,
    }
}

fn device() -> DeviceFacts {
    DeviceFacts {
        arch: Arch::new("aarch64").expect("arch"),
        agent_version: semver::Version::new(0, 1, 0),
        memory_available: 512 << 20,
    }
}

struct Case {
    name: &'static str,
    bundle: Vec<u8>,
    trust: TrustRoot,
    now: UnixTime,
    limits: Limits,
    installed: Option<InstalledRelease>,
    device: DeviceFacts,
}

impl Case {
    fn new(name: &'static str, bundle: Vec<u8>) -> Case {
        Case {
            name,
            bundle,
            trust: trust(2),
            now: NOW,
            limits: Limits::default(),
            installed: None,
            device: device(),
        }
    }

    fn run(&self) -> Result<edgefleet_shared::VerifiedHeader, Refusal> {
        let policy = Policy {
            trust: &self.trust,
            role: edgefleet_shared::trust::Role::Models,
            now: self.now,
            limits: self.limits,
            installed: self.installed.as_ref(),
            device: Some(&self.device),
        };
        verify_stream(self.bundle.as_slice(), &policy, &mut DiscardSink).map_err(|e| {
            e.refusal()
                .cloned()
                .expect("in-memory reads are not I/O errors")
        })
    }
}

fn good() -> Vec<u8> {
    assemble(&good_manifest(3, 0), &inputs(0), &[&key(1), &key(2)])
}

fn manifest_range(bundle: &[u8]) -> std::ops::Range<usize> {
    let len = u32::from_be_bytes([bundle[12], bundle[13], bundle[14], bundle[15]]) as usize;
    16..16 + len
}

fn payload_start(bundle: &[u8]) -> usize {
    let m = manifest_range(bundle);
    let sig_len =
        u32::from_be_bytes(bundle[m.end..m.end + 4].try_into().expect("4 bytes")) as usize;
    m.end + 4 + sig_len
}

#[test]
fn a_good_bundle_verifies_and_names_its_signers() {
    let header = Case::new("good", good())
        .run()
        .expect("good bundle verifies");
    assert_eq!(header.manifest.release, 3);
    assert_eq!(header.signed_by, {
        let mut v = vec![key(1).public().id(), key(2).public().id()];
        v.sort();
        v
    });
}

#[test]
fn every_attack_is_refused_with_its_exact_reason() {
    let mut cases: Vec<(Case, Refusal)> = Vec::new();
    let m = good_manifest(3, 0);

    // Tampered artifact: one byte of the model changed.
    let mut b = good();
    let p = payload_start(&b);
    b[p + 8 + 5000] ^= 0x01;
    cases.push((
        Case::new("tampered artifact", b),
        Refusal::ChunkDigestMismatch { index: 1 },
    ));

    // Tampered manifest: the release changed after signing (same length).
    let mut b = good();
    let range = manifest_range(&b);
    let needle = manifest_bytes(&m);
    let mut forged = m.clone();
    forged.release = 9;
    let forged_bytes = manifest_bytes(&forged);
    assert_eq!(needle.len(), forged_bytes.len());
    b[range].copy_from_slice(&forged_bytes);
    cases.push((
        Case::new("tampered manifest", b),
        Refusal::InvalidSignature {
            key: key(1).public().id(),
        },
    ));

    // Unknown key: signed by keys outside the trust root.
    let b = assemble(&m, &inputs(0), &[&key(8), &key(9)]);
    cases.push((
        Case::new("unknown key", b),
        Refusal::UnknownKey {
            key: key(8).public().id(),
        },
    ));

    // Too few valid signatures: 1 of the required 2.
    let b = assemble(&m, &inputs(0), &[&key(1)]);
    cases.push((
        Case::new("too few", b),
        Refusal::TooFewSignatures {
            valid: 1,
            threshold: 2,
        },
    ));

    // Duplicate signatures by one key count once.
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(&m),
        signatures: vec![],
    };
    header.sign(&key(1));
    let dup = header.signatures[0].clone();
    header.signatures.push(dup.clone());
    header.signatures.push(dup);
    let mut b = Vec::new();
    write_bundle(&mut b, &header, &inputs(0)).expect("memory");
    cases.push((
        Case::new("duplicate signatures", b),
        Refusal::TooFewSignatures {
            valid: 1,
            threshold: 2,
        },
    ));

    // Expired manifest.
    let mut c = Case::new("expired manifest", good());
    c.now = NOW.plus_days(31);
    cases.push((
        c,
        Refusal::ManifestExpired {
            expired_at: NOW.plus_days(30),
        },
    ));

    // Expired trust root.
    let mut c = Case::new("expired trust root", good());
    c.trust.expires_at = NOW.plus_secs(-1);
    cases.push((
        c,
        Refusal::TrustRootExpired {
            version: 1,
            expired_at: NOW.plus_secs(-1),
        },
    ));

    // Rollback: release 3 offered, 5 installed.
    let mut c = Case::new("rollback", good());
    c.installed = Some(InstalledRelease {
        release: 5,
        manifest_digest: edgefleet_shared::Digest::of(b"other"),
    });
    cases.push((
        c,
        Refusal::Rollback {
            channel: m.channel.clone(),
            release: 3,
            installed: 5,
        },
    ));

    // Same release with different content.
    let mut c = Case::new("release reused", good());
    c.installed = Some(InstalledRelease {
        release: 3,
        manifest_digest: edgefleet_shared::Digest::of(b"other"),
    });
    cases.push((
        c,
        Refusal::ReleaseReused {
            channel: m.channel.clone(),
            release: 3,
        },
    ));

    // Artifact larger in the file than declared (signed manifest says 10000).
    let mut longer = inputs(0);
    longer[0].source = ArtifactSource::Bytes([model_bytes(0), vec![7; 100]].concat());
    let b = assemble(&m, &longer, &[&key(1), &key(2)]);
    cases.push((
        Case::new("artifact over declared size", b),
        Refusal::ArtifactSizeMismatch {
            name: name("model.onnx"),
            declared: 10_000,
            found: 10_100,
        },
    ));

    // Artifact over the global cap.
    let mut c = Case::new("artifact over global cap", good());
    c.limits.max_artifact_size = 9_999;
    cases.push((
        c,
        Refusal::ArtifactTooLarge {
            name: name("model.onnx"),
            size: 10_000,
            limit: 9_999,
        },
    ));

    // Payload over the global cap.
    let mut c = Case::new("payload over global cap", good());
    c.limits.max_payload_size = 10_000;
    cases.push((
        c,
        Refusal::PayloadTooLarge {
            size: 10_028,
            limit: 10_000,
        },
    ));

    // Artifact whose hash in the (validly signed) manifest is wrong.
    let mut wrong = m.clone();
    wrong.artifacts[1].sha256 = edgefleet_shared::Digest::of(b"not the golden cases");
    let b = assemble(&wrong, &inputs(0), &[&key(1), &key(2)]);
    cases.push((
        Case::new("artifact digest", b),
        Refusal::ArtifactDigestMismatch {
            name: name("golden.cbor"),
        },
    ));

    // Truncated in each section.
    let g = good();
    let m_range = manifest_range(&g);
    let p = payload_start(&g);
    for (cut, section) in [
        (5, "preamble"),
        (12, "preamble"),
        (m_range.start + 10, "manifest"),
        (m_range.end + 2, "signature block"),
        (m_range.end + 10, "signature block"),
        (p + 3, "artifact model.onnx"),
        (p + 8 + 9_000, "artifact model.onnx"),
        (g.len() - 1, "artifact golden.cbor"),
    ] {
        cases.push((
            Case::new("truncated", g[..cut].to_vec()),
            Refusal::Truncated {
                section: section.into(),
            },
        ));
    }

    // Trailing garbage.
    let mut b = good();
    b.extend_from_slice(b"junk");
    cases.push((Case::new("trailing garbage", b), Refusal::TrailingBytes));

    // Wrong magic, wrong version, nonzero flags, oversized manifest length.
    let mut b = good();
    b[0] = b'P';
    cases.push((Case::new("wrong magic", b), Refusal::BadMagic));
    let mut b = good();
    b[9] = 2;
    cases.push((
        Case::new("wrong version", b),
        Refusal::UnsupportedFormat { found: 2 },
    ));
    let mut b = good();
    b[11] = 1;
    cases.push((
        Case::new("unknown flags", b),
        Refusal::UnsupportedFormat { found: 1 },
    ));
    let mut b = good();
    b[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    cases.push((
        Case::new("manifest length over cap", b),
        Refusal::SectionTooLarge {
            section: "manifest".into(),
            size: u32::MAX.into(),
            limit: 1 << 20,
        },
    ));

    // Constraints not met: architecture, agent version, memory.
    let mut c = Case::new("architecture", good());
    c.device.arch = Arch::new("riscv64").expect("arch");
    cases.push((
        c,
        Refusal::ArchitectureNotSupported {
            device: Arch::new("riscv64").expect("arch"),
            supported: m.constraints.architectures.clone(),
        },
    ));
    let mut old = draft(3);
    old.constraints.min_agent_version = "2.0.0".into();
    let b = assemble(
        &prepare_manifest(&old, &inputs(0)).expect("memory"),
        &inputs(0),
        &[&key(1), &key(2)],
    );
    cases.push((
        Case::new("agent too old", b),
        Refusal::AgentTooOld {
            required: "2.0.0".into(),
            agent: "0.1.0".into(),
        },
    ));
    let mut c = Case::new("memory", good());
    c.device.memory_available = 1000;
    cases.push((
        c,
        Refusal::InsufficientMemory {
            required: 1 << 20,
            available: 1000,
        },
    ));

    let mut failures = Vec::new();
    for (case, want) in &cases {
        match case.run() {
            Err(got) if &got == want => {}
            other => failures.push(format!("{}: expected {want:?}, got {other:?}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} attacks misjudged:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(cases.len() >= 28, "the table shrank to {}", cases.len());
}

#[test]
fn chunks_arriving_over_the_wire_are_checked_against_the_signed_table() {
    let g = good();
    let m = good_manifest(3, 0);
    let payload = &g[payload_start(&g)..];
    for i in 0..m.payload.chunks.len() as u32 {
        let (start, end) = m.payload.chunk_range(i).expect("chunk exists");
        let chunk = &payload[start as usize..end as usize];
        let checked = verify_chunk(&m.payload, i, chunk).expect("the chunk matches");
        assert_eq!((checked.index(), checked.data()), (i, chunk));
        let mut bad = chunk.to_vec();
        bad[0] ^= 1;
        assert_eq!(
            verify_chunk(&m.payload, i, &bad).map(|c| c.index()),
            Err(Refusal::ChunkDigestMismatch { index: i })
        );
        assert!(
            verify_chunk(&m.payload, i, &chunk[1..]).is_err(),
            "short chunk {i} accepted"
        );
    }
    let last = m.payload.chunks.len() as u32;
    assert_eq!(
        verify_chunk(&m.payload, last, b"").map(|c| c.index()),
        Err(Refusal::ChunkDigestMismatch { index: last })
    );
}

fn verified(bundle: &[u8]) -> VerifiedHeader {
    let t = trust(2);
    let policy = plain_policy(&t);
    RawHeader::read_from(&mut &bundle[..])
        .expect("header")
        .verify(&policy)
        .expect("verifies")
}

/// The chunks of `bundle`'s payload, as they come over the wire.
fn wire_chunks(bundle: &[u8], m: &Manifest) -> Vec<Vec<u8>> {
    let payload = &bundle[payload_start(bundle)..];
    (0..m.payload.chunks.len() as u32)
        .map(|i| {
            let (start, end) = m.payload.chunk_range(i).expect("chunk exists");
            payload[start as usize..end as usize].to_vec()
        })
        .collect()
}

#[test]
fn a_download_unpacked_chunk_by_chunk_equals_the_file_unpacked_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = good();
    let header = verified(&g);
    let chunks = wire_chunks(&g, &header.manifest);
    assert!(chunks.len() >= 3, "the test needs several chunks");
    let mut stream = UnpackStream::begin(&header, dir.path().join("staging")).expect("begin");
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(stream.next_chunk(), i as u32);
        assert!(!stream.complete());
        let checked = verify_chunk(&header.manifest.payload, i as u32, c).expect("matches");
        stream.feed(checked).expect("feeds");
    }
    assert!(stream.complete());
    let target = dir.path().join("bundle");
    stream.finish(&header, &target).expect("finishes");
    let whole = dir.path().join("whole");
    let t = trust(2);
    let policy = plain_policy(&t);
    unpack_to_dir(g.as_slice(), &policy, &whole).expect("unpacks");
    for file in ["model.onnx", "golden.cbor", ".manifest.cbor"] {
        assert_eq!(
            std::fs::read(target.join(file)).expect("streamed"),
            std::fs::read(whole.join(file)).expect("whole"),
            "{file}"
        );
    }
    assert!(!dir.path().join("staging").exists());
}

#[test]
fn the_stream_refuses_chunks_out_of_order_foreign_chunks_and_an_early_or_wrong_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = good();
    let header = verified(&g);
    let chunks = wire_chunks(&g, &header.manifest);
    let table = &header.manifest.payload;
    let staging = dir.path().join("staging");

    let mut stream = UnpackStream::begin(&header, &staging).expect("begin");
    let second = verify_chunk(table, 1, &chunks[1]).expect("matches");
    let err = stream.feed(second).expect_err("chunk 1 before chunk 0");
    assert!(
        err.to_string().contains("chunk 1 fed out of order"),
        "{err}"
    );

    // Chunk 0 of another bundle's table, same index and length.
    let other = assemble(&good_manifest(3, 9), &inputs(9), &[&key(1), &key(2)]);
    let other_header = verified(&other);
    let other_chunks = wire_chunks(&other, &other_header.manifest);
    let foreign = verify_chunk(&other_header.manifest.payload, 0, &other_chunks[0]).expect("ok");
    let mut stream = UnpackStream::begin(&header, &staging).expect("begin again");
    assert!(
        stream.feed(foreign).is_err(),
        "a chunk of another table fed"
    );

    // Finishing early is a truncation; finishing as another bundle is refused.
    let mut stream = UnpackStream::begin(&header, &staging).expect("begin again");
    stream
        .feed(verify_chunk(table, 0, &chunks[0]).expect("matches"))
        .expect("feeds");
    let target = dir.path().join("bundle");
    let err = stream
        .finish(&header, &target)
        .expect_err("two chunks missing");
    assert!(
        matches!(err.refusal(), Some(Refusal::Truncated { .. })),
        "{err}"
    );
    assert!(!target.exists() && !staging.exists(), "left behind");
    let mut stream = UnpackStream::begin(&header, &staging).expect("begin again");
    for (i, c) in chunks.iter().enumerate() {
        stream
            .feed(verify_chunk(table, i as u32, c).expect("matches"))
            .expect("feeds");
    }
    let err = stream
        .finish(&other_header, &target)
        .expect_err("another bundle's header");
    assert!(err.to_string().contains("is being installed"), "{err}");
    assert!(!target.exists() && !staging.exists(), "left behind");
}

#[test]
fn the_stream_checks_artifact_hashes_that_the_chunk_table_cannot_vouch_for() {
    // Signed with a wrong artifact hash but a chunk table that matches the bytes:
    // every chunk passes on arrival, the artifact check refuses the bundle.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut wrong = good_manifest(3, 0);
    wrong.artifacts[0].sha256 = edgefleet_shared::Digest::of(b"another model");
    let b = assemble(&wrong, &inputs(0), &[&key(1), &key(2)]);
    let header = verified(&b);
    let chunks = wire_chunks(&b, &header.manifest);
    let staging = dir.path().join("staging");
    let mut stream = UnpackStream::begin(&header, &staging).expect("begin");
    let refused = chunks.iter().enumerate().find_map(|(i, c)| {
        let checked = verify_chunk(&header.manifest.payload, i as u32, c).expect("chunk matches");
        stream.feed(checked).err()
    });
    let err = refused.expect("the model's hash is checked");
    assert_eq!(
        err.refusal(),
        Some(&Refusal::ArtifactDigestMismatch {
            name: name("model.onnx")
        })
    );
    drop(stream);
    assert!(!staging.exists(), "staging left behind");
}

#[test]
fn each_refusal_has_a_stable_snake_case_code() {
    assert_eq!(Refusal::BadMagic.code(), "bad_magic");
    assert_eq!(Refusal::TrailingBytes.code(), "trailing_bytes");
    let r = Refusal::TooFewSignatures {
        valid: 1,
        threshold: 2,
    };
    assert_eq!(r.code(), "too_few_signatures");
    assert!(r.to_string().contains("1 valid signature(s)"), "{r}");
}

#[test]
fn the_same_release_with_the_same_content_is_accepted_again() {
    let g = good();
    let digest = RawHeader::read_from(&mut g.as_slice())
        .expect("header")
        .digest();
    let mut c = Case::new("reinstall", g);
    c.installed = Some(InstalledRelease {
        release: 3,
        manifest_digest: digest,
    });
    assert!(c.run().is_ok());
}

#[test]
fn a_failed_unpack_leaves_no_target_directory_and_a_good_one_writes_every_artifact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = trust(2);
    let policy = plain_policy(&t);
    let mut bad = good();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let target = dir.path().join("slot-b");
    let err = unpack_to_dir(bad.as_slice(), &policy, &target).expect_err("tampered bundle");
    assert!(err.refusal().is_some(), "{err}");
    assert!(!target.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("list").count(),
        0,
        "staging left behind"
    );

    unpack_to_dir(good().as_slice(), &policy, &target).expect("good bundle unpacks");
    assert_eq!(
        std::fs::read(target.join("model.onnx")).expect("model"),
        model_bytes(0)
    );
    assert_eq!(
        std::fs::read(target.join("golden.cbor")).expect("golden"),
        b"golden cases"
    );
}

/// A reader that returns at most `n` bytes per call, to exercise every split.
struct Trickle<'a> {
    data: &'a [u8],
    n: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.n.min(buf.len()).min(self.data.len());
        buf[..k].copy_from_slice(&self.data[..k]);
        self.data = &self.data[k..];
        Ok(k)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn any_single_byte_change_anywhere_is_refused(pos in 0usize..10_400, xor in 1u8..=255) {
        let mut b = good();
        let pos = pos % b.len();
        b[pos] ^= xor;
        let result = Case::new("flip", b).run();
        prop_assert!(result.is_err(), "byte {pos} ^ {xor:#x} accepted");
    }

    #[test]
    fn any_truncation_is_refused_as_truncated(cut in 0usize..10_400) {
        let g = good();
        let cut = cut % g.len();
        let result = Case::new("cut", g[..cut].to_vec()).run();
        prop_assert!(matches!(result, Err(Refusal::Truncated { .. })), "cut at {cut}: {result:?}");
    }

    #[test]
    fn reads_of_any_size_give_the_same_verdict(n in 1usize..5000) {
        let g = good();
        let t = trust(2);
        let policy = plain_policy(&t);
        let header = verify_stream(Trickle { data: &g, n }, &policy, &mut DiscardSink);
        prop_assert!(header.is_ok(), "{header:?}");
        let mut longer = inputs(0);
        longer[0].source = ArtifactSource::Bytes([model_bytes(0), vec![7; 100]].concat());
        let bad = assemble(&good_manifest(3, 0), &longer, &[&key(1), &key(2)]);
        let mut tampered = good();
        let at = tampered.len() - 20;
        tampered[at] ^= 1;
        for b in [bad, tampered] {
            let whole = verify_stream(b.as_slice(), &policy, &mut DiscardSink).map_err(|e| e.to_string());
            let split = verify_stream(Trickle { data: &b, n }, &policy, &mut DiscardSink).map_err(|e| e.to_string());
            prop_assert!(whole.is_err());
            prop_assert_eq!(whole.err(), split.err());
        }
    }

    #[test]
    fn random_bytes_never_panic_the_reader(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let t = trust(1);
        let policy = plain_policy(&t);
        let mut with_magic = edgefleet_shared::bundle::MAGIC.to_vec();
        with_magic.extend_from_slice(&[0, 1, 0, 0]);
        with_magic.extend_from_slice(&data);
        prop_assert!(verify_stream(data.as_slice(), &policy, &mut DiscardSink).is_err());
        prop_assert!(verify_stream(with_magic.as_slice(), &policy, &mut DiscardSink).is_err());
    }
}

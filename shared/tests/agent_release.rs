//! Agent releases (docs/agent-update.md): the same file format as a model
//! bundle, signed by the trust root's agent-release role. Each refusal is checked
//! for its exact reason.

use edgefleet_shared::bundle::{
    ArtifactInput, ArtifactSource, DeviceFacts, DiscardSink, InstalledRelease, ManifestDraft,
    manifest_bytes, prepare_manifest, verify_stream, write_bundle,
};
use edgefleet_shared::manifest::{
    AGENT_CHANNEL, AGENT_RELEASE_TYPE, ArtifactKind, Constraints, Dim, ElementType, HealthPolicy,
    MANIFEST_TYPE, Manifest, ModelSchema, TensorSpec, agent_binary_name,
};
use edgefleet_shared::trust::{Role, RoleKeys};
use edgefleet_shared::{
    Arch, ArtifactName, Limits, ModelChannel, Policy, RawHeader, Refusal, SecretKey, TrustRoot,
    UnixTime, VerifiedHeader,
};

const NOW: UnixTime = UnixTime(1_800_000_000);

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn arch(a: &str) -> Arch {
    Arch::new(a).expect("valid arch")
}

/// Root keys 1 and 2 (k = 1) sign models; keys 7 and 8 (k = 2) sign agent releases.
fn root_with_role() -> TrustRoot {
    TrustRoot::new(
        1,
        NOW.plus_days(365),
        1,
        vec![key(1).public(), key(2).public()],
    )
    .with_agent_releases(RoleKeys {
        threshold: 2,
        keys: vec![key(7).public(), key(8).public()],
    })
}

fn root_without_role() -> TrustRoot {
    TrustRoot::new(
        1,
        NOW.plus_days(365),
        1,
        vec![key(1).public(), key(2).public()],
    )
}

fn binary(seed: u8) -> Vec<u8> {
    (0..9_000u32)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

fn agent_inputs(arches: &[&str]) -> Vec<ArtifactInput> {
    arches
        .iter()
        .enumerate()
        .map(|(i, a)| ArtifactInput {
            name: agent_binary_name(&arch(a)).expect("valid name"),
            kind: ArtifactKind::Agent,
            source: ArtifactSource::Bytes(binary(i as u8)),
        })
        .collect()
}

fn agent_draft(release: u64, arches: &[&str]) -> ManifestDraft {
    ManifestDraft {
        channel: ModelChannel::new(AGENT_CHANNEL).expect("valid channel"),
        version: semver::Version::new(1, 3, release),
        release,
        created_at: NOW.plus_days(-1),
        expires_at: NOW.plus_days(30),
        schema: ModelSchema::default(),
        constraints: Constraints {
            architectures: arches.iter().map(|a| arch(a)).collect(),
            min_agent_version: "0.1.0".into(),
            memory_bytes: 16 << 20,
        },
        health: HealthPolicy::default(),
        chunk_size: 4096,
    }
}

fn model_draft() -> ManifestDraft {
    let mut d = agent_draft(1, &[]);
    d.channel = ModelChannel::new("iris").expect("valid channel");
    d.schema = ModelSchema {
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
    };
    d
}

fn model_inputs() -> Vec<ArtifactInput> {
    vec![ArtifactInput {
        name: ArtifactName::new("model.onnx").expect("valid name"),
        kind: ArtifactKind::Model,
        source: ArtifactSource::Bytes(binary(9)),
    }]
}

fn assemble(manifest: &Manifest, inputs: &[ArtifactInput], signers: &[u8]) -> Vec<u8> {
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(manifest),
        signatures: vec![],
    };
    for s in signers {
        header.sign(&key(*s));
    }
    let mut out = Vec::new();
    write_bundle(&mut out, &header, inputs).expect("writing to memory");
    out
}

fn release(release: u64, arches: &[&str], signers: &[u8]) -> (Manifest, Vec<u8>) {
    let inputs = agent_inputs(arches);
    let manifest = prepare_manifest(&agent_draft(release, arches), &inputs).expect("in memory");
    let bundle = assemble(&manifest, &inputs, signers);
    (manifest, bundle)
}

struct Check<'a> {
    trust: &'a TrustRoot,
    role: Role,
    installed: Option<InstalledRelease>,
    device: Option<DeviceFacts>,
}

impl Check<'_> {
    fn new(trust: &TrustRoot, role: Role) -> Check<'_> {
        Check {
            trust,
            role,
            installed: None,
            device: None,
        }
    }

    fn run(&self, bundle: &[u8]) -> Result<VerifiedHeader, Refusal> {
        let policy = Policy {
            trust: self.trust,
            role: self.role,
            now: NOW,
            limits: Limits::default(),
            installed: self.installed.as_ref(),
            device: self.device.as_ref(),
        };
        verify_stream(bundle, &policy, &mut DiscardSink).map_err(|e| {
            e.refusal()
                .cloned()
                .expect("in-memory reads are not I/O errors")
        })
    }
}

#[test]
fn a_release_signed_by_the_agent_release_role_verifies_and_finds_each_binary() {
    let root = root_with_role();
    let (manifest, bundle) = release(4, &["x86_64", "aarch64"], &[7, 8]);
    assert_eq!(manifest.kind, AGENT_RELEASE_TYPE);
    assert_eq!(manifest.role(), Some(Role::AgentReleases));
    let verified = Check::new(&root, Role::AgentReleases).run(&bundle);
    let Ok(verified) = verified else {
        panic!("refused: {verified:?}")
    };
    assert_eq!(verified.signed_by.len(), 2);
    let aarch64 = verified.manifest.agent_binary(&arch("aarch64"));
    assert_eq!(
        aarch64.map(|a| a.name.as_str()),
        Some("edgefleet-agent.aarch64")
    );
    assert!(verified.manifest.agent_binary(&arch("arm")).is_none());
}

#[test]
fn a_device_fetches_only_the_chunks_that_hold_its_binary() {
    // 9,000-byte binaries in 4,096-byte chunks: each binary spans chunk
    // boundaries, and the second one starts inside a chunk of the first.
    let (manifest, bundle) = release(4, &["x86_64", "aarch64"], &[7, 8]);
    let payload = &bundle[bundle.len() - manifest.payload.size as usize..];
    let mut covered = Vec::new();
    for a in ["x86_64", "aarch64"] {
        let entry = manifest.agent_binary(&arch(a)).expect("listed");
        let (start, end) = manifest
            .artifact_range(&entry.name)
            .expect("in the payload");
        assert_eq!(end - start, entry.size);
        let bytes = &payload[start as usize..end as usize];
        assert_eq!(edgefleet_shared::Digest::of(bytes), entry.sha256, "{a}");
        let chunks = manifest.payload.chunks_covering(start, end);
        let (first, _) = manifest.payload.chunk_range(chunks.start).expect("a chunk");
        let (_, last) = manifest
            .payload
            .chunk_range(chunks.end - 1)
            .expect("a chunk");
        assert!(
            first <= start && end <= last,
            "{a}: {chunks:?} cover the binary"
        );
        assert!(
            start - first < 4096 && last - end < 4096,
            "{a}: no chunk too many"
        );
        covered.push(chunks);
    }
    assert_eq!(covered, vec![0..3, 2..5]);
    let unknown = ArtifactName::new("edgefleet-agent.riscv64").expect("valid name");
    assert_eq!(manifest.artifact_range(&unknown), None);
    assert_eq!(manifest.payload.chunks_covering(10, 10), 0..0);
    assert_eq!(manifest.payload.chunks_covering(0, u64::MAX), 0..5);
}

#[test]
fn model_signers_cannot_sign_an_agent_release() {
    let root = root_with_role();
    // Both model keys, one release key: below the role's threshold of 2.
    let (_, bundle) = release(4, &["x86_64"], &[1, 2, 7]);
    assert_eq!(
        Check::new(&root, Role::AgentReleases).run(&bundle).err(),
        Some(Refusal::TooFewSignatures {
            valid: 1,
            threshold: 2
        })
    );
    // Model keys only.
    let (_, bundle) = release(4, &["x86_64"], &[1, 2]);
    assert!(matches!(
        Check::new(&root, Role::AgentReleases).run(&bundle),
        Err(Refusal::UnknownKey { .. })
    ));
}

#[test]
fn a_root_without_the_role_refuses_every_agent_release_with_the_reason() {
    let root = root_without_role();
    let (_, bundle) = release(4, &["x86_64"], &[1, 2, 7, 8]);
    let refusal = Check::new(&root, Role::AgentReleases).run(&bundle).err();
    assert_eq!(
        refusal,
        Some(Refusal::NoSigningRole {
            version: 1,
            role: Role::AgentReleases
        })
    );
    let text = refusal.map(|r| r.to_string()).unwrap_or_default();
    assert!(
        text.contains("no keys that may sign an agent release"),
        "{text}"
    );
}

#[test]
fn an_agent_release_is_not_a_model_bundle_and_a_model_bundle_is_not_a_release() {
    let root = root_with_role();
    let wrong = Some(Refusal::WrongKind {
        expected: Role::Models,
        found: Role::AgentReleases,
    });
    // Signed by the release role only, offered where a model goes.
    let (_, bundle) = release(4, &["x86_64"], &[7, 8]);
    assert_eq!(Check::new(&root, Role::Models).run(&bundle).err(), wrong);
    // Signed by the model keys too: the signatures pass, the kind does not.
    let (_, bundle) = release(4, &["x86_64"], &[1, 7, 8]);
    assert_eq!(Check::new(&root, Role::Models).run(&bundle).err(), wrong);
    // A model bundle offered as an agent release.
    let inputs = model_inputs();
    let model = prepare_manifest(&model_draft(), &inputs).expect("in memory");
    assert_eq!(model.kind, MANIFEST_TYPE);
    let bundle = assemble(&model, &inputs, &[1, 7, 8]);
    assert_eq!(
        Check::new(&root, Role::AgentReleases).run(&bundle).err(),
        Some(Refusal::WrongKind {
            expected: Role::AgentReleases,
            found: Role::Models
        })
    );
    assert!(Check::new(&root, Role::Models).run(&bundle).is_ok());
}

#[test]
fn agent_releases_have_a_release_floor_and_an_architecture_list() {
    let root = root_with_role();
    let (newer, bundle) = release(4, &["x86_64", "aarch64"], &[7, 8]);
    let mut check = Check::new(&root, Role::AgentReleases);
    check.installed = Some(InstalledRelease {
        release: 5,
        manifest_digest: edgefleet_shared::Digest::of(b"release 5"),
    });
    assert_eq!(
        check.run(&bundle).err(),
        Some(Refusal::Rollback {
            channel: newer.channel.clone(),
            release: 4,
            installed: 5
        })
    );
    check.installed = None;
    check.device = Some(DeviceFacts {
        arch: arch("arm"),
        agent_version: semver::Version::new(0, 1, 0),
        memory_available: 1 << 30,
    });
    assert!(matches!(
        check.run(&bundle),
        Err(Refusal::ArchitectureNotSupported { .. })
    ));
}

/// Signs `manifest` as it is (after a test changed it) with the release role.
fn refused_manifest(manifest: &Manifest, inputs: &[ArtifactInput]) -> String {
    let bundle = assemble(manifest, inputs, &[1, 7, 8]);
    let role = manifest.role().unwrap_or(Role::AgentReleases);
    match Check::new(&root_with_role(), role).run(&bundle) {
        Err(Refusal::InvalidManifest { detail }) => detail,
        other => panic!("expected an invalid manifest, got {other:?}"),
    }
}

#[test]
fn the_manifest_rules_of_an_agent_release_name_the_field() {
    let inputs = agent_inputs(&["x86_64", "aarch64"]);
    let good =
        prepare_manifest(&agent_draft(4, &["x86_64", "aarch64"]), &inputs).expect("in memory");

    let mut m = good.clone();
    m.constraints.architectures.reverse();
    let why = refused_manifest(&m, &inputs);
    assert!(why.contains("constraints.architectures"), "{why}");

    let mut m = good.clone();
    m.artifacts[1].name = ArtifactName::new("agent-aarch64").expect("valid name");
    let why = refused_manifest(&m, &inputs);
    assert!(
        why.contains("is not named edgefleet-agent.<architecture>"),
        "{why}"
    );

    let mut m = good.clone();
    m.artifacts[1].kind = ArtifactKind::Model;
    let why = refused_manifest(&m, &inputs);
    assert!(why.contains("no artifact of kind Model"), "{why}");

    let mut m = good.clone();
    m.schema = model_draft().schema;
    let why = refused_manifest(&m, &inputs);
    assert!(why.contains("schema"), "{why}");

    let mut m = good.clone();
    m.channel = ModelChannel::new("iris").expect("valid channel");
    let why = refused_manifest(&m, &inputs);
    assert!(
        why.contains("an agent release's channel is \"edgefleet-agent\""),
        "{why}"
    );

    // A model bundle may not take the agent's channel, nor carry a binary.
    let minputs = model_inputs();
    let model = prepare_manifest(&model_draft(), &minputs).expect("in memory");
    let mut m = model.clone();
    m.channel = ModelChannel::new(AGENT_CHANNEL).expect("valid channel");
    let why = refused_manifest(&m, &minputs);
    assert!(why.contains("reserved for agent releases"), "{why}");
    let mut m = model;
    m.artifacts.push(m.artifacts[0].clone());
    m.artifacts[1].name = agent_binary_name(&arch("x86_64")).expect("valid name");
    m.artifacts[1].kind = ArtifactKind::Agent;
    let why = refused_manifest(&m, &minputs);
    assert!(why.contains("kind Agent"), "{why}");
}

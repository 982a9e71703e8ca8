//! Property tests of the wire codec: every message round-trips, and decoders reject
//! malformed or oversized input with an error, never a panic.

use edgefleet_shared::bundle::Refusal;
use edgefleet_shared::cbor::DecodeError;
use edgefleet_shared::protocol::*;
use edgefleet_shared::{Arch, DeviceId, Digest, ModelChannel, SignedTrustRoot, UnixTime};
use proptest::prelude::*;

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn device() -> impl Strategy<Value = DeviceId> {
    "[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
        .prop_map(|s| DeviceId::new(&s).expect("regex matches the rule"))
}

fn channel() -> impl Strategy<Value = ModelChannel> {
    "[a-z0-9][a-z0-9_-]{0,20}".prop_map(|s| ModelChannel::new(&s).expect("regex matches the rule"))
}

fn time() -> impl Strategy<Value = UnixTime> {
    any::<i64>().prop_map(UnixTime)
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        Just(Refusal::BadMagic),
        Just(Refusal::TrailingBytes),
        digest().prop_map(|key| Refusal::InvalidSignature { key }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(valid, threshold)| Refusal::TooFewSignatures { valid, threshold }),
        (channel(), any::<u64>(), any::<u64>()).prop_map(|(channel, release, installed)| {
            Refusal::Rollback {
                channel,
                release,
                installed,
            }
        }),
        any::<u32>().prop_map(|index| Refusal::ChunkDigestMismatch { index }),
        ".{0,40}".prop_map(|section| Refusal::Truncated { section }),
    ]
}

fn failure() -> impl Strategy<Value = FailureReason> {
    prop_oneof![
        refusal().prop_map(|refusal| FailureReason::Refused { refusal }),
        ".{0,60}".prop_map(|detail| FailureReason::HealthCheck { detail }),
        ".{0,60}".prop_map(|detail| FailureReason::Download { detail }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (
            digest(),
            proptest::collection::vec(any::<u8>(), 0..300),
            0..3u8
        )
            .prop_map(|(digest, header, m)| {
                let mode = [
                    InstallMode::Activate,
                    InstallMode::Stage,
                    InstallMode::Shadow,
                ][m as usize];
                Action::Install {
                    bundle: BundleOffer { digest, header },
                    mode,
                }
            }),
        digest().prop_map(|digest| Action::Activate { digest }),
        Just(Action::Revert),
        channel().prop_map(|channel| Action::RevertChannel { channel }),
        channel().prop_map(|channel| Action::Remove { channel }),
        (
            proptest::option::of(1u32..=86_400),
            proptest::option::of(0u16..=1000),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(t, s, c)| Action::Configure(Settings {
                telemetry_interval_s: t,
                shadow_sample_permille: s,
                sample_capture: c
            })),
        (channel(), any::<u32>()).prop_map(|(channel, max_samples)| Action::RequestSamples {
            channel,
            max_samples
        }),
        (digest(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(digest, header)| {
            Action::UpdateAgent {
                release: BundleOffer { digest, header },
            }
        }),
    ]
}

fn agent_update_failure() -> impl Strategy<Value = AgentUpdateFailure> {
    prop_oneof![
        refusal().prop_map(|refusal| AgentUpdateFailure::Refused { refusal }),
        ".{0,60}".prop_map(|detail| AgentUpdateFailure::Probe { detail }),
        ".{0,60}".prop_map(|detail| AgentUpdateFailure::Download { detail }),
        prop_oneof![
            Just(TrialFailure::NoConfirmation),
            Just(TrialFailure::Crashed),
            Just(TrialFailure::Interrupted)
        ]
        .prop_map(|failure| AgentUpdateFailure::Trial { failure }),
        Just(AgentUpdateFailure::Unsupervised),
    ]
}

fn bundle_ref() -> impl Strategy<Value = BundleRef> {
    (digest(), channel(), "[0-9]\\.[0-9]\\.[0-9]", any::<u64>()).prop_map(
        |(digest, channel, version, release)| BundleRef {
            digest,
            channel,
            version,
            release,
        },
    )
}

fn state() -> impl Strategy<Value = DeviceState> {
    (
        device(),
        time(),
        any::<bool>(),
        proptest::collection::vec((bundle_ref(), any::<bool>()), 0..=32),
        proptest::option::of((digest(), time(), proptest::option::of(failure()))),
    )
        .prop_map(|(device, at, online, slots, last)| DeviceState {
            device,
            at,
            online,
            agent_version: "0.1.0".into(),
            arch: Arch::current(),
            slots: slots
                .into_iter()
                .enumerate()
                .map(|(i, (bundle, active))| SlotState {
                    slot: if i % 2 == 0 { Slot::A } else { Slot::B },
                    bundle,
                    role: if active {
                        SlotRole::Active
                    } else {
                        SlotRole::Previous
                    },
                })
                .collect(),
            last_install: last.map(|(digest, at, failure)| InstallResult {
                digest,
                at,
                failure,
            }),
        })
}

fn event() -> impl Strategy<Value = Event> {
    let kind = prop_oneof![
        digest().prop_map(|digest| EventKind::InstallStarted { digest }),
        channel().prop_map(|channel| EventKind::Removed { channel }),
        (digest(), "[0-9]\\.[0-9]\\.[0-9]", any::<u64>()).prop_map(|(digest, version, release)| {
            EventKind::AgentUpdated {
                digest,
                version,
                release,
            }
        }),
        (digest(), agent_update_failure())
            .prop_map(|(digest, reason)| EventKind::AgentUpdateFailed { digest, reason }),
        (digest(), any::<u32>(), any::<u32>()).prop_map(|(digest, chunks_done, chunks_total)| {
            EventKind::InstallProgress {
                digest,
                chunks_done,
                chunks_total,
            }
        }),
        (digest(), failure())
            .prop_map(|(digest, reason)| EventKind::InstallFailed { digest, reason }),
        (digest(), any::<bool>()).prop_map(|(digest, activated)| EventKind::InstallSucceeded {
            digest,
            slot: Slot::B,
            activated
        }),
        (
            digest(),
            any::<u64>(),
            proptest::collection::vec("[a-z]{1,10}", 0..5),
            0f64..=1.0,
            any::<bool>()
        )
            .prop_map(|(digest, rows, features, drifted_share, drifted)| {
                EventKind::DriftAlert {
                    digest,
                    rows,
                    features,
                    drifted_share,
                    drifted,
                }
            }),
    ];
    (
        device(),
        any::<u64>(),
        time(),
        proptest::option::of(any::<u64>()),
        kind,
    )
        .prop_map(|(device, seq, at, command, kind)| Event {
            device,
            epoch: seq.rotate_left(17),
            seq,
            at,
            command,
            kind,
        })
}

fn telemetry() -> impl Strategy<Value = Telemetry> {
    (
        device(),
        any::<u64>(),
        time(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(-40f32..120.0),
        proptest::collection::vec(any::<u64>(), 0..10),
    )
        .prop_map(
            |(device, seq, at, mem_used, inferences, temperature_c, counts)| {
                let bounds: Vec<u64> = (1..=counts.len() as u64).map(|b| b * 100).collect();
                let mut latency_counts = counts.clone();
                latency_counts.push(0);
                Telemetry {
                    device,
                    epoch: mem_used ^ seq,
                    seq,
                    at,
                    device_metrics: DeviceMetrics {
                        cpu_percent: 12.5,
                        mem_used,
                        mem_total: u64::MAX,
                        disk_free: 1,
                        disk_total: 2,
                        temperature_c,
                        uptime_s: 3,
                    },
                    agent: AgentMetrics {
                        rss_bytes: 4 << 20,
                        version: "0.1.0".into(),
                        spool_dropped: 7,
                    },
                    model: Some(ModelMetrics {
                        digest: Digest::of(b"m"),
                        inferences,
                        errors: 0,
                        latency_bounds_us: bounds,
                        latency_counts,
                    }),
                    drift: Some(DriftReport {
                        digest: Digest::of(b"m"),
                        window: 2,
                        started: at,
                        rows: 500,
                        closed: false,
                        inputs: vec![DriftScore {
                            feature: "sepal_length".into(),
                            count: 500,
                            psi: 0.3,
                            test: DriftTest::KolmogorovSmirnov,
                            statistic: 0.2,
                            p_value: 0.01,
                            wasserstein: Some(0.4),
                            jensen_shannon: None,
                            drifted: true,
                        }],
                        outputs: vec![DriftScore {
                            feature: "label".into(),
                            count: 500,
                            psi: 0.01,
                            test: DriftTest::ChiSquare,
                            statistic: 1.5,
                            p_value: 0.4,
                            wasserstein: None,
                            jensen_shannon: Some(0.02),
                            drifted: false,
                        }],
                        drifted_share: 1.0,
                        drifted: true,
                    }),
                    shadow: Some(ShadowMetrics {
                        digest: Digest::of(b"s"),
                        runs: 10,
                        agreed: 9,
                        errors: 0,
                        skipped: 1,
                        latency_counts: vec![0; 17],
                        active_latency_counts: vec![0; 17],
                    }),
                    channels: Vec::new(),
                }
            },
        )
}

fn round_trips<T: Message + PartialEq + std::fmt::Debug>(msg: &T) -> Result<(), TestCaseError> {
    let bytes = encode(msg);
    prop_assert!(bytes.len() <= T::MAX_LEN);
    let back: T = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, msg);
    Ok(())
}

fn never_panics_on(bytes: &[u8]) {
    let _ = decode::<Command>(bytes);
    let _ = decode::<edgefleet_shared::commands::SignedCommand>(bytes);
    let _ = decode::<DeviceState>(bytes);
    let _ = decode::<Event>(bytes);
    let _ = decode::<Telemetry>(bytes);
    let _ = decode::<Chunk>(bytes);
    let _ = decode::<FetchRequest>(bytes);
    let _ = decode::<SampleUpload>(bytes);
    let _ = decode::<TelemetryAck>(bytes);
    let _ = SignedTrustRoot::from_bytes(bytes);
    let _ = edgefleet_shared::golden::GoldenSet::from_bytes(bytes);
    let _ = SampleBatch::from_bytes(bytes);
    let _ = edgefleet_shared::reference::ReferenceStats::from_bytes(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn commands_round_trip(id in any::<u64>(), issued_at in time(), device in device(), action in action()) {
        let command = Command { id, issued_at, device, action };
        round_trips(&command)?;
        // Signed, it opens to the same command for its device.
        let key = edgefleet_shared::SecretKey::from_seed([3; 32]);
        let policy = edgefleet_shared::commands::CommandPolicy {
            key: key.public(),
            device: command.device.clone(),
            max_age_s: i64::MAX,
            max_ahead_s: i64::MAX,
        };
        let signed = edgefleet_shared::commands::sign_command(&key, &command);
        prop_assert!(signed.len() <= edgefleet_shared::commands::SignedCommand::MAX_LEN);
        let opened = edgefleet_shared::commands::open_command(
            &signed,
            &policy,
            command.issued_at,
            &Default::default(),
        );
        prop_assert_eq!(opened, Ok(command));
    }

    #[test]
    fn device_states_round_trip(s in state()) {
        round_trips(&s)?;
    }

    #[test]
    fn events_round_trip(e in event()) {
        round_trips(&e)?;
    }

    #[test]
    fn telemetry_round_trips(t in telemetry()) {
        round_trips(&t)?;
    }

    #[test]
    fn telemetry_of_several_channels_round_trips_and_mixing_both_forms_is_refused(
        t in telemetry(),
        names in proptest::collection::btree_set(channel(), 1..=16),
    ) {
        let parts: Vec<ChannelTelemetry> = names
            .into_iter()
            .map(|channel| ChannelTelemetry {
                channel,
                model: t.model.clone(),
                drift: t.drift.clone(),
                shadow: t.shadow.clone(),
            })
            .collect();
        let several = Telemetry {
            model: None,
            drift: None,
            shadow: None,
            channels: parts.clone(),
            ..t.clone()
        };
        let bytes = encode(&several);
        if bytes.len() <= Telemetry::MAX_LEN {
            round_trips(&several)?;
            let back: Telemetry = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back.channel_parts().len(), parts.len());
        }
        if t.model.is_some() || t.drift.is_some() || t.shadow.is_some() {
            let mixed = Telemetry { channels: parts, ..t };
            let refused = decode::<Telemetry>(&encode(&mixed)).expect_err("both forms");
            prop_assert!(refused.to_string().contains("channels"), "{}", refused);
        }
    }

    #[test]
    fn chunks_and_fetch_requests_round_trip(
        bundle in digest(),
        index in any::<u32>(),
        data in proptest::collection::vec(any::<u8>(), 0..5000),
        ranges in proptest::collection::vec((0u32..1_000_000, 1u32..1000), 1..64),
    ) {
        round_trips(&Chunk { bundle, index, data: data.clone() })?;
        let ranges = ranges.into_iter().map(|(start, count)| ChunkRange { start, count }).collect();
        round_trips(&FetchRequest { bundle, ranges })?;
        round_trips(&SampleUpload { command: 1, digest: bundle, part: 0, parts: 1, data })?;
    }

    #[test]
    fn telemetry_acks_round_trip_and_hold_1_to_1024_numbers(
        epoch in any::<u64>(),
        seqs in proptest::collection::vec(any::<u64>(), 0..1100),
    ) {
        let ack = TelemetryAck { epoch, seqs: seqs.clone() };
        if (1..=TelemetryAck::MAX_SEQS).contains(&seqs.len()) {
            round_trips(&ack)?;
        } else {
            let e = decode::<TelemetryAck>(&encode(&ack)).expect_err("count out of range");
            prop_assert!(e.to_string().contains("seqs"), "{}", e);
        }
    }

    #[test]
    fn sample_batches_round_trip_and_a_shape_that_lies_is_refused(
        rows in 1u64..5,
        values in proptest::collection::vec(-1e3f32..1e3, 4..20),
    ) {
        let width = values.len() as u64 / rows;
        let data = values[..(rows * width) as usize].to_vec();
        let sample = CapturedSample {
            at: UnixTime(5),
            reason: CaptureReason::Drift,
            inputs: vec![edgefleet_shared::golden::Tensor {
                name: "x".into(),
                shape: vec![rows, width],
                data: edgefleet_shared::golden::TensorData::F32(data),
            }],
            outputs: vec![],
        };
        let batch = SampleBatch { digest: Digest::of(b"b"), samples: vec![sample.clone()] };
        prop_assert_eq!(SampleBatch::from_bytes(&batch.to_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?, batch);
        let mut lying = sample;
        lying.inputs[0].shape = vec![rows, width + 1];
        let bad = SampleBatch { digest: Digest::of(b"b"), samples: vec![lying] };
        let err = SampleBatch::from_bytes(&bad.to_bytes()).expect_err("shape lies");
        prop_assert!(err.to_string().contains("does not match its data"), "{}", err);
    }

    #[test]
    fn random_bytes_get_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        never_panics_on(&bytes);
    }

    #[test]
    fn damaged_valid_messages_get_an_error_not_a_panic(e in event(), pos in any::<usize>(), xor in 1u8..=255, cut in any::<usize>()) {
        let mut bytes = encode(&e);
        let p = pos % bytes.len();
        bytes[p] ^= xor;
        never_panics_on(&bytes);
        let c = cut % bytes.len();
        never_panics_on(&bytes[..c]);
    }
}

#[test]
fn a_message_with_an_invalid_device_id_is_refused_naming_the_rule() {
    #[derive(serde::Serialize)]
    struct Env<'a> {
        v: u16,
        m: FakeFetch<'a>,
    }
    #[derive(serde::Serialize)]
    struct FakeFetch<'a> {
        bundle: &'a serde_bytes::Bytes,
        ranges: Vec<ChunkRange>,
    }
    let bytes = edgefleet_shared::cbor::to_vec(&Env {
        v: 1,
        m: FakeFetch {
            bundle: serde_bytes::Bytes::new(&[0; 31]),
            ranges: vec![ChunkRange { start: 0, count: 1 }],
        },
    });
    let err = decode::<FetchRequest>(&bytes).expect_err("31-byte digest");
    assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("32 bytes"), "{err}");

    let ok = encode(&FetchRequest {
        bundle: Digest::of(b""),
        ranges: vec![ChunkRange {
            start: u32::MAX,
            count: 2,
        }],
    });
    let err = decode::<FetchRequest>(&ok).expect_err("overflowing range");
    assert!(err.to_string().contains("ranges"), "{err}");
}

#[test]
fn a_huge_declared_length_does_not_allocate_or_panic() {
    // CBOR: envelope map with "m" holding a byte string that claims 2^63 bytes.
    let mut bytes = vec![0xa2, 0x61, b'v', 0x01, 0x61, b'm', 0x5b];
    bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
    bytes.extend_from_slice(&[0; 16]);
    never_panics_on(&bytes);
    // An array claiming 2^32 elements.
    let mut bytes = vec![0xa2, 0x61, b'v', 0x01, 0x61, b'm', 0x9b];
    bytes.extend_from_slice(&(1u64 << 32).to_be_bytes());
    never_panics_on(&bytes);
}

#[test]
fn more_channels_than_a_device_serves_are_refused_naming_the_limit() {
    let channel = |i: usize| ModelChannel::new(&format!("c{i}")).expect("channel");
    let part = |i: usize| ChannelTelemetry {
        channel: channel(i),
        model: None,
        drift: None,
        shadow: None,
    };
    let t = Telemetry {
        device: DeviceId::new("d").expect("id"),
        epoch: 0,
        seq: 1,
        at: UnixTime(0),
        device_metrics: DeviceMetrics::default(),
        agent: AgentMetrics::default(),
        model: None,
        drift: None,
        shadow: None,
        channels: (0..=MAX_DEVICE_CHANNELS).map(part).collect(),
    };
    let e = decode::<Telemetry>(&encode(&t)).expect_err("17 channels");
    assert!(e.to_string().contains("at most 16"), "{e}");
    let slot = |i: usize| SlotState {
        slot: Slot::A,
        bundle: BundleRef {
            digest: Digest::of(&i.to_be_bytes()),
            channel: channel(i),
            version: "1.0.0".into(),
            release: 1,
        },
        role: SlotRole::Active,
    };
    let s = DeviceState {
        device: DeviceId::new("d").expect("id"),
        at: UnixTime(0),
        online: true,
        agent_version: "0.1.0".into(),
        arch: Arch::current(),
        slots: (0..=2 * MAX_DEVICE_CHANNELS).map(slot).collect(),
        last_install: None,
    };
    let e = decode::<DeviceState>(&encode(&s)).expect_err("33 slots");
    assert!(e.to_string().contains("at most 16 channels"), "{e}");
}

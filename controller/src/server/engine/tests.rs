//! The rollout engine, case by case (boundaries computed by hand) and by property.

use super::*;
use proptest::prelude::*;

fn fleet(n: usize) -> Vec<DeviceId> {
    (0..n).map(|i| id(&format!("dev-{i:03}"))).collect()
}

fn id(device: &str) -> DeviceId {
    DeviceId::new(device).expect("a valid device id")
}

fn plan(waves: &[&str]) -> Plan {
    Plan {
        waves: waves
            .iter()
            .map(|w| WaveSize::parse(w).expect("wave"))
            .collect(),
        gates: Gates {
            soak_ms: 10_000,
            install_timeout_ms: 100_000,
            ..Gates::default()
        },
        resend_after_ms: 30_000,
        ..Plan::default()
    }
}

fn installs(fx: &[Effect]) -> Vec<DeviceId> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Install(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// The devices whose command went again as the same command.
fn resent(fx: &[Effect]) -> Vec<DeviceId> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Resend(again) => match again.as_ref() {
                Effect::Install(d) | Effect::InstallShadow(d) | Effect::Revert(d) => {
                    Some(d.clone())
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn reverts(fx: &[Effect]) -> Vec<DeviceId> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Revert(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn succeed_all(r: &mut Rollout, ids: &[DeviceId], now: u64) -> Vec<Effect> {
    let mut fx = Vec::new();
    for d in ids {
        fx.extend(
            r.apply(now, Input::Succeeded { device: d.clone() })
                .expect("news is never refused"),
        );
    }
    fx
}

#[test]
fn wave_sizes_parse_and_refuse_with_the_reason() {
    assert_eq!(WaveSize::parse("1"), Ok(WaveSize::Count(1)));
    assert_eq!(WaveSize::parse(" 10% "), Ok(WaveSize::Percent(10)));
    assert_eq!(WaveSize::parse("100%"), Ok(WaveSize::Percent(100)));
    for bad in ["0", "0%", "101%", "-1", "ten", "%", "1.5"] {
        assert!(WaveSize::parse(bad).is_err(), "{bad} accepted");
    }
    assert!(
        WaveSize::parse("0")
            .expect_err("refused")
            .to_string()
            .contains("at least 1 device")
    );
}

#[test]
fn waves_are_cut_at_cumulative_sizes_computed_by_hand() {
    let w = plan(&["1", "10%", "50%", "100%"]).waves;
    // 20 devices: 1 | ceil(2.0)=2 -> 1 more | 10 -> 8 more | 20 -> 10 more.
    let sizes: Vec<usize> = assign_waves("r1", &fleet(20), &w)
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![1, 1, 8, 10]);
    // 5 devices: 1 | ceil(0.5)=1 -> empty, dropped | ceil(2.5)=3 -> 2 | 5 -> 2.
    let sizes: Vec<usize> = assign_waves("r1", &fleet(5), &w)
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![1, 2, 2]);
    // 1 device: a single wave.
    assert_eq!(assign_waves("r1", &fleet(1), &w).len(), 1);
    // 101 devices: 1 | ceil(10.1)=11 -> 10 | ceil(50.5)=51 -> 40 | 101 -> 50.
    let sizes: Vec<usize> = assign_waves("r1", &fleet(101), &w)
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![1, 10, 40, 50]);
    // Waves that stop short of 100% get a final wave with everyone left.
    let short = plan(&["2", "50%"]).waves;
    let sizes: Vec<usize> = assign_waves("r1", &fleet(10), &short)
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![2, 3, 5]);
    // A count larger than the fleet takes the fleet.
    let big = plan(&["50"]).waves;
    assert_eq!(
        assign_waves("r1", &fleet(7), &big),
        vec![{
            let mut all = assign_waves("r1", &fleet(7), &big)[0].clone();
            all.sort_by_key(|d| rank("r1", d));
            all
        }]
    );
}

#[test]
fn membership_depends_on_rollout_and_device_only() {
    let w = plan(&["1", "10%", "50%", "100%"]).waves;
    let devices = fleet(40);
    let mut reversed = devices.clone();
    reversed.reverse();
    let a = assign_waves("rollout-7", &devices, &w);
    assert_eq!(a, assign_waves("rollout-7", &reversed, &w));
    // Another rollout orders the fleet differently (a different canary, most likely).
    let b = assign_waves("rollout-8", &devices, &w);
    assert_ne!(a, b);
    // The rank is a fixed function: pinned so that a change of hash breaks this test
    // (it would move devices between waves of rollouts persisted before the change).
    assert_eq!(rank("r", "d"), {
        let d = Sha256::digest(b"r\0d");
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    });
}

#[test]
fn a_good_rollout_goes_through_every_wave_and_commands_only_the_current_one() {
    let devices = fleet(20);
    let mut r =
        Rollout::new("good", &devices, plan(&["1", "10%", "50%", "100%"]), 0).expect("rollout");
    let waves = r.waves.clone();
    let mut now = 0;
    let mut commanded = Vec::new();
    for (w, ids) in waves.iter().enumerate() {
        assert_eq!(r.wave, w);
        let fx = if w == 0 {
            r.tick(now, None)
        } else {
            Vec::new()
        };
        commanded.extend(installs(&fx));
        let mut sorted_cmd: Vec<DeviceId> = commanded.clone();
        sorted_cmd.sort();
        let mut expected: Vec<DeviceId> = waves[..=w].iter().flatten().cloned().collect();
        expected.sort();
        assert_eq!(sorted_cmd, expected, "wave {w}");
        now += 1_000;
        let fx = succeed_all(&mut r, ids, now);
        assert!(installs(&fx).is_empty());
        assert_eq!(r.phase.name(), "soaking");
        // Healthy during the soak; one millisecond before its end nothing moves.
        let healthy = Some(WaveHealth {
            error_rate: Some(0.0),
            p95_latency_ratio: Some(1.0),
            drift_increase: Some(0.0),
            ..WaveHealth::default()
        });
        assert!(installs(&r.tick(now + 9_999, healthy)).is_empty());
        assert_eq!(r.phase.name(), "soaking");
        now += 10_000;
        let fx = r.tick(now, healthy);
        commanded.extend(installs(&fx));
    }
    assert_eq!(r.phase, Phase::Completed { at: now });
    assert_eq!(commanded.len(), 20, "each device commanded exactly once");
    assert_eq!(r.counts(None).succeeded, 20);
}

#[test]
fn a_failing_canary_halts_before_anyone_else_is_asked() {
    let mut r = Rollout::new("bad", &fleet(20), plan(&["1", "10%", "100%"]), 0).expect("r");
    let canary = installs(&r.tick(0, None));
    assert_eq!(canary.len(), 1);
    let fx = r
        .apply(
            5,
            Input::Failed {
                device: canary[0].clone(),
                reason: "health_check: case 0 out of tolerance".into(),
            },
        )
        .expect("news");
    assert!(matches!(r.phase, Phase::Halted { .. }), "{:?}", r.phase);
    assert!(installs(&fx).is_empty());
    assert!(reverts(&fx).is_empty(), "the canary never switched");
    // Time passes: nothing more is commanded.
    assert!(installs(&r.tick(1_000_000, None)).is_empty());
    assert_eq!(r.counts(None).pending, 19);
}

#[test]
fn a_halt_reverts_every_device_that_switched_even_later() {
    let mut p = plan(&["4", "100%"]);
    p.gates.max_failure_ratio = 0.25; // 1 of 4 is tolerated, 2 of 4 trip.
    p.gates.min_success_ratio = 0.5;
    let mut r = Rollout::new("halt", &fleet(8), p, 0).expect("r");
    let wave = installs(&r.tick(0, None));
    assert_eq!(wave.len(), 4);
    succeed_all(&mut r, &wave[..1], 10);
    let fail = |d: &DeviceId| Input::Failed {
        device: d.clone(),
        reason: "x".into(),
    };
    let fx = r.apply(11, fail(&wave[1])).expect("news");
    assert_eq!(
        r.phase.name(),
        "installing",
        "1 of 4 = 25% is not above 25%"
    );
    assert!(reverts(&fx).is_empty());
    let fx = r.apply(12, fail(&wave[2])).expect("news");
    assert_eq!(r.phase.name(), "halted", "2 of 4 trip at once");
    assert_eq!(reverts(&fx), vec![wave[0].clone()]);
    // The last one finishes after the halt: told to revert too.
    let fx = r
        .apply(
            13,
            Input::Succeeded {
                device: wave[3].clone(),
            },
        )
        .expect("news");
    assert_eq!(reverts(&fx), vec![wave[3].clone()]);
    // Unanswered reverts are re-sent after resend_after_ms, answered ones are not.
    r.apply(
        14,
        Input::Reverted {
            device: wave[0].clone(),
        },
    )
    .expect("news");
    assert!(reverts(&r.tick(13 + 29_999, None)).is_empty());
    assert_eq!(reverts(&r.tick(13 + 30_000, None)), vec![wave[3].clone()]);
    assert_eq!(r.counts(None).reverted, 2);
}

#[test]
fn the_success_ratio_is_checked_once_the_wave_is_done() {
    let mut p = plan(&["10"]);
    p.gates.max_failure_ratio = 1.0;
    p.gates.min_success_ratio = 0.9;
    p.policy = FailurePolicy::Pause;
    for (ok, expect) in [(9usize, "soaking"), (8, "paused")] {
        let mut r = Rollout::new("ratio", &fleet(10), p.clone(), 0).expect("r");
        let wave = installs(&r.tick(0, None));
        succeed_all(&mut r, &wave[..ok], 1);
        assert_eq!(r.phase.name(), "installing", "not all done yet");
        for d in &wave[ok..] {
            r.apply(
                2,
                Input::Failed {
                    device: d.clone(),
                    reason: "x".into(),
                },
            )
            .expect("news");
        }
        assert_eq!(r.phase.name(), expect, "{ok} of 10");
    }
}

#[test]
fn silent_devices_are_asked_again_then_time_out_as_failures() {
    let mut p = plan(&["2"]);
    p.gates.max_failure_ratio = 1.0;
    p.gates.min_success_ratio = 0.5;
    let mut r = Rollout::new("silent", &fleet(2), p, 0).expect("r");
    let wave = installs(&r.tick(0, None));
    assert_eq!(wave.len(), 2);
    // Progress from the first resets its resend clock.
    r.apply(
        20_000,
        Input::Progress {
            device: wave[0].clone(),
            done: 3,
            total: 10,
        },
    )
    .expect("news");
    assert!(installs(&r.tick(29_999, None)).is_empty());
    assert_eq!(installs(&r.tick(30_000, None)), vec![wave[1].clone()]);
    assert_eq!(installs(&r.tick(50_000, None)), vec![wave[0].clone()]);
    assert_eq!(r.members[&wave[0]].name(), "downloading");
    // The timeout counts from the first command, whatever was re-sent.
    r.apply(
        60_000,
        Input::Succeeded {
            device: wave[0].clone(),
        },
    )
    .expect("news");
    r.tick(99_999, None);
    assert_eq!(r.members[&wave[1]].name(), "commanded");
    let fx = r.tick(100_000, None);
    assert_eq!(r.members[&wave[1]].name(), "failed");
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Note(n) if n.contains("no result within 100 s")))
    );
    assert_eq!(
        r.phase.name(),
        "soaking",
        "1 of 2 meets min_success_ratio 0.5"
    );
}

#[test]
fn a_replica_taking_over_sends_every_unanswered_command_again_at_once() {
    let mut r = Rollout::new("takeover", &fleet(4), plan(&["4"]), 0).expect("r");
    let wave = installs(&r.tick(0, None));
    assert_eq!(wave.len(), 4);
    // One progressed, one succeeded: only the two silent ones go again.
    r.apply(
        1_000,
        Input::Progress {
            device: wave[0].clone(),
            done: 1,
            total: 4,
        },
    )
    .expect("news");
    r.apply(
        1_000,
        Input::Succeeded {
            device: wave[1].clone(),
        },
    )
    .expect("news");
    // The stored state, loaded by the new holder 2 s later.
    let mut r: Rollout =
        serde_json::from_str(&serde_json::to_string(&r).expect("save")).expect("load");
    let fx = r.take_over(2_000);
    assert_eq!(resent(&fx), vec![wave[2].clone(), wave[3].clone()]);
    assert!(installs(&fx).is_empty(), "no new command");
    // Their resend clock restarted (the one that progressed keeps its own):
    // still silent after resend_after_ms, they are asked with a new command.
    assert_eq!(
        installs(&r.tick(2_000 + 29_999, None)),
        vec![wave[0].clone()]
    );
    assert_eq!(
        installs(&r.tick(2_000 + 30_000, None)),
        vec![wave[2].clone(), wave[3].clone()]
    );
    // Outside a wave's installs there is nothing to send.
    let mut done = Rollout::new("idle", &fleet(2), plan(&["2"]), 0).expect("r");
    let all = installs(&done.tick(0, None));
    succeed_all(&mut done, &all, 1);
    assert_eq!(done.phase.name(), "soaking");
    assert!(done.take_over(5).is_empty());
}

#[test]
fn commands_go_out_at_the_configured_rate() {
    let mut p = plan(&["100%"]);
    p.rate_per_minute = 2;
    let mut r = Rollout::new("rate", &fleet(5), p, 0).expect("r");
    // A burst of one minute's worth, then one every 30 s.
    assert_eq!(installs(&r.tick(0, None)).len(), 2);
    assert_eq!(installs(&r.tick(29_999, None)).len(), 0);
    assert_eq!(installs(&r.tick(30_000, None)).len(), 1);
    assert_eq!(installs(&r.tick(59_999, None)).len(), 0);
    assert_eq!(installs(&r.tick(60_000, None)).len(), 1);
    // After a quiet spell the burst is available again, never more.
    let mut p = plan(&["100%"]);
    p.rate_per_minute = 3;
    let mut r = Rollout::new("rate2", &fleet(10), p, 0).expect("r");
    assert_eq!(installs(&r.tick(0, None)).len(), 3);
    assert_eq!(installs(&r.tick(1_000_000, None)).len(), 3);
}

#[test]
fn health_bounds_trip_the_soak_and_equal_values_pass() {
    let mk = || {
        let mut r = Rollout::new("health", &fleet(3), plan(&["1", "100%"]), 0).expect("r");
        let wave = installs(&r.tick(0, None));
        succeed_all(&mut r, &wave, 1);
        assert_eq!(r.phase.name(), "soaking");
        r
    };
    let at_bounds = WaveHealth {
        error_rate: Some(0.05),
        p95_latency_ratio: Some(1.5),
        drift_increase: Some(0.25),
        ..WaveHealth::default()
    };
    let mut r = mk();
    r.tick(5, Some(at_bounds));
    assert_eq!(r.phase.name(), "soaking", "equal to the bound passes");
    let mut r = mk();
    r.tick(
        5,
        Some(WaveHealth {
            error_rate: Some(0.0501),
            ..WaveHealth::default()
        }),
    );
    assert!(
        matches!(&r.phase, Phase::Halted { reason, .. } if reason.contains("error rate")),
        "{:?}",
        r.phase
    );
    let mut r = mk();
    let fx = r.tick(
        5,
        Some(WaveHealth {
            p95_latency_ratio: Some(2.0),
            ..WaveHealth::default()
        }),
    );
    assert!(
        matches!(&r.phase, Phase::Halted { reason, .. } if reason.contains("p95 latency 2.00x")),
        "{:?}",
        r.phase
    );
    assert_eq!(reverts(&fx).len(), 1, "the canary switched and goes back");
    let mut r = mk();
    let fx = r.tick(
        5,
        Some(WaveHealth {
            drift_increase: Some(0.26),
            ..WaveHealth::default()
        }),
    );
    assert!(
        matches!(&r.phase, Phase::Halted { reason, .. } if reason.contains("report drift") && reason.contains("max_drift_increase")),
        "{:?}",
        r.phase
    );
    assert_eq!(reverts(&fx).len(), 1, "a drifting canary goes back too");
    // Unknown health passes.
    let mut r = mk();
    r.tick(5, Some(WaveHealth::default()));
    assert_eq!(r.phase.name(), "soaking");
}

#[test]
fn a_shadow_wave_runs_in_shadow_then_activates_or_stops_shadowing_when_it_disagrees() {
    let mut p = plan(&["1", "100%"]);
    p.shadow_waves = 1;
    let mk = |p: &Plan| {
        let mut r = Rollout::new("shadow", &fleet(3), p.clone(), 0).expect("r");
        let fx = r.tick(0, None);
        let canary = match fx.as_slice() {
            [Effect::InstallShadow(d)] => d.clone(),
            other => panic!("{other:?}"),
        };
        r.apply(
            1,
            Input::Succeeded {
                device: canary.clone(),
            },
        )
        .expect("news");
        assert_eq!(r.phase.name(), "soaking");
        (r, canary)
    };
    // Agreeing: the same wave is told to install (activate) it, then soaks again.
    let (mut r, canary) = mk(&p);
    let good = Some(WaveHealth {
        shadow_agreement: Some(0.95),
        shadow_p95_latency_ratio: Some(1.2),
        ..WaveHealth::default()
    });
    let fx = r.tick(10_001, good);
    assert_eq!(installs(&fx), vec![canary.clone()], "{fx:?}");
    assert!(!r.shadow_stage && r.wave == 0);
    r.apply(10_002, Input::Succeeded { device: canary })
        .expect("news");
    let fx = r.tick(20_003, Some(WaveHealth::default()));
    assert_eq!(
        installs(&fx).len(),
        2,
        "the next wave installs normally: {fx:?}"
    );
    assert!(fx.iter().all(|e| !matches!(e, Effect::InstallShadow(_))));
    // Disagreeing: halted; the canary never switched, so it is told to stop
    // shadowing rather than to revert.
    let (mut r, canary) = mk(&p);
    let fx = r.tick(
        5,
        Some(WaveHealth {
            shadow_agreement: Some(0.5),
            ..WaveHealth::default()
        }),
    );
    assert!(
        matches!(&r.phase, Phase::Halted { reason, .. } if reason.contains("min_shadow_agreement")),
        "{:?}",
        r.phase
    );
    assert_eq!(
        fx.iter()
            .filter(|e| matches!(e, Effect::StopShadow(d) if *d == canary))
            .count(),
        1,
        "{fx:?}"
    );
    assert!(reverts(&fx).is_empty(), "{fx:?}");
    assert!(matches!(r.members[&canary], Member::Reverted { .. }));
    // A plan may not shadow more waves than it has.
    let mut bad = plan(&["1", "100%"]);
    bad.shadow_waves = 3;
    assert!(Rollout::new("x", &fleet(3), bad, 0).is_err());
}

#[test]
fn operator_commands_fit_the_phase_or_are_refused() {
    let mut r = Rollout::new("op", &fleet(4), plan(&["1", "100%"]), 0).expect("r");
    assert_eq!(
        r.apply(0, Input::Resume),
        Err(NotNow {
            action: "resume",
            phase: "installing"
        })
    );
    assert!(r.apply(0, Input::Promote).is_err());
    let canary = installs(&r.tick(0, None));
    succeed_all(&mut r, &canary, 1_000);
    assert_eq!(
        r.phase,
        Phase::Soaking {
            since: 1_000,
            until: 11_000
        }
    );
    // Paused for 5 s during the soak: the soak ends 5 s later.
    r.apply(2_000, Input::Pause).expect("pause");
    assert!(
        r.tick(20_000, None).is_empty(),
        "nothing happens while paused"
    );
    assert!(r.apply(2_500, Input::Pause).is_err());
    r.apply(7_000, Input::Resume).expect("resume");
    assert_eq!(
        r.phase,
        Phase::Soaking {
            since: 1_000,
            until: 16_000
        }
    );
    // Promote skips the rest of the soak and commands the next wave.
    let fx = r.apply(8_000, Input::Promote).expect("promote");
    assert_eq!(installs(&fx).len(), 3);
    assert_eq!(r.wave, 1);
    // Abort with revert: the switched canary goes back; abort twice is refused.
    let fx = r
        .apply(9_000, Input::Abort { revert: true })
        .expect("abort");
    assert_eq!(reverts(&fx), canary);
    assert!(r.apply(9_001, Input::Abort { revert: false }).is_err());
    assert!(r.apply(9_001, Input::Resume).is_err());
}

#[test]
fn resuming_after_a_gate_pause_accepts_the_wave() {
    let mut p = plan(&["1", "100%"]);
    p.policy = FailurePolicy::Pause;
    let mut r = Rollout::new("gp", &fleet(3), p, 0).expect("r");
    let canary = installs(&r.tick(0, None));
    r.apply(
        1,
        Input::Failed {
            device: canary[0].clone(),
            reason: "x".into(),
        },
    )
    .expect("news");
    assert!(matches!(r.phase, Phase::Paused { by_gate: true, .. }));
    let fx = r.apply(2, Input::Resume).expect("resume");
    assert_eq!(r.wave, 1);
    assert_eq!(installs(&fx).len(), 2);
}

#[test]
fn news_about_strangers_and_stale_news_change_nothing() {
    let mut r = Rollout::new("n", &fleet(3), plan(&["1", "100%"]), 0).expect("r");
    r.tick(0, None);
    let before = r.clone();
    r.apply(
        1,
        Input::Succeeded {
            device: id("stranger"),
        },
    )
    .expect("news");
    // Pending devices (not yet asked) cannot have succeeded for this rollout.
    let pending: Vec<DeviceId> = r.waves[1].clone();
    r.apply(
        1,
        Input::Succeeded {
            device: pending[0].clone(),
        },
    )
    .expect("news");
    r.apply(
        1,
        Input::Reverted {
            device: pending[0].clone(),
        },
    )
    .expect("news");
    assert_eq!(r.members, before.members);
}

#[test]
fn plans_are_validated_field_by_field() {
    let mut p = Plan::default();
    assert_eq!(p.validate(), Ok(()));
    p.gates.min_success_ratio = 1.5;
    assert!(
        p.validate()
            .expect_err("refused")
            .to_string()
            .contains("gates.min_success_ratio")
    );
    let mut p = Plan::default();
    p.gates.max_p95_latency_ratio = 0.5;
    assert!(
        p.validate()
            .expect_err("refused")
            .to_string()
            .contains("max_p95_latency_ratio")
    );
    let p = Plan {
        rate_per_minute: 0,
        ..Plan::default()
    };
    assert!(
        p.validate()
            .expect_err("refused")
            .to_string()
            .contains("rate_per_minute")
    );
    let mut p = Plan::default();
    p.waves.clear();
    assert!(
        p.validate()
            .expect_err("refused")
            .to_string()
            .contains("waves")
    );
    assert!(
        Rollout::new("x", &[], Plan::default(), 0)
            .expect_err("refused")
            .to_string()
            .contains("matches no device")
    );
}

/// What the property test feeds the engine.
#[derive(Debug, Clone)]
enum Step {
    Tick(u64),
    Succeed(usize),
    Fail(usize),
    Progress(usize),
    Revert(usize),
    Pause,
    Resume,
    Promote,
    Abort(bool),
    Health(u8, u8),
    Persist,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u64..40_000).prop_map(Step::Tick),
        4 => (0usize..30).prop_map(Step::Succeed),
        2 => (0usize..30).prop_map(Step::Fail),
        1 => (0usize..30).prop_map(Step::Progress),
        1 => (0usize..30).prop_map(Step::Revert),
        1 => Just(Step::Pause),
        1 => Just(Step::Resume),
        1 => Just(Step::Promote),
        1 => any::<bool>().prop_map(Step::Abort),
        1 => (0u8..10, 0u8..30).prop_map(|(e, l)| Step::Health(e, l)),
        1 => Just(Step::Persist),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever happens: installs go only to devices of the current wave or an
    /// earlier one, never to a device that already has a result; reverts only to
    /// devices that switched; counts always add up; a finished rollout commands no
    /// install; and persisting + restoring the state changes nothing.
    #[test]
    fn the_engine_keeps_its_invariants(
        n in 1usize..30,
        halt in any::<bool>(),
        rate in 1u32..20,
        shadow_waves in 0u32..3,
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let mut p = plan(&["1", "10%", "50%", "100%"]);
        p.rate_per_minute = rate;
        p.shadow_waves = shadow_waves;
        p.policy = if halt { FailurePolicy::HaltAndRevert } else { FailurePolicy::Pause };
        let devices = fleet(n);
        let mut r = Rollout::new("prop", &devices, p, 0).expect("r");
        let mut now = 0u64;
        let mut switched: std::collections::BTreeSet<DeviceId> = Default::default();
        let mut shadowed: std::collections::BTreeSet<DeviceId> = Default::default();
        for s in steps {
            let before = r.clone();
            let fx = match s {
                Step::Tick(dt) => { now += dt; r.tick(now, None) }
                Step::Health(e, l) => r.tick(now, Some(WaveHealth {
                    error_rate: Some(f64::from(e) / 100.0),
                    p95_latency_ratio: Some(1.0 + f64::from(l) / 20.0),
                    drift_increase: None,
                    shadow_agreement: Some(1.0 - f64::from(e) / 50.0),
                    shadow_p95_latency_ratio: Some(1.0 + f64::from(l) / 20.0),
                })),
                Step::Succeed(i) => r.apply(now, Input::Succeeded { device: devices[i % n].clone() }).expect("news"),
                Step::Fail(i) => r.apply(now, Input::Failed { device: devices[i % n].clone(), reason: "x".into() }).expect("news"),
                Step::Progress(i) => r.apply(now, Input::Progress { device: devices[i % n].clone(), done: 1, total: 2 }).expect("news"),
                Step::Revert(i) => r.apply(now, Input::Reverted { device: devices[i % n].clone() }).expect("news"),
                Step::Pause => r.apply(now, Input::Pause).unwrap_or_default(),
                Step::Resume => r.apply(now, Input::Resume).unwrap_or_default(),
                Step::Promote => r.apply(now, Input::Promote).unwrap_or_default(),
                Step::Abort(rv) => r.apply(now, Input::Abort { revert: rv }).unwrap_or_default(),
                Step::Persist => {
                    let json = serde_json::to_string(&r).expect("serialise");
                    let back: Rollout = serde_json::from_str(&json).expect("restore");
                    prop_assert_eq!(&back, &r);
                    r = back;
                    Vec::new()
                }
            };
            for e in &fx {
                match e {
                    Effect::Install(d) | Effect::InstallShadow(d) => {
                        prop_assert!(!before.phase.finished(), "install after the end");
                        let w = r.waves.iter().position(|w| w.contains(d)).expect("a member");
                        prop_assert!(w <= r.wave, "{} is in wave {} but the rollout is in {}", d, w, r.wave);
                        prop_assert_eq!(matches!(e, Effect::InstallShadow(_)), r.shadow_stage && w == r.wave,
                            "shadow installs exactly in a shadow stage");
                        prop_assert!(w < shadow_waves as usize || !matches!(e, Effect::InstallShadow(_)));
                        let was = &before.members[d];
                        // After its shadow stage, a wave's devices are asked to activate.
                        let activating = shadowed.contains(d) && matches!(e, Effect::Install(_));
                        prop_assert!(matches!(was, Member::Pending | Member::Commanded { .. }) || activating,
                            "install to {} which was {:?}", d, was);
                    }
                    Effect::Revert(d) => {
                        prop_assert!(switched.contains(d) || matches!(before.members.get(d), Some(Member::Commanded { .. } | Member::Failed { .. } | Member::Reverting { .. })),
                            "revert to {} which never switched", d);
                        prop_assert!(!(before.shadow_stage && before.waves[before.wave].contains(d)),
                            "revert to {} whose wave only runs the bundle in shadow", d);
                    }
                    Effect::StopShadow(d) => {
                        prop_assert!(before.shadow_stage && before.waves[before.wave].contains(d),
                            "stop-shadow to {} outside a shadow stage", d);
                    }
                    Effect::Resend(again) => {
                        let (d, was_sent) = match again.as_ref() {
                            Effect::Install(d) | Effect::InstallShadow(d) => (d, matches!(before.members[d], Member::Commanded { .. })),
                            Effect::Revert(d) => (d, matches!(before.members[d], Member::Reverting { .. })),
                            other => panic!("resend of {other:?}"),
                        };
                        prop_assert!(was_sent, "a resend to {} which was {:?}", d, before.members[d]);
                    }
                    Effect::Note(_) => {}
                }
            }
            for (d, m) in &r.members {
                if matches!(m, Member::Succeeded { .. }) {
                    if r.shadow_stage && r.waves[r.wave].contains(d) {
                        shadowed.insert(d.clone());
                    } else {
                        switched.insert(d.clone());
                    }
                }
            }
            let c = r.counts(None);
            prop_assert_eq!(c.pending + c.in_progress + c.succeeded + c.failed + c.reverted, n);
            let per_wave: usize = (0..r.waves.len()).map(|w| {
                let c = r.counts(Some(w));
                c.pending + c.in_progress + c.succeeded + c.failed + c.reverted
            }).sum();
            prop_assert_eq!(per_wave, n);
            // The install gate's running tally agrees with a count from
            // scratch, whether it was built before these steps or after a
            // restore (Persist drops it).
            let counted = r.counts(Some(r.wave));
            prop_assert_eq!(r.wave_counts(), counted);
        }
    }
}

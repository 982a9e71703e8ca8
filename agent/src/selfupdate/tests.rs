use super::*;

const T0: UnixTime = UnixTime(1_800_000_000);
const WITHIN: u32 = 60;

fn release(n: u64) -> Release {
    Release {
        digest: Digest::of(format!("agent release {n}").as_bytes()),
        release: n,
        version: format!("1.{n}.0"),
    }
}

fn trial(from: BinarySlot, n: u64) -> AgentUpdateState {
    AgentUpdateState::default()
        .begin_trial(from, &release(n), T0, WITHIN)
        .unwrap_or_else(|e| panic!("begin: {e}"))
}

fn phase_of(s: &AgentUpdateState) -> Option<Phase> {
    s.current.as_ref().map(|r| r.phase)
}

#[test]
fn every_start_is_decided_by_the_phase_the_slot_and_the_deadline() {
    use BinarySlot::{A, B};
    let before = T0;
    let after = UnixTime(T0.0 + i64::from(WITHIN));
    let base = trial(A, 2);
    let confirmed = base.confirm();
    let committed = confirmed.commit();
    let failed = base.fail(TrialFailure::Crashed);
    let deadline = UnixTime(T0.0 + i64::from(WITHIN));
    let cases: Vec<(&AgentUpdateState, Option<BinarySlot>, UnixTime, Start)> = vec![
        (&base, Some(B), before, Start::Trial { deadline }),
        (
            &base,
            Some(B),
            after,
            Start::Revert(TrialFailure::NoConfirmation),
        ),
        (&base, Some(A), before, Start::Revert(TrialFailure::Crashed)),
        (
            &base,
            Some(A),
            after,
            Start::Revert(TrialFailure::NoConfirmation),
        ),
        (&base, None, before, Start::Revert(TrialFailure::Crashed)),
        (
            &base,
            None,
            after,
            Start::Revert(TrialFailure::NoConfirmation),
        ),
        (&confirmed, Some(B), before, Start::FinishCommit),
        (&confirmed, Some(B), after, Start::FinishCommit),
        (
            &confirmed,
            Some(A),
            before,
            Start::Revert(TrialFailure::Interrupted),
        ),
        (
            &confirmed,
            None,
            after,
            Start::Revert(TrialFailure::Interrupted),
        ),
    ];
    for (state, running, now, want) in cases {
        assert_eq!(
            state.on_start(running, now),
            want,
            "{:?} from {running:?} at {now:?}",
            phase_of(state)
        );
    }
    for state in [&committed, &failed, &AgentUpdateState::default()] {
        for running in [Some(A), Some(B), None] {
            for now in [before, after] {
                assert_eq!(state.on_start(running, now), Start::Normal);
            }
        }
    }
}

/// The device as the hand-over leaves it at each step: the persisted state, the
/// slot the link names, and the slot the running process was started from.
#[derive(Debug, Clone)]
struct Device {
    state: AgentUpdateState,
    link: BinarySlot,
    running: Option<BinarySlot>,
}

/// The steps of a hand-over from A to B, in order, as the shell takes them
/// (each is one durable write, one rename or one exec).
fn step(d: &Device, i: usize) -> Device {
    let mut d = d.clone();
    match i {
        0 => d.state = trial(BinarySlot::A, 2),
        1 => d.running = Some(BinarySlot::B), // execve of agent.b
        2 => d.state = d.state.confirm(),
        3 => d.link = BinarySlot::B, // rename of the new link
        4 => d.state = d.state.commit(),
        _ => {}
    }
    d
}

const STEPS: usize = 5;

/// A restart: the supervisor (or the boot) starts what the link names, and the
/// agent carries out its start decision. Returns the device afterwards.
fn restart(d: &Device, now: UnixTime) -> Device {
    let mut d = d.clone();
    d.running = Some(d.link);
    match d.state.on_start(d.running, now) {
        Start::Normal | Start::Trial { .. } => {}
        Start::FinishCommit => {
            d.link = d.state.current.as_ref().map_or(d.link, |r| r.to);
            d.state = d.state.commit();
        }
        Start::Revert(why) => d.state = d.state.fail(why),
    }
    d
}

#[test]
fn a_kill_or_power_cut_at_any_step_leaves_a_consistent_agent_old_or_new() {
    for crash_after in 0..=STEPS {
        for now in [T0, UnixTime(T0.0 + 3600)] {
            let mut d = Device {
                state: AgentUpdateState::default(),
                link: BinarySlot::A,
                running: Some(BinarySlot::A),
            };
            for i in 0..crash_after {
                d = step(&d, i);
            }
            let after = restart(&d, now);
            // Once more: a second restart changes nothing (decisions settle).
            let again = restart(&after, now);
            assert_eq!(after.state, again.state, "crash after {crash_after} steps");
            assert_eq!(after.link, again.link);
            let phase = phase_of(&after.state);
            match after.link {
                BinarySlot::B => {
                    assert_eq!(phase, Some(Phase::Committed), "crash after {crash_after}");
                    assert_eq!(after.state.floor.as_ref().map(|f| f.release), Some(2));
                }
                BinarySlot::A => {
                    assert!(
                        matches!(phase, None | Some(Phase::Failed)),
                        "crash after {crash_after}: {phase:?}"
                    );
                    assert_eq!(after.state.floor, None);
                }
            }
            assert_eq!(
                after.state.link_target().unwrap_or(BinarySlot::A),
                after.link
            );
            // The running agent is what the link names: never a slot that the
            // record does not back.
            assert_eq!(after.running, Some(after.link));
        }
    }
}

#[test]
fn a_lower_or_reused_release_a_failed_one_and_a_second_trial_are_refused() {
    let committed = trial(BinarySlot::A, 5).confirm().commit();
    assert_eq!(committed.floor.as_ref().map(|f| f.release), Some(5));
    assert!(matches!(
        committed.begin_trial(BinarySlot::B, &release(4), T0, WITHIN),
        Err(BeginError::Refused(Refusal::Rollback {
            release: 4,
            installed: 5,
            ..
        }))
    ));
    let mut same_number = release(5);
    same_number.digest = Digest::of(b"other content");
    assert!(matches!(
        committed.begin_trial(BinarySlot::B, &same_number, T0, WITHIN),
        Err(BeginError::Refused(Refusal::ReleaseReused {
            release: 5,
            ..
        }))
    ));
    let failed = committed
        .begin_trial(BinarySlot::B, &release(6), T0, WITHIN)
        .map(|s| s.fail(TrialFailure::NoConfirmation));
    let Ok(failed) = failed else {
        panic!("release 6 begins")
    };
    assert_eq!(
        failed.begin_trial(BinarySlot::B, &release(6), T0, WITHIN),
        Err(BeginError::AlreadyFailed(release(6).digest))
    );
    // The floor did not move with the failed trial; a fixed release 7 may go.
    assert_eq!(failed.floor.as_ref().map(|f| f.release), Some(5));
    let seven = failed.begin_trial(BinarySlot::B, &release(7), T0, WITHIN);
    assert_eq!(seven.as_ref().ok().and_then(phase_of), Some(Phase::Trial));
    let busy = seven.and_then(|s| s.begin_trial(BinarySlot::B, &release(8), T0, WITHIN));
    assert_eq!(busy, Err(BeginError::Busy { release: 7 }));
}

#[test]
fn steps_out_of_order_change_nothing_and_the_failed_list_is_bounded() {
    let idle = AgentUpdateState::default();
    assert_eq!(idle.confirm(), idle);
    assert_eq!(idle.commit(), idle);
    assert_eq!(idle.fail(TrialFailure::Crashed), idle);
    let t = trial(BinarySlot::B, 3);
    // Commit without confirmation, or fail after the commit: no change.
    assert_eq!(t.commit(), t);
    let done = t.confirm().commit();
    assert_eq!(done.fail(TrialFailure::Crashed), done);
    assert_eq!(
        done.current.as_ref().map(|r| (r.from, r.to)),
        Some((BinarySlot::B, BinarySlot::A))
    );

    let mut s = AgentUpdateState::default();
    for n in 0..(MAX_FAILED as u64 + 5) {
        s = s
            .begin_trial(BinarySlot::A, &release(100 + n), T0, WITHIN)
            .map(|s| s.fail(TrialFailure::Crashed))
            .unwrap_or_else(|e| panic!("release {n}: {e}"));
    }
    assert_eq!(s.failed.len(), MAX_FAILED);
    assert_eq!(
        s.failed.last(),
        Some(&release(100 + MAX_FAILED as u64 + 4).digest)
    );
    assert!(!s.failed.contains(&release(100).digest));
}

#[test]
fn the_record_round_trips_as_json_and_slot_names_are_fixed() {
    let s = trial(BinarySlot::A, 2).confirm();
    let text = serde_json::to_string(&s).unwrap_or_default();
    assert!(text.contains("\"phase\":\"confirmed\""), "{text}");
    let back: Result<AgentUpdateState, _> = serde_json::from_str(&text);
    assert_eq!(back.ok(), Some(s));
    for slot in [BinarySlot::A, BinarySlot::B] {
        assert_eq!(BinarySlot::from_file_name(slot.file_name()), Some(slot));
        assert_eq!(slot.other().other(), slot);
    }
    assert_eq!(BinarySlot::from_file_name("edgefleet-agent"), None);
}

#[test]
fn the_outcome_is_reported_once_and_only_when_the_update_ended() {
    let t = trial(BinarySlot::A, 2);
    assert_eq!(t.unreported_event(), None);
    assert_eq!(t.confirm().unreported_event(), None);
    let done = t.confirm().commit();
    let digest = release(2).digest;
    assert_eq!(
        done.unreported_event(),
        Some(EventKind::AgentUpdated {
            digest,
            version: "1.2.0".into(),
            release: 2
        })
    );
    assert_eq!(done.mark_reported().unreported_event(), None);
    let lost = t.fail(TrialFailure::NoConfirmation);
    assert_eq!(
        lost.unreported_event(),
        Some(EventKind::AgentUpdateFailed {
            digest,
            reason: AgentUpdateFailure::Trial {
                failure: TrialFailure::NoConfirmation
            }
        })
    );
    assert_eq!(lost.mark_reported().unreported_event(), None);
    // A trial is never marked: its outcome is still to come.
    assert_eq!(t.mark_reported(), t);
}

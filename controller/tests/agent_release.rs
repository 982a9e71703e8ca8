//! `edgefleet agent-release build` and the agent-release signing role, as an
//! operator runs them: the real `edgefleet` binary, the real agent binary, real
//! key and trust root files (docs/agent-update.md).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::EDGEFLEET;

fn ef(dir: &Path, args: &[&str]) -> Output {
    Command::new(EDGEFLEET)
        .args(args)
        .current_dir(dir)
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .expect("edgefleet runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = ef(dir, args);
    assert!(
        out.status.success(),
        "edgefleet {args:?} failed:\n{}",
        text(&out)
    );
    text(&out)
}

/// Fails with `code`; returns what it printed.
fn fails(dir: &Path, code: i32, args: &[&str]) -> String {
    let out = ef(dir, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "edgefleet {args:?} should fail with {code}:\n{}",
        text(&out)
    );
    text(&out)
}

/// A minimal static 64-bit ELF executable for `machine` (a header and one
/// loadable segment): enough for the build's architecture check.
fn fake_static_elf(machine: u16) -> Vec<u8> {
    let mut b = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
    b.resize(16, 0);
    b.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b.extend_from_slice(&machine.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    for v in [0u64, 64, 0] {
        b.extend_from_slice(&v.to_le_bytes()); // entry, phoff, shoff
    }
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b.extend_from_slice(&5u32.to_le_bytes());
    for v in [0u64, 0, 0, 120, 120, 0x1000] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// Model keys (alice, bob; 1 of 2) and a release key (rel) in a root with the
/// role, and `old-root.cbor` without it.
fn setup(d: &Path) {
    for name in ["alice", "bob", "rel", "rel2"] {
        ok(d, &["keys", "generate", "--out", "keys", "--name", name]);
    }
    let out = ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "keys/alice.key",
            "--key",
            "keys/bob.pub",
            "--threshold",
            "1",
            "--agent-release-key",
            "keys/rel.pub",
            "--agent-release-key",
            "keys/rel2.pub",
            "--agent-release-threshold",
            "1",
            "--out",
            "root.cbor",
        ],
    );
    assert!(
        out.contains("agent releases: 2 key(s), threshold 1"),
        "{out}"
    );
    assert!(out.contains("complete: devices can pin it"), "{out}");
    let out = ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "keys/alice.key",
            "--threshold",
            "1",
            "--out",
            "old-root.cbor",
        ],
    );
    assert!(out.contains("agent releases: no role"), "{out}");
}

/// `agent-release build` of `binaries` (file, target) as 1.3.0 release 2 into
/// agent.efb, then `extra`.
fn build_args(binaries: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["agent-release".into(), "build".into()];
    for (binary, target) in binaries {
        args.extend(["--binary", binary, "--target", target].map(String::from));
    }
    let rest = ["--version", "1.3.0", "--release", "2", "--out", "agent.efb"];
    args.extend(rest.iter().chain(extra).map(|a| a.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn a_release_is_built_from_each_targets_binary_and_signed_by_the_release_role_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d);
    // A real, dynamically linked executable of this machine (the debug agent
    // is over the 256 MiB cap of an agent binary).
    let agent = "/usr/bin/true";
    std::fs::write(d.join("agent-aarch64"), fake_static_elf(183)).expect("write");
    std::fs::write(d.join("script"), "#!/bin/sh\necho hi\n").expect("write");
    let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let aarch64 = ("agent-aarch64", "aarch64-unknown-linux-musl");

    for (binaries, why) in [
        // The host build needs glibc's loader: refused unless the operator says so.
        (
            vec![(agent, host.as_str())],
            "is not static: it needs a dynamic loader".to_string(),
        ),
        // A binary given for another architecture's target.
        (
            vec![("agent-aarch64", "armv7-unknown-linux-musleabihf")],
            "is an aarch64 binary, but --target armv7-unknown-linux-musleabihf is arm".into(),
        ),
        // Two binaries for one architecture, and a script.
        (vec![aarch64, aarch64], "is a second aarch64 binary".into()),
        (
            vec![("script", "aarch64-unknown-linux-musl")],
            "script: not an ELF executable".into(),
        ),
    ] {
        let out = fails(d, 1, &strs(&build_args(&binaries, &[])));
        assert!(out.contains(&why), "{why}: {out}");
        assert!(!d.join("agent.efb").exists());
    }

    let both = [(agent, host.as_str()), aarch64];
    let out = ok(d, &strs(&build_args(&both, &["--allow-dynamic"])));
    assert!(out.contains("agent release 1.3.0 (release 2)"), "{out}");
    let own = format!("edgefleet-agent.{} (agent", std::env::consts::ARCH);
    assert!(out.contains(&own), "{out}");
    assert!(out.contains("edgefleet-agent.aarch64 (agent"), "{out}");
    assert!(out.contains("unsigned: sign it with"), "{out}");

    // Unsigned, then signed by a model key: refused. Signed by a release key: verified.
    let out = fails(
        d,
        1,
        &["bundle", "verify", "agent.efb", "--trust", "root.cbor"],
    );
    assert!(out.contains("too_few_signatures"), "{out}");
    ok(
        d,
        &["bundle", "sign", "agent.efb", "--key", "keys/alice.key"],
    );
    let out = fails(
        d,
        1,
        &["bundle", "verify", "agent.efb", "--trust", "root.cbor"],
    );
    assert!(out.contains("REFUSED (unknown_key)"), "{out}");
    ok(
        d,
        &["bundle", "sign", "agent.efb", "--key", "keys/rel2.key"],
    );
    let out = ok(
        d,
        &["bundle", "verify", "agent.efb", "--trust", "root.cbor"],
    );
    assert!(out.contains("OK: agent.efb verified"), "{out}");
    assert!(out.contains("agent release 1.3.0 (release 2)"), "{out}");
    // A root made before agent releases refuses it, saying why.
    let out = fails(
        d,
        1,
        &["bundle", "verify", "agent.efb", "--trust", "old-root.cbor"],
    );
    assert!(out.contains("REFUSED (no_signing_role)"), "{out}");
    assert!(
        out.contains("no keys that may sign an agent release"),
        "{out}"
    );
}

#[test]
fn rotation_keeps_or_replaces_the_release_role() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d);
    let out = ok(
        d,
        &[
            "trust",
            "rotate",
            "--current",
            "root.cbor",
            "--key",
            "keys/alice.key",
            "--threshold",
            "1",
            "--sign-with",
            "keys/alice.key",
            "--out",
            "root2.cbor",
        ],
    );
    assert!(
        out.contains("agent releases: 2 key(s), threshold 1"),
        "{out}"
    );
    ok(
        d,
        &["trust", "verify", "root2.cbor", "--current", "root.cbor"],
    );
    let out = ok(
        d,
        &[
            "trust",
            "rotate",
            "--current",
            "root2.cbor",
            "--key",
            "keys/alice.key",
            "--threshold",
            "1",
            "--sign-with",
            "keys/alice.key",
            "--agent-release-key",
            "keys/bob.pub",
            "--out",
            "root3.cbor",
        ],
    );
    assert!(
        out.contains("agent releases: 1 key(s), threshold 1"),
        "{out}"
    );
    ok(
        d,
        &["trust", "verify", "root3.cbor", "--current", "root2.cbor"],
    );
    // A release threshold over its keys is refused, naming the role.
    let out = fails(
        d,
        1,
        &[
            "trust",
            "init",
            "--key",
            "keys/alice.key",
            "--threshold",
            "1",
            "--agent-release-key",
            "keys/rel.pub",
            "--agent-release-threshold",
            "2",
            "--out",
            "bad.cbor",
        ],
    );
    assert!(
        out.contains("agent_releases: threshold 2 is outside 1..=1"),
        "{out}"
    );
}

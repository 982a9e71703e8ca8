//! The operator CLI as a user runs it: the real `edgefleet` binary on real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");

fn ef<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgefleet"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .expect("edgefleet runs")
}

fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, args: &[S]) -> String {
    let out = ef(dir, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "edgefleet {args:?} failed:\n{text}");
    text
}

fn fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, args: &[S]) -> String {
    let out = ef(dir, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "edgefleet {args:?} should fail with 1:\n{text}"
    );
    text
}

fn model(name: &str) -> String {
    format!("{MODELS}/{name}")
}

/// `bundle build` of the iris model as iris 1.0.0 release 1, then `rest`.
fn iris_build(rest: &[&str]) -> Vec<String> {
    iris_build_release("1", rest)
}

/// `bundle build` of the iris model as iris 1.0.0 at `release`, then `rest`.
fn iris_build_release(release: &str, rest: &[&str]) -> Vec<String> {
    let model = model("iris_logreg.onnx");
    let head = [
        "bundle",
        "build",
        "--model",
        &model,
        "--channel",
        "iris",
        "--version",
        "1.0.0",
        "--release",
        release,
    ];
    head.iter().chain(rest).map(|a| (*a).to_owned()).collect()
}

/// Keys alice, bob, carol and a 2-of-3 trust root signed by alice and bob.
fn setup(dir: &Path) {
    for name in ["alice", "bob", "carol"] {
        ok(dir, &["keys", "generate", "--out", "keys", "--name", name]);
    }
    let out = ok(
        dir,
        &[
            "trust",
            "init",
            "--key",
            "keys/alice.key",
            "--key",
            "keys/bob.key",
            "--key",
            "keys/carol.pub",
            "--threshold",
            "2",
            "--out",
            "root.cbor",
        ],
    );
    assert!(out.contains("complete: devices can pin it"), "{out}");
}

fn build(dir: &Path, out: &str, release: &str) -> String {
    let (reference, golden) = (model("iris_reference.csv"), model("iris_golden.json"));
    ok(
        dir,
        &iris_build_release(
            release,
            &["--reference", &reference, "--golden", &golden, "--out", out],
        ),
    )
}

#[test]
fn keys_are_pem_and_the_secret_one_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    ok(
        dir.path(),
        &["keys", "generate", "--out", "k", "--name", "ops"],
    );
    let secret = dir.path().join("k/ops.key");
    let mode = std::fs::metadata(&secret)
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        std::fs::read_to_string(&secret)
            .expect("pem")
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert!(
        std::fs::read_to_string(dir.path().join("k/ops.pub"))
            .expect("pem")
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    // Standard files: OpenSSL reads the secret key, and the public key it
    // derives from it is the .pub file.
    let derived = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&secret)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        derived.status.success(),
        "openssl pkey: {}",
        String::from_utf8_lossy(&derived.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&derived.stdout),
        std::fs::read_to_string(dir.path().join("k/ops.pub")).expect("pem")
    );
    let again = fails(
        dir.path(),
        &["keys", "generate", "--out", "k", "--name", "ops"],
    );
    assert!(again.contains("refusing to overwrite"), "{again}");
}

#[test]
fn build_sign_verify_inspect_round_trip_and_a_tampered_copy_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d);
    let built = build(d, "iris.efb", "1");
    assert!(
        built.contains("features f32 [N, 4]") && built.contains("unsigned"),
        "{built}"
    );
    // Unsigned: refused with the reason and exit code 1.
    let refused = fails(d, &["bundle", "verify", "iris.efb", "--trust", "root.cbor"]);
    assert!(refused.contains("too_few_signatures"), "{refused}");
    // One signature is not enough for 2 of 3; two are.
    ok(
        d,
        &["bundle", "sign", "iris.efb", "--key", "keys/alice.key"],
    );
    let refused = fails(
        d,
        &[
            "bundle",
            "verify",
            "iris.efb",
            "--trust",
            "root.cbor",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&refused).expect("json");
    assert_eq!(v["code"], "too_few_signatures");
    assert_eq!(v["reason"]["valid"], 1);
    ok(d, &["bundle", "sign", "iris.efb", "--key", "keys/bob.key"]);
    let verified = ok(
        d,
        &[
            "bundle",
            "verify",
            "iris.efb",
            "--trust",
            "root.cbor",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&verified).expect("json");
    assert_eq!(v["ok"], true);
    assert_eq!(v["release"], 1);
    assert_eq!(v["signed_by"].as_array().map(|a| a.len()), Some(2));

    // A bundle can carry metadata files (label maps, preprocessing notes).
    std::fs::write(
        d.join("labels.json"),
        r#"["setosa","versicolor","virginica"]"#,
    )
    .expect("w");
    ok(
        d,
        &iris_build(&[
            "--metadata",
            "labels.json",
            "--key",
            "keys/alice.key",
            "--key",
            "keys/bob.key",
            "--out",
            "meta.efb",
        ]),
    );
    let meta: serde_json::Value =
        serde_json::from_str(&ok(d, &["bundle", "inspect", "meta.efb", "--json"])).expect("json");
    let kinds: Vec<&str> = meta["manifest"]["artifacts"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|a| a["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["model", "golden", "metadata"]);
    ok(d, &["bundle", "verify", "meta.efb", "--trust", "root.cbor"]);

    let inspect = ok(d, &["bundle", "inspect", "iris.efb", "--json"]);
    let i: serde_json::Value = serde_json::from_str(&inspect).expect("json");
    assert_eq!(i["digest"], v["digest"]);
    assert_eq!(i["manifest"]["channel"], "iris");
    assert_eq!(
        i["manifest"]["artifacts"].as_array().map(|a| a.len()),
        Some(3)
    );
    assert_eq!(i["verified"], false);

    // Flip one byte near the end (inside an artifact): refused, original unharmed.
    let mut bytes = std::fs::read(d.join("iris.efb")).expect("bundle");
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    std::fs::write(d.join("bad.efb"), &bytes).expect("write");
    let refused = fails(d, &["bundle", "verify", "bad.efb", "--trust", "root.cbor"]);
    assert!(
        refused.contains("REFUSED (chunk_digest_mismatch)")
            || refused.contains("REFUSED (artifact_digest_mismatch)"),
        "{refused}"
    );
    ok(d, &["bundle", "verify", "iris.efb", "--trust", "root.cbor"]);
}

#[test]
fn a_model_tract_cannot_run_is_refused_at_build_naming_the_operator_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let out = fails(
        d,
        &[
            "bundle",
            "build",
            "--model",
            &model("sklearn/unsupported_operator.onnx"),
            "--channel",
            "iris",
            "--version",
            "1.0.0",
            "--release",
            "1",
            "--out",
            "x.efb",
        ],
    );
    assert!(out.contains("ONNX operator `DictVectorizer`"), "{out}");
    assert!(!d.join("x.efb").exists());
    let leftovers: Vec<PathBuf> = std::fs::read_dir(d)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn bad_inputs_get_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Golden outputs the model does not produce.
    std::fs::write(
        d.join("g.json"),
        r#"{"cases":[{"inputs":{"features":[[5.0,3.4,1.5,0.2]]},"outputs":{"label":[2]}}]}"#,
    )
    .expect("w");
    let out = fails(d, &iris_build(&["--golden", "g.json", "--out", "x.efb"]));
    assert!(
        out.contains("golden case 0 output `label`") && out.contains("the file says 2"),
        "{out}"
    );
    // Wrong input width in golden inputs.
    std::fs::write(
        d.join("g.json"),
        r#"{"cases":[{"inputs":{"features":[[5.0,3.4,1.5]]}}]}"#,
    )
    .expect("w");
    let out = fails(d, &iris_build(&["--golden", "g.json", "--out", "x.efb"]));
    assert!(
        out.contains("input `features`") && out.contains("[N, 4]"),
        "{out}"
    );
    // Non-numeric reference data names the line and column.
    std::fs::write(d.join("r.csv"), "a,b,c,d\n1,2,3,4\n1,x,3,4\n").expect("w");
    let out = fails(d, &iris_build(&["--reference", "r.csv", "--out", "x.efb"]));
    assert!(out.contains("line 3") && out.contains("`b`"), "{out}");
    // Out-of-range drift thresholds name the threshold.
    let logreg = model("iris_logreg.onnx");
    let build_with = |reference: &str, extra: &[&str]| {
        let mut args = vec![
            "bundle",
            "build",
            "--model",
            logreg.as_str(),
            "--channel",
            "iris",
            "--version",
            "1.0.0",
            "--release",
            "1",
            "--reference",
            reference,
            "--out",
            "x.efb",
        ];
        args.extend_from_slice(extra);
        args.iter()
            .map(|a| (*a).to_owned())
            .collect::<Vec<String>>()
    };
    let args = build_with(&model("iris_reference.csv"), &["--drift-p-value", "1.5"]);
    let out = fails(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("p_value"), "{out}");
    // Reference data as .npy (a float32 array, as numpy.save writes it); a
    // damaged one is refused with the reason.
    let rows: Vec<Vec<f32>> = std::fs::read_to_string(model("iris_reference.csv"))
        .expect("csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().expect("n")).collect())
        .collect();
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, 4), }}",
        rows.len()
    );
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<117}\n");
    npy.extend((padded.len() as u16).to_le_bytes());
    npy.extend(padded.as_bytes());
    for r in &rows {
        for v in r {
            npy.extend(v.to_le_bytes());
        }
    }
    std::fs::write(d.join("ref.npy"), &npy).expect("w");
    let args = build_with("ref.npy", &["--drift-psi", "0.2"]);
    let out = ok(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.contains(&format!("reference    {} rows summarised", rows.len())),
        "{out}"
    );
    std::fs::remove_file(d.join("x.efb")).expect("rm");
    std::fs::write(d.join("bad.npy"), &npy[..npy.len() - 3]).expect("w");
    let args = build_with("bad.npy", &[]);
    let out = fails(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("bytes of data"), "{out}");
    // Invalid channel name: rejected by argument parsing (exit 2) naming the rule.
    let bad = ef(
        d,
        &[
            "bundle",
            "build",
            "--model",
            "m",
            "--channel",
            "../etc",
            "--version",
            "1.0.0",
            "--release",
            "1",
            "--out",
            "x",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("model channel"));
    // A file that is not a bundle.
    std::fs::write(d.join("junk.efb"), b"hello").expect("w");
    let out = fails(d, &["bundle", "inspect", "junk.efb"]);
    assert!(out.contains("wrong magic"), "{out}");
    assert!(!d.join("x.efb").exists());
}

#[test]
fn key_rotation_needs_both_the_old_and_the_new_threshold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d);
    ok(d, &["keys", "generate", "--out", "keys", "--name", "dave"]);
    ok(d, &["keys", "generate", "--out", "keys", "--name", "erin"]);
    // Signed by the new keys and only one old key: not acceptable yet.
    let out = ok(
        d,
        &[
            "trust",
            "rotate",
            "--current",
            "root.cbor",
            "--key",
            "keys/dave.key",
            "--key",
            "keys/erin.key",
            "--threshold",
            "2",
            "--sign-with",
            "keys/alice.key",
            "--out",
            "root2.cbor",
        ],
    );
    assert!(out.contains("not yet acceptable"), "{out}");
    let out = fails(
        d,
        &["trust", "verify", "root2.cbor", "--current", "root.cbor"],
    );
    assert!(out.contains("current root"), "{out}");
    ok(d, &["trust", "sign", "root2.cbor", "--key", "keys/bob.key"]);
    let out = ok(
        d,
        &["trust", "verify", "root2.cbor", "--current", "root.cbor"],
    );
    assert!(out.contains("OK"), "{out}");
    // A bundle signed by the retired keys is refused under the new root.
    build(d, "iris.efb", "1");
    ok(
        d,
        &[
            "bundle",
            "sign",
            "iris.efb",
            "--key",
            "keys/alice.key",
            "--key",
            "keys/bob.key",
        ],
    );
    let out = fails(
        d,
        &["bundle", "verify", "iris.efb", "--trust", "root2.cbor"],
    );
    assert!(out.contains("unknown_key"), "{out}");
    ok(
        d,
        &[
            "bundle",
            "sign",
            "iris.efb",
            "--key",
            "keys/dave.key",
            "--key",
            "keys/erin.key",
        ],
    );
    ok(
        d,
        &["bundle", "verify", "iris.efb", "--trust", "root2.cbor"],
    );
}

#[test]
fn the_demo_runs_to_a_successful_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = ok(dir.path(), &["demo", "--dir", "demo", "--devices", "6"]);
    for expected in [
        "6 devices online",
        "rollout complete: 6 devices switched, 0 failed",
        "fleet now: 6 on 1.0.0",
        "FAILED: health_check",
        "gate tripped, halting",
        "is offline for the controller",
        "-> label [2]",
        "with no gap in sequence numbers",
        "demo finished in",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    assert!(!out.contains("UNEXPECTED"), "{out}");
    assert!(dir.path().join("demo/iris-1.0.0.efb").exists());
    assert!(dir.path().join("demo/controller/admin-token").exists());
    assert!(dir.path().join("demo/devices/dev-001/state.json").exists());
}

#[test]
fn the_demo_refuses_a_fleet_size_it_cannot_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = fails(dir.path(), &["demo", "--devices", "0"]);
    assert!(out.contains("--devices 0: must be 1 to 500"), "{out}");
}

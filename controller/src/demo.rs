//! `edgefleet demo`: the story on one machine with no setup.
//!
//! Today it shows the part that exists: the signed-bundle workflow an operator
//! runs and the checks a device applies before a model may run. The controller,
//! simulated fleet and staged rollout join it with issues 3-5 of the tracker.

use std::path::Path;
use std::time::Instant;

use edgefleet_agent::store::{Store, install_file, load_active};
use edgefleet_shared::bundle::{DeviceFacts, InstalledRelease};
use edgefleet_shared::golden::GoldenSet;
use edgefleet_shared::manifest::HealthPolicy;
use edgefleet_shared::protocol::InstallMode;
use edgefleet_shared::{Arch, Limits, ModelChannel, Policy, RawHeader, UnixTime};

use crate::operator::{self, BuildOptions, KeyFile, OperatorError};

const IRIS_MODEL: &[u8] = include_bytes!("../../models/iris_logreg.onnx");
const IRIS_BROKEN: &[u8] = include_bytes!("../../models/iris_logreg_v2_broken.onnx");
const IRIS_REFERENCE: &[u8] = include_bytes!("../../models/iris_reference.csv");
const IRIS_GOLDEN: &[u8] = include_bytes!("../../models/iris_golden.json");

fn step(n: u32, total: u32, text: &str) {
    println!("\n[{n}/{total}] {text}");
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), OperatorError> {
    operator::write_atomic(path, 0o644, |w| w.write_all(bytes))
}

/// Runs the demo in `dir` (or a temporary directory). Returns the exit code.
pub fn run(dir: Option<&Path>) -> Result<i32, OperatorError> {
    let temp;
    let is_temp = dir.is_none();
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|source| OperatorError::Io {
                path: d.to_owned(),
                source,
            })?;
            d.to_owned()
        }
        None => {
            temp = tempfile::tempdir().map_err(|source| OperatorError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
            temp.path().to_owned()
        }
    };
    let now = UnixTime::now();
    const STEPS: u32 = 7;
    println!(
        "edgefleet demo: signed model bundles, from the operator's laptop to the device's checks"
    );
    println!("working in {}", dir.display());
    println!("(this release covers the bundle contract and the agent's local install path; the");
    println!(" controller, the simulated fleet and the staged rollout are not built yet and are");
    println!(" not shown)");

    step(
        1,
        STEPS,
        "operator creates three signing keys (they never leave the operator)",
    );
    let keys_dir = dir.join("keys");
    let mut secrets = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let (secret, _, key) = operator::generate_key(&keys_dir, name)?;
        println!(
            "  {name:<6} key {}  {}",
            key.public().id().short(),
            secret.display()
        );
        secrets.push(key);
    }

    step(
        2,
        STEPS,
        "trust root: any 2 of the 3 keys must sign; devices pin it at flash time",
    );
    let key_files: Vec<KeyFile> = secrets
        .iter()
        .map(|k| KeyFile::Public(k.public()))
        .collect();
    let root_file = operator::new_trust_root(&key_files, 2, 1, now.plus_days(365), &secrets[..2])?;
    let root_path = dir.join("trust-root.cbor");
    operator::save_trust_root(&root_path, &root_file)?;
    let root = operator::load_trust_root(&root_path, now)?;
    println!(
        "  {} (version {}, threshold {} of {}, signed by alice and bob)",
        root_path.display(),
        root.version,
        root.threshold,
        root.keys.len()
    );

    step(
        3,
        STEPS,
        "build the iris classifier bundle: tract loads and runs the model first",
    );
    let model_path = dir.join("iris_logreg.onnx");
    write(&model_path, IRIS_MODEL)?;
    let reference_path = dir.join("iris_reference.csv");
    write(&reference_path, IRIS_REFERENCE)?;
    let golden_path = dir.join("iris_golden.json");
    write(&golden_path, IRIS_GOLDEN)?;
    let channel = ModelChannel::new("iris").map_err(|e| OperatorError::Input {
        what: "channel".into(),
        detail: e.to_string(),
    })?;
    let options = |model: &Path, release: u64| BuildOptions {
        model: model.to_owned(),
        channel: channel.clone(),
        version: semver::Version::new(1, release, 0),
        release,
        reference: Some(reference_path.clone()),
        golden: Some(golden_path.clone()),
        metadata: vec![],
        now,
        expires_in_days: 90,
        architectures: vec![],
        min_agent_version: semver::Version::new(0, 1, 0),
        memory_bytes: None,
        chunk_size: 4096,
        health: HealthPolicy::default(),
        signers: vec![],
        golden_outputs_from: None,
    };
    let v1_path = dir.join("iris-1.1.0.efb");
    let report = operator::build_bundle(&options(&model_path, 1), &v1_path)?;
    print!(
        "{}",
        crate::cli::describe_manifest(&report.manifest, &report.digest)
    );
    println!(
        "  golden cases {}, reference rows {}",
        report.golden_cases,
        report.reference_rows.unwrap_or(0)
    );

    step(
        4,
        STEPS,
        "sign with alice and bob, then verify every byte as a device would",
    );
    operator::sign_bundle(&v1_path, &secrets[..2])?;
    let started = Instant::now();
    let verified = operator::verify_bundle(&v1_path, &root, now)?;
    println!(
        "  OK in {:.1} ms: signed by {} trusted keys, {} chunks and {} artifacts match",
        started.elapsed().as_secs_f64() * 1000.0,
        verified.signed_by.len(),
        verified.manifest.payload.chunks.len(),
        verified.manifest.artifacts.len()
    );

    step(
        5,
        STEPS,
        "device side: the agent's install path puts it into a slot, proves it, activates it",
    );
    let device = DeviceFacts {
        arch: Arch::current(),
        agent_version: semver::Version::new(0, 1, 0),
        memory_available: 256 << 20,
    };
    let policy = Policy {
        trust: &root,
        now,
        limits: Limits::default(),
        installed: None,
        device: Some(&device),
    };
    let agent_err = |e: &dyn std::fmt::Display| OperatorError::Input {
        what: "device".into(),
        detail: e.to_string(),
    };
    let store = Store::open(dir.join("device")).map_err(|e| agent_err(&e))?;
    let installed = match install_file(&store, &root, &device, &v1_path, InstallMode::Activate, now)
    {
        Ok(i) => i,
        Err(e) => {
            println!("  UNEXPECTED: the device refused the good bundle: {e}");
            return Ok(1);
        }
    };
    println!(
        "  active in slot {:?}: {} golden case(s) within tolerance, slowest {:.2} ms (budget {} ms)",
        installed
            .state
            .active
            .unwrap_or(edgefleet_shared::protocol::Slot::A),
        installed.health.cases,
        installed.health.max_latency_ms,
        report.manifest.health.latency_budget_ms
    );
    let slot = store.bundle_dir(&installed.bundle.digest);
    let golden =
        GoldenSet::from_bytes(&operator::read_capped(&slot.join("golden.cbor"), 16 << 20)?)
            .map_err(|e| agent_err(&e))?;
    let Some((_, model)) = load_active(&store).map_err(|e| agent_err(&e))? else {
        println!("  UNEXPECTED: no active model after install");
        return Ok(1);
    };
    let first = &golden.cases[0];
    let out = model.run(&first.inputs).map_err(|e| OperatorError::Input {
        what: "inference".into(),
        detail: e.to_string(),
    })?;
    println!(
        "  inference: features {} -> label {} probabilities {}",
        tensor_json(&first.inputs[0]),
        tensor_json(&out[0]),
        tensor_json(&out[1])
    );

    step(6, STEPS, "attacks a device refuses, each with its reason");
    let good = operator::read_capped(&v1_path, 64 << 20)?;
    let installed = InstalledRelease {
        release: 2,
        manifest_digest: edgefleet_shared::Digest::of(b"release 2"),
    };
    let stranger =
        edgefleet_shared::SecretKey::generate().map_err(|source| OperatorError::Key {
            path: keys_dir.clone(),
            source,
        })?;
    let mut tampered = good.clone();
    let in_model = RawHeader::read_from(&mut good.as_slice())
        .map(|h| h.to_bytes().len())
        .unwrap_or(0)
        + 8
        + 100;
    tampered[in_model] ^= 0x20;
    let mut one_sig =
        RawHeader::read_from(&mut good.as_slice()).map_err(|source| OperatorError::Bundle {
            path: v1_path.clone(),
            source,
        })?;
    let header_len = one_sig.to_bytes().len();
    one_sig.signatures.truncate(1);
    let one_sig_bundle = [one_sig.to_bytes(), good[header_len..].to_vec()].concat();
    let mut unknown = one_sig.clone();
    unknown.signatures.clear();
    unknown.sign(&stranger);
    let unknown_bundle = [unknown.to_bytes(), good[header_len..].to_vec()].concat();
    let small_device = DeviceFacts {
        memory_available: 8 << 20,
        ..device.clone()
    };
    let attacks: Vec<(&str, Vec<u8>, Policy<'_>)> = vec![
        ("one byte of the model altered in transit", tampered, policy),
        ("signed by one key only", one_sig_bundle, policy),
        (
            "signed by a key the device does not trust",
            unknown_bundle,
            policy,
        ),
        (
            "release 1 offered to a device on release 2",
            good.clone(),
            Policy {
                installed: Some(&installed),
                ..policy
            },
        ),
        (
            "installed 91 days later (expired)",
            good.clone(),
            Policy {
                now: now.plus_days(91),
                ..policy
            },
        ),
        (
            "on a device with 8 MiB of free memory",
            good.clone(),
            Policy {
                device: Some(&small_device),
                ..policy
            },
        ),
    ];
    let mut all_refused = true;
    for (what, bytes, p) in attacks {
        let sink = &mut edgefleet_shared::bundle::DiscardSink;
        match edgefleet_shared::bundle::verify_stream(bytes.as_slice(), &p, sink) {
            Err(e) => println!(
                "  {what:<45} REFUSED {}",
                e.refusal()
                    .map(|r| format!("({}): {r}", r.code()))
                    .unwrap_or_else(|| e.to_string())
            ),
            Ok(_) => {
                all_refused = false;
                println!("  {what:<45} ACCEPTED (this is a bug)");
            }
        }
    }

    step(
        7,
        STEPS,
        "a broken v2 model: the build refuses it because its answers differ from the golden cases",
    );
    let broken_path = dir.join("iris_logreg_v2_broken.onnx");
    write(&broken_path, IRIS_BROKEN)?;
    // Golden cases with v1's expected outputs, as the team keeps them for every release.
    let with_outputs = serde_json::json!({
        "cases": golden.cases.iter().map(|c| serde_json::json!({
            "inputs": { c.inputs[0].name.clone(): tensor_json(&c.inputs[0]) },
            "outputs": { c.outputs[0].name.clone(): tensor_json(&c.outputs[0]) },
        })).collect::<Vec<_>>()
    });
    let strict_golden = dir.join("iris_golden_with_outputs.json");
    write(&strict_golden, with_outputs.to_string().as_bytes())?;
    let mut v2 = options(&broken_path, 2);
    v2.golden = Some(strict_golden);
    match operator::build_bundle(&v2, &dir.join("iris-1.2.0.efb")) {
        Err(e) => println!("  REFUSED at build time: {e}"),
        Ok(_) => {
            all_refused = false;
            println!("  the broken model was accepted (this is a bug)");
        }
    }

    println!("\nsummary");
    println!(
        "  a signed bundle was built, verified and health-checked; {} attacks were refused",
        if all_refused { "all" } else { "NOT all" }
    );
    if is_temp {
        println!(
            "  files were in a temporary directory, now removed; run `edgefleet demo --dir DIR` to keep them"
        );
    } else {
        println!(
            "  try it by hand: `edgefleet bundle inspect {}`",
            v1_path.display()
        );
        println!(
            "                  `edgefleet bundle verify {} --trust {}`",
            v1_path.display(),
            root_path.display()
        );
    }
    println!("  next: the formats are in docs/bundle.md and docs/protocol.md");
    Ok(if all_refused { 0 } else { 1 })
}

/// A tensor as nested JSON arrays (integers stay integers; floats rounded to 4
/// decimals for reading).
fn tensor_json(t: &edgefleet_shared::golden::Tensor) -> serde_json::Value {
    use edgefleet_shared::golden::TensorData;
    let flat: Vec<serde_json::Value> = match &t.data {
        TensorData::I64(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        TensorData::I32(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        other => other
            .to_f64()
            .iter()
            .map(|x| serde_json::json!((x * 1e4).round() / 1e4))
            .collect(),
    };
    fn nest(flat: &[serde_json::Value], shape: &[u64]) -> serde_json::Value {
        match shape {
            [] | [_] => serde_json::Value::Array(flat.to_vec()),
            [_, rest @ ..] => {
                let width = rest.iter().product::<u64>().max(1) as usize;
                serde_json::Value::Array(flat.chunks(width).map(|c| nest(c, rest)).collect())
            }
        }
    }
    nest(&flat, &t.shape)
}

//! Benchmark: full verification of a large bundle (default 200 MB, `EF_BENCH_MB`)
//! against `sha256sum` of the same file in the same run, plus the peak memory of a
//! process that only verifies. Target (issue 2): >= 80% of sha256sum's throughput,
//! under 16 MB of memory.
//!
//! Run: `cargo bench -p edgefleet-shared --bench verify`

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use edgefleet_shared::bundle::{
    ArtifactInput, ArtifactSource, DiscardSink, ManifestDraft, manifest_bytes, prepare_manifest,
    verify_stream, write_bundle,
};
use edgefleet_shared::manifest::{
    ArtifactKind, Constraints, DEFAULT_CHUNK_SIZE, Dim, ElementType, HealthPolicy, ModelSchema,
    TensorSpec,
};
use edgefleet_shared::{
    ArtifactName, Limits, ModelChannel, Policy, RawHeader, SecretKey, TrustRoot, UnixTime,
};

const RUNS: usize = 5;

fn trust() -> (SecretKey, TrustRoot) {
    let key = SecretKey::from_seed([42; 32]);
    let root = TrustRoot::new(1, UnixTime(i64::MAX), 1, vec![key.public()]);
    (key, root)
}

fn verify_file(path: &Path) -> f64 {
    let (_, root) = trust();
    let policy = Policy {
        trust: &root,
        role: edgefleet_shared::trust::Role::Models,
        now: UnixTime(1_800_000_000),
        limits: Limits::default(),
        installed: None,
        device: None,
    };
    let started = Instant::now();
    let file = std::fs::File::open(path).expect("bundle");
    verify_stream(file, &policy, &mut DiscardSink).expect("the benchmark bundle verifies");
    started.elapsed().as_secs_f64()
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn make_bundle(dir: &Path, mb: u64) -> std::path::PathBuf {
    let model = dir.join("model.bin");
    let mut w = BufWriter::new(std::fs::File::create(&model).expect("create"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mb {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        w.write_all(&block).expect("write");
    }
    w.flush().expect("flush");
    drop(w);
    let inputs = vec![ArtifactInput {
        name: ArtifactName::new("model.onnx").expect("name"),
        kind: ArtifactKind::Model,
        source: ArtifactSource::File(model.clone()),
    }];
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        dtype: ElementType::F32,
        shape: vec![Dim::Symbol("N".into()), Dim::Fixed(4)],
    };
    let draft = ManifestDraft {
        channel: ModelChannel::new("bench").expect("channel"),
        version: semver::Version::new(1, 0, 0),
        release: 1,
        created_at: UnixTime(1_700_000_000),
        expires_at: UnixTime(1_900_000_000),
        schema: ModelSchema {
            inputs: vec![spec("x")],
            outputs: vec![spec("y")],
        },
        constraints: Constraints {
            architectures: vec![],
            min_agent_version: "0.1.0".into(),
            memory_bytes: 0,
        },
        health: HealthPolicy::default(),
        chunk_size: DEFAULT_CHUNK_SIZE,
    };
    let manifest = prepare_manifest(&draft, &inputs).expect("hash");
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(&manifest),
        signatures: vec![],
    };
    header.sign(&trust().0);
    let path = dir.join("bench.efb");
    let mut out = BufWriter::new(std::fs::File::create(&path).expect("create"));
    write_bundle(&mut out, &header, &inputs).expect("write bundle");
    out.flush().expect("flush");
    std::fs::remove_file(model).expect("rm");
    path
}

fn main() {
    // Child mode: verify once and report this process's peak memory.
    if let Ok(path) = std::env::var("EF_BENCH_VERIFY_ONLY") {
        verify_file(Path::new(&path));
        println!("{}", peak_rss_kib());
        return;
    }
    let mb: u64 = std::env::var("EF_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::Builder::new()
        .prefix("edgefleet-bench")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let path = make_bundle(dir.path(), mb);
    let size = std::fs::metadata(&path).expect("size").len() as f64;
    println!("bundle: {:.1} MB at {}", size / 1e6, path.display());
    // Warm the page cache for both contenders alike.
    verify_file(&path);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..RUNS {
        ours.push(size / verify_file(&path) / 1e6);
        let started = Instant::now();
        let status = Command::new("sha256sum")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("sha256sum runs");
        assert!(status.success());
        theirs.push(size / started.elapsed().as_secs_f64() / 1e6);
    }
    let (o, t) = (median(ours.clone()), median(theirs.clone()));
    println!(
        "edgefleet verify: median {o:.0} MB/s  (runs: {})",
        ours.iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "sha256sum:        median {t:.0} MB/s  (runs: {})",
        theirs
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("ratio: {:.2} of sha256sum (target >= 0.80)", o / t);
    // A second baseline that uses the CPU's SHA instructions as we do (Debian's
    // sha256sum does not), when openssl is installed.
    let mut ssl = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        match Command::new("openssl")
            .args(["dgst", "-sha256"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .status()
        {
            Ok(s) if s.success() => ssl.push(size / started.elapsed().as_secs_f64() / 1e6),
            _ => break,
        }
    }
    if ssl.len() == RUNS {
        let s = median(ssl);
        println!(
            "openssl dgst -sha256: median {s:.0} MB/s; ratio {:.2} (we hash every byte twice: chunk table and artifact digest)",
            o / s
        );
    }
    let child = Command::new(std::env::current_exe().expect("exe"))
        .env("EF_BENCH_VERIFY_ONLY", &path)
        .output()
        .expect("child runs");
    let kib: u64 = String::from_utf8_lossy(&child.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    println!(
        "peak memory of a verify-only process: {:.1} MB (target < 16 MB)",
        kib as f64 / 1024.0
    );
}

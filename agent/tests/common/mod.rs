//! Helpers shared by the agent's integration tests: signed bundles of the
//! repository's models, the trust root that accepts them.
#![allow(dead_code)]

pub mod pki;
pub mod supervisor;

use std::path::{Path, PathBuf};

use edgefleet_agent::model::LoadedModel;
use edgefleet_shared::bundle::{
    ArtifactInput, ArtifactSource, ManifestDraft, manifest_bytes, prepare_manifest, write_bundle,
};
use edgefleet_shared::golden::{GoldenCase, GoldenSet, Tensor, TensorData};
use edgefleet_shared::manifest::{ArtifactKind, Constraints, HealthPolicy};
use edgefleet_shared::{ArtifactName, ModelChannel, RawHeader, SecretKey, TrustRoot, UnixTime};

pub const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");

pub fn key() -> SecretKey {
    SecretKey::from_seed([5; 32])
}

pub fn features() -> Tensor {
    Tensor {
        name: "features".into(),
        shape: vec![2, 4],
        data: TensorData::F32(vec![5.0, 3.4, 1.5, 0.2, 6.6, 3.0, 5.6, 2.0]),
    }
}

/// A bundle of `model_file` whose golden outputs come from `golden_from`.
pub fn bundle(
    dir: &Path,
    name: &str,
    model_file: &str,
    golden_from: &str,
    release: u64,
    created: i64,
) -> PathBuf {
    bundle_padded(dir, name, model_file, golden_from, release, created, 0)
}

/// A signed bundle of the iris model with its own golden outputs.
pub fn iris(dir: &Path, name: &str, release: u64) -> PathBuf {
    bundle(
        dir,
        name,
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        release,
        0,
    )
}

/// A signed bundle of `model_file` (a model of the iris features, with its own
/// golden outputs) on `channel`.
pub fn bundle_on(dir: &Path, name: &str, channel: &str, model_file: &str, release: u64) -> PathBuf {
    make_bundle(dir, name, channel, model_file, model_file, release, 0, 0)
}

/// The same with a metadata artifact of `padding` bytes, for bundles of many chunks.
/// A `name` containing `with-reference` also carries reference statistics of
/// `models/iris_reference.csv` (drift).
pub fn bundle_padded(
    dir: &Path,
    name: &str,
    model_file: &str,
    golden_from: &str,
    release: u64,
    created: i64,
    padding: usize,
) -> PathBuf {
    make_bundle(
        dir,
        name,
        "iris",
        model_file,
        golden_from,
        release,
        created,
        padding,
    )
}

#[allow(
    clippy::too_many_arguments,
    reason = "a test helper behind two short ones"
)]
fn make_bundle(
    dir: &Path,
    name: &str,
    channel: &str,
    model_file: &str,
    golden_from: &str,
    release: u64,
    created: i64,
    padding: usize,
) -> PathBuf {
    let reference =
        LoadedModel::load(&std::fs::read(format!("{MODELS}/{golden_from}")).expect("model"))
            .expect("loads");
    // The iris features under the model's own input name.
    let input = Tensor {
        name: reference.schema().inputs[0].name.clone(),
        ..features()
    };
    let outputs = reference.run(std::slice::from_ref(&input)).expect("runs");
    let golden = GoldenSet {
        cases: vec![GoldenCase {
            inputs: vec![input],
            outputs,
        }],
    };
    let mut inputs = vec![
        ArtifactInput {
            name: ArtifactName::new("model.onnx").expect("n"),
            kind: ArtifactKind::Model,
            source: ArtifactSource::File(format!("{MODELS}/{model_file}").into()),
        },
        ArtifactInput {
            name: ArtifactName::new("golden.cbor").expect("n"),
            kind: ArtifactKind::Golden,
            source: ArtifactSource::Bytes(golden.to_bytes()),
        },
    ];
    if padding > 0 {
        let bytes: Vec<u8> = (0..padding).map(|i| (i * 7 % 251) as u8).collect();
        inputs.push(ArtifactInput {
            name: ArtifactName::new("padding.bin").expect("n"),
            kind: ArtifactKind::Metadata,
            source: ArtifactSource::Bytes(bytes),
        });
    }
    if name.contains("with-reference") {
        // Reference statistics of the shipped iris reference data.
        let text = std::fs::read_to_string(format!("{MODELS}/iris_reference.csv")).expect("csv");
        let mut lines = text.lines();
        let headers: Vec<String> = lines
            .next()
            .expect("header")
            .split(',')
            .map(str::to_owned)
            .collect();
        let rows: Vec<Vec<f64>> = lines
            .map(|l| l.split(',').map(|v| v.parse().expect("number")).collect())
            .collect();
        let stats = edgefleet_agent::reference_stats::summarise(&reference, &headers, &rows, &[])
            .expect("reference");
        inputs.push(ArtifactInput {
            name: ArtifactName::new("reference.cbor").expect("n"),
            kind: ArtifactKind::Reference,
            source: ArtifactSource::Bytes(stats.to_bytes()),
        });
    }
    let now = UnixTime::now();
    let draft = ManifestDraft {
        channel: ModelChannel::new(channel).expect("c"),
        version: semver::Version::new(1, release, 0),
        release,
        created_at: UnixTime(now.0 - 1000 + created),
        expires_at: now.plus_days(30),
        schema: reference.schema().clone(),
        constraints: Constraints {
            architectures: vec![],
            min_agent_version: "0.1.0".into(),
            memory_bytes: 1 << 20,
        },
        health: HealthPolicy::default(),
        chunk_size: 4096,
    };
    let manifest = prepare_manifest(&draft, &inputs).expect("hash");
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(&manifest),
        signatures: vec![],
    };
    header.sign(&key());
    let path = dir.join(name);
    let mut out = Vec::new();
    write_bundle(&mut out, &header, &inputs).expect("write");
    std::fs::write(&path, out).expect("write file");
    path
}

/// Waits for `agent run`'s readiness line on its (piped) stdout and returns the
/// local API's address; the rest of stdout is drained on a thread so the agent
/// never blocks on a full pipe.
pub fn wait_for_api(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("agent printed its address")
            .expect("line");
        if let Some(a) = line.strip_prefix("local API listening on http://") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    addr
}

/// Writes a trust root (1 of 1, [`key`]) to `path`.
pub fn write_root(path: &Path) {
    let mut root =
        TrustRoot::new(1, UnixTime::now().plus_days(365), 1, vec![key().public()]).to_unsigned();
    root.sign(&key());
    std::fs::write(path, root.to_bytes()).expect("root");
}

/// A connected socket of either kind.
trait Stream: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> Stream for T {}

/// An HTTP/1.1 request with extra headers and a byte body over a fresh
/// connection to `addr` (`host:port`, or `unix:PATH` for a Unix socket);
/// returns the status, the response's header lines (lower-cased names) and its
/// body bytes.
pub fn http_bytes(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{Read, Write};
    let timeout = Some(std::time::Duration::from_secs(10));
    let (mut stream, host): (Box<dyn Stream>, &str) = match addr.strip_prefix("unix:") {
        Some(socket) => {
            let s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
            s.set_read_timeout(timeout).expect("timeout");
            (Box::new(s), "localhost")
        }
        None => {
            let s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(timeout).expect("timeout");
            (Box::new(s), addr)
        }
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8(response[..end].to_vec()).expect("utf-8 headers");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, response[end + 4..].to_vec())
}

pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = http_bytes(
        addr,
        method,
        path,
        &[("Content-Type", "application/json".into())],
        body.as_bytes(),
    );
    (status, String::from_utf8(body).expect("utf-8 body"))
}

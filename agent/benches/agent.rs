//! Benchmarks of the agent (issue 3), each printed with its baseline from the same run:
//!
//! - model load time per shipped model;
//! - inference through the local OIP v2 API vs calling tract in-process, same model and
//!   input (target: overhead under 10% on the CNN, under 150 µs on the tabular model);
//! - on an 8 MB bundle: checking and unpacking each chunk as it arrives vs checking it
//!   alone; the check after the last chunk vs the header check alone; the whole step
//!   after the last chunk vs the full re-verification and unpack it replaced;
//! - drift tracking on the tabular model: inference with and without the window
//!   update, and API requests with tracking on and off (target: under 5%), and the
//!   tracker's memory;
//! - tree ensembles: our compact evaluator vs tract's own (target: within 2x of
//!   onnxruntime);
//! - tract vs onnxruntime (Python, one thread) when `EDGEFLEET_ORT_PYTHON` names a
//!   Python with onnxruntime (`bench/ort_time.py`); otherwise says it was not run;
//! - idle RSS of the release agent with no model and with the CNN loaded (target under
//!   8 MB idle, loaded under model size + 10 MB; also loaded and connected to Mosquitto
//!   over mutual TLS), and its stripped size.
//!
//! Run: `cargo bench -p edgefleet-agent --bench agent`. Medians; 2 noisy cores.
//! `EDGEFLEET_BENCH_ONLY=api` stops after the model loads and the API figures;
//! `EDGEFLEET_BENCH_ONLY=rss` measures only the agent processes' memory and size,
//! `EDGEFLEET_BENCH_ONLY=download` only the figures after the last chunk,
//! `EDGEFLEET_BENCH_ONLY=load` only the agent's peak RSS under 40 concurrent
//! 15 MiB requests, default limits vs none (issue 24);
//! `EDGEFLEET_BENCH_ONLY=soak` (not part of the full run) the connected agent
//! at 20 requests/s for `EDGEFLEET_SOAK_S` seconds (default an hour) and its RSS
//! growth;
//! `EDGEFLEET_BENCH_ONLY=builds` only the builds side by side (issue 25): the
//! release build, the static musl device build (when `cross/build.sh` made it)
//! and the Python + onnxruntime server, same models and requests;
//! `EDGEFLEET_BENCH_ONLY=channels` (not part of the full run) the agent's RSS
//! serving 1, 2 and 5 small models on their own channels (issue 20);
//! `EDGEFLEET_BENCH_STATIC_BASELINE=PATH` also measures another static agent binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_agent::api::{ModelServed, Served, bind_unix, serve, serve_unix};
use edgefleet_agent::model::LoadedModel;
use edgefleet_agent::oip::{InferRequest, decode_request, encode_response};
use edgefleet_agent::store::ActiveModel;
use edgefleet_shared::bundle::{
    ArtifactInput, ArtifactSource, ManifestDraft, manifest_bytes, prepare_manifest, write_bundle,
};
use edgefleet_shared::golden::{GoldenCase, GoldenSet, Tensor, TensorData};
use edgefleet_shared::manifest::{ArtifactKind, Constraints, HealthPolicy};
use edgefleet_shared::protocol::BundleRef;
use edgefleet_shared::{
    ArtifactName, Digest, Limits, ModelChannel, Policy, RawHeader, SecretKey, TrustRoot, UnixTime,
};

#[path = "../tests/common/pki.rs"]
mod pki;
mod timing;
use pki::Pki;
use timing::{median, time_us};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");

struct Case {
    file: &'static str,
    channel: &'static str,
    input: Tensor,
    runs: usize,
}

fn cases() -> Vec<Case> {
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{MODELS}/digits_cnn.expected.json")).expect("cnn expected"),
    )
    .expect("json");
    let image: Vec<Vec<f32>> = serde_json::from_value(expected["image"].clone()).expect("image");
    let forest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{MODELS}/forest_cancer.expected.json")).expect("forest expected"),
    )
    .expect("json");
    let rows: Vec<Vec<f32>> = serde_json::from_value(forest["features"].clone()).expect("rows");
    let diabetes: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{MODELS}/gbr_diabetes.expected.json")).expect("gbr expected"),
    )
    .expect("json");
    let patients: Vec<Vec<f32>> =
        serde_json::from_value(diabetes["features"].clone()).expect("rows");
    let patient = Tensor {
        name: "features".into(),
        shape: vec![1, 10],
        data: TensorData::F32(patients[1].clone()),
    };
    vec![
        Case {
            file: "iris_logreg.onnx",
            channel: "iris",
            input: Tensor {
                name: "features".into(),
                shape: vec![1, 4],
                data: TensorData::F32(vec![5.0, 3.4, 1.5, 0.2]),
            },
            runs: 3000,
        },
        Case {
            file: "digits_cnn.onnx",
            channel: "digits",
            input: Tensor {
                name: "image".into(),
                shape: vec![1, 1, 28, 28],
                data: TensorData::F32(image[0].clone()),
            },
            runs: 500,
        },
        Case {
            file: "forest_cancer.onnx",
            channel: "forest",
            input: Tensor {
                name: "features".into(),
                shape: vec![1, 30],
                data: TensorData::F32(rows[1].clone()),
            },
            runs: 3000,
        },
        // Tree regressors: tract cannot parse them; ours only.
        Case {
            file: "gbr_diabetes.onnx",
            channel: "gbr",
            input: patient.clone(),
            runs: 3000,
        },
        Case {
            file: "forest_diabetes.onnx",
            channel: "forest2",
            input: patient,
            runs: 3000,
        },
    ]
}

fn oip_body(t: &Tensor) -> String {
    let TensorData::F32(data) = &t.data else {
        unreachable!("f32 inputs")
    };
    serde_json::json!({"inputs": [{"name": t.name, "shape": t.shape, "datatype": "FP32", "data": data}]})
        .to_string()
}

/// An HTTP/1.1 keep-alive client on one connection (TCP or a Unix socket), as
/// an application would hold.
struct Client<S = TcpStream> {
    stream: BufReader<S>,
    /// The server thread's `/proc/.../schedstat`.
    server_schedstat: String,
}

impl<S: Read + Write> Client<S> {
    fn post(&mut self, path: &str, body: &str) -> u16 {
        self.request("POST", path, &[], body.as_bytes())
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> u16 {
        // One write per request, as HTTP clients send a small request: a
        // `write!` straight to the socket would send each piece in its own
        // segment (TCP_NODELAY) and wake the server for each.
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let mut request = request.into_bytes();
        request.extend_from_slice(body);
        self.stream.get_mut().write_all(&request).expect("send");
        let mut status = String::new();
        self.stream.read_line(&mut status).expect("status");
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).expect("body");
        status
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

fn bundle_ref(case: &Case) -> BundleRef {
    BundleRef {
        digest: Digest::of(case.file.as_bytes()),
        channel: ModelChannel::new(case.channel).expect("channel"),
        version: "1.0.0".into(),
        release: 1,
    }
}

/// Serves `served` on a loopback port and on a Unix socket in `dir` from its
/// own thread, in the agent's own runtime shape (one thread, inference on the
/// blocking pool); returns a client of each.
fn start_api(served: Served, dir: &Path) -> (Client, Client<UnixStream>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let socket = dir.join("api.sock");
    let unix = bind_unix(&socket).expect("unix socket");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // "PID/task/TID": the server thread's own CPU clock, for the bench.
        let me = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        tx.send(format!("/proc/{}/schedstat", me.display()))
            .expect("send");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let unix = tokio::net::UnixListener::from_std(unix).expect("listener");
            let limits = edgefleet_agent::config::LimitsConfig::default();
            tokio::join!(
                serve(listener, served.clone(), &limits, std::future::pending()),
                serve_unix(unix, served, &limits, std::future::pending())
            );
        });
    });
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let server_schedstat = rx.recv().expect("server thread");
    (
        Client {
            stream: BufReader::new(stream),
            server_schedstat: server_schedstat.clone(),
        },
        Client {
            stream: BufReader::new(UnixStream::connect(&socket).expect("connect")),
            server_schedstat,
        },
    )
}

/// Nanoseconds a thread has run on a CPU (`schedstat`'s first field).
fn cpu_ns(schedstat: &str) -> f64 {
    std::fs::read_to_string(schedstat)
        .expect("schedstat")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .expect("run time")
}

/// Times `f` like [`time_us`] and also returns the CPU time per call of the
/// thread whose `schedstat` is given.
fn time_with_cpu_us(runs: usize, schedstat: &str, f: impl FnMut()) -> (f64, f64) {
    time_with_cpu_of(runs, || cpu_ns(schedstat), f)
}

/// Times `f` like [`time_us`] and also returns the CPU time per call that
/// `cpu_now` (nanoseconds run so far) counted.
fn time_with_cpu_of(runs: usize, cpu_now: impl Fn() -> f64, mut f: impl FnMut()) -> (f64, f64) {
    let mut calls = 0usize;
    let before = cpu_now();
    let wall = time_us(runs, || {
        calls += 1;
        f();
    });
    (wall, (cpu_now() - before) / 1e3 / calls as f64)
}

/// Rounds of the interleaved figures (API, tract options): each round times
/// every figure in turn, so a change in the machine's speed hits all of them
/// alike; medians across rounds.
const ROUNDS: usize = 7;

/// The request with its inputs as binary data after the JSON header (OIP's
/// binary tensor data extension) and the outputs asked back as binary.
fn oip_binary_body(t: &Tensor) -> (Vec<u8>, usize) {
    let TensorData::F32(data) = &t.data else {
        unreachable!("f32 inputs")
    };
    let mut body = serde_json::json!({
        "inputs": [{"name": t.name, "shape": t.shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": data.len() * 4}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string()
    .into_bytes();
    let json_len = body.len();
    body.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    (body, json_len)
}

fn api_vs_direct(case: &Case, model: &LoadedModel) {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::new(Some(ActiveModel {
        bundle: bundle_ref(case),
        model: model.clone(),
        reference: None,
    }));
    let (mut client, mut unix) = start_api(served, dir.path());
    let body = oip_body(&case.input);
    let (binary, json_len) = oip_binary_body(&case.input);
    let binary_headers = [("Inference-Header-Content-Length", json_len.to_string())];
    let path = format!("/v2/models/{}/infer", case.channel);
    let outputs = model.run(std::slice::from_ref(&case.input)).expect("runs");
    let request: InferRequest = serde_json::from_str(&body).expect("request");
    let runs = case.runs.div_ceil(ROUNDS);
    // Per round: direct, JSON via API, binary via API, TCP, empty HTTP, decode,
    // encode, and the CPU time per request of the direct run (this thread) and
    // of the server thread for the JSON and the binary requests.
    let mut rounds: Vec<[f64; 16]> = Vec::new();
    let server = client.server_schedstat.clone();
    for _ in 0..ROUNDS {
        let (direct, direct_cpu) = time_with_cpu_us(runs, "/proc/thread-self/schedstat", || {
            model.run(std::slice::from_ref(&case.input)).expect("runs");
        });
        let (json, json_cpu) = time_with_cpu_us(runs, &server, || {
            assert_eq!(client.post(&path, &body), 200);
        });
        let mut in_server = Vec::new();
        let (bin, bin_cpu) = time_with_cpu_us(runs, &server, || {
            assert_eq!(client.request("POST", &path, &binary_headers, &binary), 200);
            // The plan is shared: its last run is the one this request made.
            in_server.push(model.last_run().expect("ran").as_secs_f64() * 1e6);
        });
        let cooled = cooled_us(runs, model, &case.input);
        rounds.push([
            direct,
            json,
            bin,
            tcp_round_trip_us(runs),
            time_us(runs, || {
                assert_eq!(client.request("GET", "/v2/health/live", &[], b""), 200);
            }),
            time_us(runs, || {
                std::hint::black_box(decode_request(body.as_bytes(), None).expect("request"));
            }),
            time_us(runs, || {
                std::hint::black_box(
                    encode_response(case.channel, "1.0.0", &request, &outputs).expect("json"),
                );
            }),
            direct_cpu,
            json_cpu,
            bin_cpu,
            median(in_server),
            cooled.0,
            cooled.1,
            time_us(runs, || {
                assert_eq!(unix.request("POST", &path, &binary_headers, &binary), 200);
            }),
            time_us(runs, || {
                assert_eq!(unix.request("GET", "/v2/health/live", &[], b""), 200);
            }),
            // The empty round trip right after the model ran in this thread:
            // what the HTTP path costs once an inference has cooled the caches.
            median(
                (0..runs)
                    .map(|_| {
                        model.run(std::slice::from_ref(&case.input)).expect("runs");
                        let t = Instant::now();
                        assert_eq!(client.request("GET", "/v2/health/live", &[], b""), 200);
                        t.elapsed().as_secs_f64() * 1e6
                    })
                    .collect(),
            ),
        ]);
    }
    let fig = |i: usize| median(rounds.iter().map(|r| r[i]).collect());
    let over = |i: usize, base: usize| median(rounds.iter().map(|r| r[i] - r[base]).collect());
    let direct = fig(0);
    println!(
        "  {:<18} direct {:>9.1} µs   via local API (JSON) {:>9.1} µs   overhead {:>7.1} µs ({:+.0}%)   binary tensors {:>9.1} µs   overhead {:>7.1} µs ({:+.0}%)",
        case.file,
        direct,
        fig(1),
        over(1, 0),
        over(1, 0) / direct * 100.0,
        fig(2),
        over(2, 0),
        over(2, 0) / direct * 100.0,
    );
    // What the agent itself spends: the server thread's CPU time per request
    // beyond the inference's own CPU time (waiting for the client excluded).
    println!(
        "  {:<18} agent CPU per request beyond inference: JSON {:.1} µs ({:+.0}%), binary {:.1} µs ({:+.0}%); the inference itself inside the server {:.0} µs",
        "",
        over(8, 7),
        over(8, 7) / fig(7) * 100.0,
        over(9, 7),
        over(9, 7) / fig(7) * 100.0,
        fig(10),
    );
    // The same API on a Unix socket: no TCP stack.
    println!(
        "  {:<18} over the Unix socket: binary tensors {:>9.1} µs   overhead {:>7.1} µs ({:+.0}%); HTTP round trip alone {:.1} µs",
        "",
        fig(13),
        over(13, 0),
        over(13, 0) / direct * 100.0,
        fig(14),
    );
    // What a server's loop costs without the API: how much slower the
    // inference runs after a trip through the kernel's loopback path and a
    // wake-up, and the round trip after the inference (no runtime, no HTTP).
    println!(
        "  {:<18} without the API: the inference right after a loopback round trip {:.1} µs ({:+.0}% on the loop's), that round trip right after the inference {:.1} µs; the empty HTTP round trip right after the inference {:.1} µs",
        "",
        fig(11),
        over(11, 0) / direct * 100.0,
        fig(12),
        fig(15),
    );
    // Where the rest goes: a bare loopback round trip (the kernel and two
    // thread wake-ups, no HTTP), an HTTP round trip that does nothing, and the
    // JSON work of one request, each timed alone.
    println!(
        "  {:<18} of which: TCP round trip alone {:.1} µs, HTTP round trip alone (GET /v2/health/live) {:.1} µs, request JSON decode {:.1} µs ({} bytes; binary form {} bytes), response encode {:.1} µs; medians of {ROUNDS} interleaved rounds",
        "",
        fig(3),
        fig(4),
        fig(5),
        body.len(),
        binary.len(),
        fig(6)
    );
}

/// Runs `f` with a function that sends a 64-byte ping over loopback TCP to an
/// echo thread and waits for the answer (no HTTP, no runtime).
fn with_echo<R>(f: impl FnOnce(&mut dyn FnMut()) -> R) -> R {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut buf = [7u8; 64];
    let result = f(&mut || {
        c.write_all(&buf).expect("ping");
        c.read_exact(&mut buf).expect("pong");
    });
    drop(c);
    echo.join().expect("echo thread");
    result
}

/// A loopback round trip alone: the floor under any local API on this machine.
fn tcp_round_trip_us(runs: usize) -> f64 {
    with_echo(|ping| time_us(runs, ping))
}

/// Each half of a server's loop, timed right after the other half, without
/// the API: the inference right after a loopback round trip, and the round
/// trip right after the inference. Each cools the caches and predictors the
/// other one needs, as in a server.
fn cooled_us(runs: usize, model: &LoadedModel, input: &Tensor) -> (f64, f64) {
    with_echo(|ping| {
        let mut once = || {
            let t = Instant::now();
            ping();
            let round_trip = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            model.run(std::slice::from_ref(input)).expect("runs");
            (t.elapsed().as_secs_f64() * 1e6, round_trip)
        };
        for _ in 0..runs.div_ceil(10) {
            once();
        }
        let (inference, round_trip): (Vec<f64>, Vec<f64>) = (0..runs).map(|_| once()).unzip();
        (median(inference), median(round_trip))
    })
}

/// The CNN planned by tract four ways, timed on the same image: batch `N`
/// symbolic (as the agent plans it), with the batch fixed to 1 before optimising,
/// without `into_optimized` (decluttered only), and through tract's NNEF form
/// (the typed model dumped to NNEF and loaded back, as a pre-converted bundle
/// would be).
fn tract_options(case: &Case) {
    use tract_onnx::prelude::*;
    let TensorData::F32(data) = &case.input.data else {
        unreachable!("f32 image")
    };
    let shape: Vec<usize> = case.input.shape.iter().map(|d| *d as usize).collect();
    let image = tract_ndarray::ArrayD::from_shape_vec(shape.clone(), data.clone())
        .expect("image")
        .into_tensor();
    let path = format!("{MODELS}/{}", case.file);
    let parse = || tract_onnx::onnx().model_for_path(&path).expect("parses");
    let symbolic = parse()
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .expect("plans");
    let fixed = parse()
        .with_input_fact(0, f32::fact(&shape).into())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("plans");
    let decluttered = parse()
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .and_then(|m| m.into_runnable())
        .expect("plans");
    let nnef = tract_nnef::nnef().with_onnx();
    let mut dump = Vec::new();
    nnef.write_to_tar(
        &parse()
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .expect("typed"),
        &mut dump,
    )
    .expect("nnef dump");
    let nnef_load = Instant::now();
    let from_nnef = nnef
        .model_for_read(&mut &dump[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("nnef plans");
    let nnef_ms = nnef_load.elapsed().as_secs_f64() * 1e3;
    let plans = [
        ("batch N symbolic (the agent)", &symbolic),
        ("batch fixed to 1", &fixed),
        ("decluttered, not optimised", &decluttered),
        ("from tract's NNEF form", &from_nnef),
    ];
    // Interleaved rounds (every plan once per round), so the machine's swings
    // hit all plans alike; each plan's ratio is taken within its round.
    let rounds: Vec<Vec<f64>> = (0..ROUNDS)
        .map(|_| {
            plans
                .iter()
                .map(|(_, plan)| {
                    time_us(case.runs.div_ceil(ROUNDS), || {
                        plan.run(tvec!(image.clone().into_tvalue())).expect("runs");
                    })
                })
                .collect()
        })
        .collect();
    for (i, (what, _)) in plans.iter().enumerate() {
        let us = median(rounds.iter().map(|r| r[i]).collect());
        let ratio = median(rounds.iter().map(|r| r[i] / r[0]).collect());
        let (lo, hi) = rounds
            .iter()
            .map(|r| r[i] / r[0])
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
        println!(
            "  {what:<30} {us:>9.1} µs  ({ratio:.2}x the batch-N plan; rounds {lo:.2}-{hi:.2}x)"
        );
    }
    println!(
        "  NNEF form: {} bytes, loaded and planned in {nnef_ms:.2} ms (once)",
        dump.len()
    );
}

/// The iris reference data shipped in models/ (header row, then numbers).
fn iris_reference() -> (Vec<String>, Vec<Vec<f64>>) {
    let text = std::fs::read_to_string(format!("{MODELS}/iris_reference.csv")).expect("csv");
    let mut lines = text.lines();
    let headers = lines
        .next()
        .expect("header")
        .split(',')
        .map(|h| h.trim().to_owned())
        .collect();
    let rows = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(',')
                .map(|v| v.trim().parse().expect("number"))
                .collect()
        })
        .collect();
    (headers, rows)
}

/// Drift tracking's cost on the tabular model: inference alone vs inference plus
/// the per-request window update (as the API does it, through the lock), and the
/// whole API request with tracking on vs off. Interleaved rounds; medians.
fn drift_overhead(case: &Case, model: &LoadedModel) {
    let (headers, rows) = iris_reference();
    let reference = std::sync::Arc::new(
        edgefleet_agent::reference_stats::summarise(model, &headers, &rows, &[])
            .expect("reference"),
    );
    let active = |reference: Option<std::sync::Arc<_>>| ActiveModel {
        bundle: bundle_ref(case),
        model: model.clone(),
        reference,
    };
    let served = Served::new(Some(active(Some(reference.clone()))));
    let tracked = served
        .channel(bundle_ref(case).channel.as_str())
        .expect("the channel is served");
    let digest = bundle_ref(case).digest;
    let input = std::slice::from_ref(&case.input);
    // Whole batches timed with one clock pair each (a clock read on this VM costs
    // a good part of what is measured), 15 interleaved rounds, medians.
    let batch = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..case.runs {
            f();
        }
        t.elapsed().as_secs_f64() * 1e6 / case.runs as f64
    };
    let answer = model.run(input).expect("runs");
    let (mut plain, mut with, mut alone) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..16 {
        let p = batch(&mut || {
            model.run(input).expect("runs");
        });
        let w = batch(&mut || {
            let out = model.run(input).expect("runs");
            tracked.observe(&digest, input, &out);
        });
        // The update alone (lock, rows, bins; a window closes every 1000).
        let a = batch(&mut || tracked.observe(&digest, input, &answer));
        if round > 0 {
            // The first round warms them up.
            plain.push(p);
            with.push(w);
            alone.push(a);
        }
    }
    let (plain, with, alone) = (median(plain), median(with), median(alone));
    let memory = tracked
        .with_tracker(|t| t.memory_bytes())
        .expect("tracking");
    println!(
        "  in-process   inference {plain:>7.2} µs   + drift update {with:>7.2} µs   ({:+.1}%; 15 rounds of {} requests)",
        (with / plain - 1.0) * 100.0,
        case.runs
    );
    println!(
        "  update alone {:>7.3} µs = {:.1}% of the inference (target < 5%)",
        alone,
        alone / plain * 100.0
    );
    let dirs = [tempfile::tempdir(), tempfile::tempdir()].map(|d| d.expect("tempdir"));
    let (mut on, _) = start_api(served, dirs[0].path());
    let (mut off, _) = start_api(Served::new(Some(active(None))), dirs[1].path());
    let body = oip_body(&case.input);
    let path = format!("/v2/models/{}/infer", case.channel);
    let (mut api_off, mut api_on) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        api_off.push(time_us(case.runs / 3, || {
            assert_eq!(off.post(&path, &body), 200);
        }));
        api_on.push(time_us(case.runs / 3, || {
            assert_eq!(on.post(&path, &body), 200);
        }));
    }
    let (api_off, api_on) = (median(api_off), median(api_on));
    println!(
        "  local API    drift off {api_off:>7.1} µs   drift on {api_on:>7.1} µs   ({:+.1}%)",
        (api_on / api_off - 1.0) * 100.0
    );
    println!(
        "  tracker memory {memory} bytes ({} features, {} outputs; fixed by the reference)",
        reference.features.len(),
        reference.outputs.len()
    );
}

fn key() -> SecretKey {
    SecretKey::from_seed([3; 32])
}

/// A signed bundle of `model` with one golden case and `padding` extra bytes.
fn make_bundle(dir: &Path, case: &Case, model: &LoadedModel, padding: usize) -> PathBuf {
    let outputs = model.run(std::slice::from_ref(&case.input)).expect("runs");
    let golden = GoldenSet {
        cases: vec![GoldenCase {
            inputs: vec![case.input.clone()],
            outputs,
        }],
    };
    let mut inputs = vec![
        ArtifactInput {
            name: ArtifactName::new("model.onnx").expect("name"),
            kind: ArtifactKind::Model,
            source: ArtifactSource::File(format!("{MODELS}/{}", case.file).into()),
        },
        ArtifactInput {
            name: ArtifactName::new("golden.cbor").expect("name"),
            kind: ArtifactKind::Golden,
            source: ArtifactSource::Bytes(golden.to_bytes()),
        },
    ];
    if padding > 0 {
        let mut bytes = vec![0u8; padding];
        getrandom::fill(&mut bytes).expect("random");
        inputs.push(ArtifactInput {
            name: ArtifactName::new("extra.bin").expect("name"),
            kind: ArtifactKind::Metadata,
            source: ArtifactSource::Bytes(bytes),
        });
    }
    let now = UnixTime::now();
    let draft = ManifestDraft {
        channel: ModelChannel::new(case.channel).expect("channel"),
        version: semver::Version::new(1, 0, 0),
        release: 1,
        created_at: now,
        expires_at: now.plus_days(30),
        schema: model.schema().clone(),
        constraints: Constraints {
            architectures: vec![],
            min_agent_version: "0.1.0".into(),
            memory_bytes: 1 << 20,
        },
        health: HealthPolicy::default(),
        chunk_size: 256 * 1024,
    };
    let manifest = prepare_manifest(&draft, &inputs).expect("manifest");
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(&manifest),
        signatures: vec![],
    };
    header.sign(&key());
    let path = dir.join(format!("{}.efb", case.channel));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    write_bundle(&mut out, &header, &inputs).expect("write");
    out.flush().expect("flush");
    path
}

fn root() -> TrustRoot {
    TrustRoot::new(1, UnixTime::now().plus_days(365), 1, vec![key().public()])
}

fn write_root(path: &Path) {
    let mut r = root().to_unsigned();
    r.sign(&key());
    std::fs::write(path, r.to_bytes()).expect("root");
}

fn post_download_check(dir: &Path, case: &Case, model: &LoadedModel) {
    use edgefleet_agent::store::{Store, install_download, install_file};
    use edgefleet_shared::bundle::verify_chunk;
    use edgefleet_shared::protocol::InstallMode;
    use edgefleet_shared::unpack::UnpackStream;

    let path = make_bundle(dir, case, model, 8 << 20);
    let size = std::fs::metadata(&path).expect("size").len() as f64;
    let trust = root();
    let bytes = std::fs::read(&path).expect("read");
    let header = RawHeader::read_from(&mut bytes.as_slice()).expect("header");
    let policy = || Policy {
        trust: &trust,
        role: edgefleet_shared::trust::Role::Models,
        now: UnixTime::now(),
        limits: Limits::default(),
        installed: None,
        device: None,
    };
    let verified = header.verify(&policy()).expect("verifies");
    let payload = &bytes[bytes.len() - verified.manifest.payload.size as usize..];
    let table = &verified.manifest.payload;
    let chunks: Vec<&[u8]> = (0..table.chunks.len() as u32)
        .map(|i| {
            let (start, end) = table.chunk_range(i).expect("chunk");
            &payload[start as usize..end as usize]
        })
        .collect();
    // What the download does per chunk as it arrives: the check against the signed
    // table alone, and that check plus unpacking (artifact hashes, files written).
    let unpacked = |data: &Path| {
        let mut stream = UnpackStream::begin(&verified, data.join("unpacking")).expect("begin");
        for (i, c) in chunks.iter().enumerate() {
            stream
                .feed(verify_chunk(table, i as u32, c).expect("chunk"))
                .expect("feeds");
        }
        stream
    };
    let facts = edgefleet_agent::cli::device_facts();
    let (mut check_only, mut on_arrival) = (Vec::new(), Vec::new());
    let (mut last_verify, mut last_check) = (Vec::new(), Vec::new());
    let (mut streamed_install, mut file_install) = (Vec::new(), Vec::new());
    for i in 0..7 {
        let t = Instant::now();
        for (i, c) in chunks.iter().enumerate() {
            verify_chunk(table, i as u32, c).expect("chunk");
        }
        check_only.push(t.elapsed().as_secs_f64() * 1e3);
        let data = dir.join(format!("data-{i}"));
        std::fs::create_dir_all(&data).expect("dir");
        let t = Instant::now();
        let stream = unpacked(&data);
        on_arrival.push(t.elapsed().as_secs_f64() * 1e3);
        // The check after the last chunk: signature and rules, then the digest
        // compare and the unpacked directory moved into place (fsyncs, rename).
        let t = Instant::now();
        let again = header.verify(&policy()).expect("verifies");
        let checked = t.elapsed();
        stream
            .finish(&again, &data.join("bundle"))
            .expect("finishes");
        last_check.push(t.elapsed().as_secs_f64() * 1e6);
        last_verify.push(checked.as_secs_f64() * 1e6);
        let _ = std::fs::remove_dir_all(&data);

        // The whole step after the last chunk as the agent runs it (check, model
        // load, golden case, state write), against the full re-verification and
        // unpack of the file that it replaced (what sideloading still does).
        let store = Store::open(&data).expect("store");
        let stream = unpacked(&data);
        let t = Instant::now();
        let now = UnixTime::now();
        install_download(
            &store,
            &trust,
            &facts,
            &header,
            || Ok(stream),
            InstallMode::Activate,
            now,
        )
        .expect("installs");
        streamed_install.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = std::fs::remove_dir_all(&data);
        let store = Store::open(&data).expect("store");
        let t = Instant::now();
        install_file(&store, &trust, &facts, &path, InstallMode::Activate, now).expect("installs");
        file_install.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = std::fs::remove_dir_all(&data);
    }
    let mb = size / 1e6;
    let (check_only, on_arrival) = (median(check_only), median(on_arrival));
    println!(
        "  {mb:.1} MB bundle, {} chunks: while downloading, checking each chunk {check_only:.1} ms ({:.0} MB/s); \
         checking + unpacking each chunk {on_arrival:.1} ms ({:.0} MB/s, {:.1}x)",
        chunks.len(),
        mb / (check_only / 1e3),
        mb / (on_arrival / 1e3),
        on_arrival / check_only
    );
    let (streamed, file) = (median(streamed_install), median(file_install));
    let (last_verify, last_check) = (median(last_verify), median(last_check));
    println!(
        "  the check after the last chunk: signature + rules {last_verify:.0} µs, then digest compare + \
         unpacked directory moved into place (manifest copy, fsyncs, rename) {:.0} µs; {last_check:.0} µs in all",
        last_check - last_verify
    );
    println!(
        "  the whole step after the last chunk (check, model load, golden case, state): {streamed:.1} ms; \
         with the full re-verification + unpack it replaced {file:.1} ms ({:.2}x)",
        streamed / file
    );
}

fn onnxruntime(case: &Case, tract_us: f64) {
    let model = format!("{MODELS}/{}", case.file);
    match timing::onnxruntime_us(&model, std::slice::from_ref(&case.input), case.runs) {
        Ok(ort_us) => println!(
            "  {:<18} tract {:>9.1} µs   onnxruntime (1 thread) {:>9.1} µs   tract/ORT {:.2}x",
            case.file,
            tract_us,
            ort_us,
            tract_us / ort_us
        ),
        Err(why) => println!("  {:<18} onnxruntime: {why}", case.file),
    }
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Peak RSS of the release agent serving the tabular model while 40 clients
/// at once each send a valid 15 MiB inference request (issue 24's attack),
/// with the default `limits.api_*` and with them opened wide, same run.
fn memory_under_load(dir: &Path, case: &Case, model: &LoadedModel) {
    let agent = Path::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    let trust = dir.join("load-root.cbor");
    write_root(&trust);
    let bundle = make_bundle(dir, case, model, 0);
    // Rows of the iris input until the JSON body is 15 MiB.
    let row = "5.0,3.4,1.5,0.2";
    let rows = (15 << 20) / (row.len() + 1);
    let mut data = String::with_capacity(15 << 20);
    for i in 0..rows {
        if i > 0 {
            data.push(',');
        }
        data.push_str(row);
    }
    let body = format!(
        r#"{{"inputs":[{{"name":"features","shape":[{rows},4],"datatype":"FP32","data":[{data}]}}]}}"#
    );
    drop(data);
    // The same rows as binary tensor data, answered in binary too.
    let brows = (15 << 20) / 16;
    let header = format!(
        r#"{{"inputs":[{{"name":"features","shape":[{brows},4],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}],"parameters":{{"binary_data_output":true}}}}"#,
        brows * 16
    );
    let mut binary = header.clone().into_bytes();
    for _ in 0..brows {
        for x in [5.0f32, 3.4, 1.5, 0.2] {
            binary.extend_from_slice(&x.to_le_bytes());
        }
    }
    let json = body.into_bytes();
    println!(
        "  40 clients at once, each a valid {:.1} MiB request ({rows} rows as JSON, {brows} rows as binary tensor data):",
        json.len() as f64 / (1 << 20) as f64
    );
    let defaults = edgefleet_agent::config::LimitsConfig::default();
    let default_limits = format!(
        "default limits ({} MiB of request memory, {} requests)",
        defaults.api_memory_bytes >> 20,
        defaults.api_requests_in_flight
    );
    let open = "[limits]\napi_memory_bytes = 4294967296\napi_requests_in_flight = 4096\napi_connections = 65536\n";
    for (what, limits, body, header_len) in [
        (format!("JSON, {default_limits}"), "", &json, None),
        (
            format!("binary, {default_limits}"),
            "",
            &binary,
            Some(header.len()),
        ),
        (
            "JSON, no limits (4 GiB of request memory, 4096 requests)".to_string(),
            open,
            &json,
            None,
        ),
    ] {
        let run = format!("{}-{}", limits.len(), header_len.is_some());
        let data_dir = dir.join(format!("load-{run}"));
        install_bundle(agent, &data_dir, &trust, &bundle);
        let config = dir.join(format!("load-{run}.toml"));
        std::fs::write(&config, limits).expect("config");
        let (mut child, api) = spawn_agent(agent, Some(&config), &data_dir, &trust);
        std::thread::sleep(Duration::from_millis(500));
        let before = rss_kib(child.id());
        let started = Instant::now();
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..40)
                .map(|_| {
                    let (api, body) = (&api, &body);
                    scope.spawn(move || {
                        let mut stream = TcpStream::connect(api).expect("connect");
                        stream
                            .set_read_timeout(Some(Duration::from_secs(120)))
                            .expect("timeout");
                        let binary = header_len
                            .map(|n| format!("Inference-Header-Content-Length: {n}\r\n"))
                            .unwrap_or_default();
                        let head = format!(
                            "POST /v2/models/{}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{binary}Content-Length: {}\r\nConnection: close\r\n\r\n",
                            case.channel,
                            body.len()
                        );
                        // A refused request is answered before its body is read:
                        // the server may close while this is still sending.
                        let _ = stream
                            .write_all(head.as_bytes())
                            .and_then(|()| stream.write_all(body));
                        let mut answer = Vec::new();
                        let _ = stream.read_to_end(&mut answer);
                        std::str::from_utf8(answer.get(9..12).unwrap_or(b"0"))
                            .ok()
                            .and_then(|c| c.parse().ok())
                            .unwrap_or(0)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client"))
                .collect()
        });
        let took = started.elapsed();
        let peak = status_kib(child.id(), "VmHWM:");
        let after = rss_kib(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let count = |code| statuses.iter().filter(|s| **s == code).count();
        println!(
            "    {what}: peak RSS {:.0} MB (before {:.0} MB, after {:.0} MB); answers: {} x 200, {} x 503, {} other; {:.1} s",
            peak as f64 / 1024.0,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            count(200),
            count(503),
            statuses.len() - count(200) - count(503),
            took.as_secs_f64()
        );
    }
}

/// Starts the release agent, waits for readiness, settles, reads its RSS.
fn agent_rss(agent: &Path, data: &Path, trust: &Path) -> u64 {
    agent_rss_with(agent, data, trust, None, Duration::from_millis(1500), None).0
}

/// Inference requests sent after the first RSS reading: the model's name, the
/// request body, how many.
type Requests<'a> = (&'a str, &'a str, usize);

/// RSS of `agent run` serving `data`, `settle` after it is listening; with
/// `config`, the agent reads it (broker, telemetry) too. With `requests`, also the
/// RSS after answering them.
fn agent_rss_with(
    agent: &Path,
    data: &Path,
    trust: &Path,
    config: Option<&Path>,
    settle: Duration,
    requests: Option<Requests<'_>>,
) -> (u64, Option<u64>) {
    let (mut child, api) = spawn_agent(agent, config, data, trust);
    std::thread::sleep(settle);
    let rss = rss_kib(child.id());
    let serving = requests.map(|(model, body, n)| {
        let stream = TcpStream::connect(&api).expect("connect to the agent");
        let mut client = Client {
            stream: BufReader::new(stream),
            server_schedstat: String::new(),
        };
        for _ in 0..n {
            let status = client.post(&format!("/v2/models/{model}/infer"), body);
            assert_eq!(status, 200, "inference through the agent's API");
        }
        rss_kib(child.id())
    });
    if std::env::var("EDGEFLEET_BENCH_ONLY").is_ok_and(|v| v == "rss") {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let parts: Vec<&str> = status
            .lines()
            .filter(|l| l.starts_with("RssAnon") || l.starts_with("RssFile"))
            .collect();
        println!(
            "    ({})",
            parts
                .join(", ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    (rss, serving)
}

/// `EDGEFLEET_BENCH_ONLY=channels`: the RSS of `agent run` serving 0, 1, 2 and
/// 5 small models (one channel each, the first `n` cases), loaded and after one
/// request to each, for this build and, when it exists, the static device
/// build; against the target of the models' sum + 10 MB.
fn channels_rss(dir: &Path, cases: &[Case]) {
    let models: Vec<LoadedModel> = cases
        .iter()
        .map(|c| {
            LoadedModel::load(&std::fs::read(format!("{MODELS}/{}", c.file)).expect("model"))
                .expect("loads")
        })
        .collect();
    let mut builds = vec![(
        "this build (glibc, dynamic)",
        PathBuf::from(env!("CARGO_BIN_EXE_edgefleet-agent")),
    )];
    if Path::new(STATIC_X86_64).is_file() {
        builds.push(("the static musl device build", PathBuf::from(STATIC_X86_64)));
    }
    for (what, agent) in builds {
        println!("  {what}:");
        let base = dir.join(what.split_whitespace().nth(1).unwrap_or("build"));
        std::fs::create_dir_all(&base).expect("dir");
        let trust = base.join("root.cbor");
        write_root(&trust);
        let bundles: Vec<PathBuf> = cases
            .iter()
            .zip(&models)
            .map(|(c, m)| make_bundle(&base, c, m, 0))
            .collect();
        let mut empty = 0;
        for n in [0usize, 1, 2, 5] {
            let data = base.join(format!("data-{n}"));
            for b in &bundles[..n] {
                install_bundle(&agent, &data, &trust, b);
            }
            let bodies: Vec<String> = cases[..n].iter().map(|c| oip_body(&c.input)).collect();
            let mut loaded = Vec::new();
            let mut served = Vec::new();
            let mut split = Vec::new();
            for _ in 0..3 {
                let (mut child, api) = spawn_agent(&agent, None, &data, &trust);
                std::thread::sleep(Duration::from_millis(1500));
                loaded.push(rss_kib(child.id()));
                let stream = TcpStream::connect(&api).expect("connect to the agent");
                let mut client = Client {
                    stream: BufReader::new(stream),
                    server_schedstat: String::new(),
                };
                for (c, body) in cases[..n].iter().zip(&bodies) {
                    let status = client.post(&format!("/v2/models/{}/infer", c.channel), body);
                    assert_eq!(status, 200, "{} answers", c.channel);
                }
                served.push(rss_kib(child.id()));
                split.push(rss_split_kib(child.id()));
                let _ = child.kill();
                let _ = child.wait();
            }
            let (loaded, served) = (median_u64(loaded), median_u64(served));
            let anon = median_u64(split.iter().map(|(a, _)| *a).collect());
            let file = median_u64(split.iter().map(|(_, f)| *f).collect());
            let models_kib: u64 = cases[..n]
                .iter()
                .map(|c| {
                    std::fs::metadata(format!("{MODELS}/{}", c.file))
                        .expect("model")
                        .len()
                })
                .sum::<u64>()
                / 1024;
            if n == 0 {
                empty = loaded;
                println!(
                    "    no model: {loaded} KiB (anonymous {anon} KiB, the binary's pages {file} KiB)"
                );
                continue;
            }
            let names: Vec<&str> = cases[..n].iter().map(|c| c.channel).collect();
            println!(
                "    {n} model(s) ({}; files {models_kib} KiB): loaded {loaded} KiB, after one request each {served} KiB (anonymous {anon} KiB, the binary's pages {file} KiB); {:+} KiB over no model; target models + 10 MB = {} KiB: {}",
                names.join(", "),
                served as i64 - empty as i64,
                models_kib + 10 * 1024,
                if served <= models_kib + 10 * 1024 {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    }
}

/// RssAnon and RssFile (the binary's and libraries' pages) of a process, KiB.
fn rss_split_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The static x86-64 device build, where `cross/build.sh` puts it.
const STATIC_X86_64: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../cross/out/x86_64-unknown-linux-musl/edgefleet-agent"
);

fn idle_rss_and_size(dir: &Path, cnn: &Case, model: &LoadedModel) {
    let host = Path::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    idle_rss(
        dir.join("host"),
        cnn,
        model,
        host,
        "this build (glibc, dynamic)",
    );
    if Path::new(STATIC_X86_64).is_file() {
        idle_rss(
            dir.join("musl"),
            cnn,
            model,
            Path::new(STATIC_X86_64),
            "the static musl device build (cross/out/x86_64-unknown-linux-musl)",
        );
    } else {
        println!(
            "  the static musl device build: not measured, not built (cross/build.sh x86_64-unknown-linux-musl)"
        );
    }
    // A second static build to compare with in the same run (e.g. one linked
    // without the code layout of cross/order/).
    if let Some(other) = std::env::var_os("EDGEFLEET_BENCH_STATIC_BASELINE") {
        idle_rss(
            dir.join("musl-baseline"),
            cnn,
            model,
            Path::new(&other),
            &format!("baseline static build ({})", Path::new(&other).display()),
        );
    }
    binary_size();
}

fn idle_rss(dir: PathBuf, cnn: &Case, model: &LoadedModel, agent: &Path, what: &str) {
    std::fs::create_dir_all(&dir).expect("dir");
    let trust = dir.join("root.cbor");
    write_root(&trust);
    let empty = agent_rss(agent, &dir.join("rss-empty"), &trust);
    let data = dir.join("rss-cnn");
    let bundle = make_bundle(&dir, cnn, model, 0);
    install_bundle(agent, &data, &trust, &bundle);
    let body = oip_body(&cnn.input);
    let requests = Some((cnn.channel, body.as_str(), 20));
    let (loaded, serving) = agent_rss_with(
        agent,
        &data,
        &trust,
        None,
        Duration::from_millis(1500),
        requests,
    );
    let connected = connected_rss(&dir, agent, &data, &trust, requests);
    let model_kib = std::fs::metadata(format!("{MODELS}/{}", cnn.file))
        .expect("model")
        .len()
        / 1024;
    println!("  {what}:");
    println!(
        "    idle RSS, no model: {:.1} MB (target < 8 MB); with {} ({} KiB) loaded: {:.2} MB = {} KiB (target < model + 10 MB = {} KiB)",
        empty as f64 / 1024.0,
        cnn.file,
        model_kib,
        loaded as f64 / 1024.0,
        loaded,
        model_kib + 10 * 1024
    );
    if let Some(kib) = serving {
        println!(
            "    the same after answering 20 CNN inference requests: {:.2} MB = {kib} KiB",
            kib as f64 / 1024.0
        );
    }
    match connected {
        Ok((kib, serving)) => println!(
            "    with the CNN loaded and connected to Mosquitto over mutual TLS (telemetry every second, 5 s after start): {:.2} MB = {kib} KiB; after 20 inference requests {:.2} MB",
            kib as f64 / 1024.0,
            serving.unwrap_or(0) as f64 / 1024.0
        ),
        Err(why) => println!("    connected to a broker: not measured ({why})"),
    }
}

/// RSS of the agent serving `data` while connected to a Mosquitto on loopback
/// over mutual TLS (as in production), sending telemetry every second.
fn connected_rss(
    dir: &Path,
    agent: &Path,
    data: &Path,
    trust: &Path,
    requests: Option<Requests<'_>>,
) -> Result<(u64, Option<u64>), String> {
    // Panics with the reason when openssl is missing, as the tests do.
    let pki = Pki::new(dir);
    let (ca, cert, key) = pki.client("bench-dev");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let p = |f: &str| pki.dir.join(f).display().to_string();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nlog_type all\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = dir.join("mosquitto.log");
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("mosquitto: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = broker.kill();
            return Err("mosquitto did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"bench-dev\"\n[broker]\nurl = \"mqtts://localhost:{port}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncontroller_key = \"{}\"\n[telemetry]\ninterval_s = 1\n[limits]\ndisk_reserve_bytes = 0\n",
            ca.display(),
            cert.display(),
            key.display(),
            controller_key_file(dir).display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let rss = agent_rss_with(
        agent,
        data,
        trust,
        Some(&config),
        Duration::from_secs(5),
        requests,
    );
    let _ = broker.kill();
    let _ = broker.wait();
    // The measurement counts only if the agent really connected and published.
    let seen = std::fs::read_to_string(&log).unwrap_or_default();
    if seen.contains("as bench-dev") && seen.contains("Received PUBLISH from bench-dev") {
        Ok(rss)
    } else {
        Err(format!(
            "the agent did not connect and publish; mosquitto said: {}",
            seen.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// The controller's command key (public half) the agent pins, in `dir`; the
/// agent's link does not start without one.
fn controller_key_file(dir: &Path) -> PathBuf {
    let path = dir.join("controller.pub");
    let key = edgefleet_shared::SecretKey::from_seed([7; 32]);
    std::fs::write(&path, key.public().to_pem()).expect("controller key");
    path
}

/// `EDGEFLEET_BENCH_ONLY=soak`: the release agent serving the tabular model,
/// connected to Mosquitto over mutual TLS, telemetry every second, 20 inference
/// requests a second, for `EDGEFLEET_SOAK_S` seconds (default 3600). RSS is
/// sampled every 10 s; the growth is the least-squares slope of the samples
/// after the first tenth (warm-up), per hour (target: under 1 MB/hour).
fn soak(dir: &Path, case: &Case, model: &LoadedModel) {
    let seconds: u64 = std::env::var("EDGEFLEET_SOAK_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600);
    let agent = Path::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    let trust = dir.join("soak-root.cbor");
    write_root(&trust);
    let data = dir.join("soak-data");
    let bundle = make_bundle(dir, case, model, 0);
    install_bundle(agent, &data, &trust, &bundle);
    let pki = Pki::new(dir);
    let (ca, cert, key) = pki.client("bench-dev");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let p = |f: &str| pki.dir.join(f).display().to_string();
    let conf = dir.join("soak-mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nlog_type all\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        ),
    )
    .expect("conf");
    let broker_log = dir.join("soak-mosquitto.log");
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&broker_log).expect("log"))
        .spawn()
        .expect("mosquitto");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = dir.join("soak-agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"bench-dev\"\n[broker]\nurl = \"mqtts://localhost:{port}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncontroller_key = \"{}\"\n[telemetry]\ninterval_s = 1\n[limits]\ndisk_reserve_bytes = 0\n",
            ca.display(),
            cert.display(),
            key.display(),
            controller_key_file(dir).display()
        ),
    )
    .expect("config");
    let (mut child, api) = spawn_agent(agent, Some(&config), &data, &trust);
    let body = oip_body(&case.input);
    let mut client = Client {
        stream: BufReader::new(TcpStream::connect(&api).expect("connect")),
        server_schedstat: String::new(),
    };
    let started = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let (mut requests, mut failed) = (0u64, 0u64);
    let mut next_sample = Duration::ZERO;
    let path = format!("/v2/models/{}/infer", case.channel);
    println!("  {seconds} s: telemetry every second, 20 requests/s; RSS every 10 s");
    while started.elapsed() < Duration::from_secs(seconds) {
        let due = started + Duration::from_millis(requests * 50);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        requests += 1;
        if client.post(&path, &body) != 200 {
            failed += 1;
        }
        if started.elapsed() >= next_sample {
            let kib = rss_kib(child.id());
            samples.push((started.elapsed().as_secs_f64(), kib));
            if samples.len() % 60 == 1 {
                println!(
                    "    t = {:>5.0} s: RSS {:.2} MB, {requests} requests, {failed} failed",
                    started.elapsed().as_secs_f64(),
                    kib as f64 / 1024.0
                );
            }
            next_sample += Duration::from_secs(10);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = broker.kill();
    let _ = broker.wait();
    // Connected the whole time: the broker received the agent's telemetry.
    let published = std::fs::read_to_string(&broker_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Received PUBLISH from bench-dev") && l.contains("/telemetry"))
        .count();
    println!("  telemetry messages the broker received from the agent: {published}");
    let warm = samples.len() / 10;
    let tail = &samples[warm..];
    let n = tail.len() as f64;
    let (mx, my) = (
        tail.iter().map(|(t, _)| t).sum::<f64>() / n,
        tail.iter().map(|(_, k)| *k as f64).sum::<f64>() / n,
    );
    let slope_kib_per_s = tail
        .iter()
        .map(|(t, k)| (t - mx) * (*k as f64 - my))
        .sum::<f64>()
        / tail
            .iter()
            .map(|(t, _)| (t - mx).powi(2))
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
    let first = samples.first().map_or(0, |s| s.1);
    let last = samples.last().map_or(0, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "  RSS: start {:.2} MB, end {:.2} MB, max {:.2} MB; growth after warm-up {:.3} MB/hour (target < 1 MB/hour); {requests} requests, {failed} failed",
        first as f64 / 1024.0,
        last as f64 / 1024.0,
        max as f64 / 1024.0,
        slope_kib_per_s * 3600.0 / 1024.0
    );
}

fn binary_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stripped = dir.path().join("edgefleet-agent.stripped");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .status();
    match status {
        Ok(s) if s.success() => println!(
            "  binary: {:.1} MB as built by this profile, {:.1} MB stripped (glibc, dynamic; static musl builds: cross/)",
            std::fs::metadata(env!("CARGO_BIN_EXE_edgefleet-agent")).map_or(0, |m| m.len()) as f64
                / 1e6,
            std::fs::metadata(&stripped).map_or(0, |m| m.len()) as f64 / 1e6
        ),
        _ => println!("  binary size: `strip` failed"),
    }
}

/// `EDGEFLEET_BENCH_DRIFT_COUNT=plain:N|with:N`: loads the tabular model and
/// its reference, then runs N inferences (with the drift update after each),
/// and nothing else, for `bench/drift-instructions.sh` to count instructions
/// under callgrind: repeatable whatever else the machine is doing.
fn drift_count(spec: &str) {
    let (mode, n) = spec.split_once(':').expect("plain:N or with:N");
    let n: usize = n.parse().expect("N");
    let case = &cases()[0];
    let bytes = std::fs::read(format!("{MODELS}/{}", case.file)).expect("model");
    let model = LoadedModel::load(&bytes).expect("loads");
    let (headers, rows) = iris_reference();
    let reference = std::sync::Arc::new(
        edgefleet_agent::reference_stats::summarise(&model, &headers, &rows, &[])
            .expect("reference"),
    );
    let tracked = ModelServed::new(Some(ActiveModel {
        bundle: bundle_ref(case),
        model: model.clone(),
        reference: Some(reference),
    }));
    let digest = bundle_ref(case).digest;
    let input = std::slice::from_ref(&case.input);
    for _ in 0..n {
        let out = model.run(input).expect("runs");
        if mode == "with" {
            tracked.observe(&digest, input, &out);
        }
    }
    println!("{mode}: {n} requests");
}

fn main() {
    if let Ok(spec) = std::env::var("EDGEFLEET_BENCH_DRIFT_COUNT") {
        drift_count(&spec);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = cases();
    let only = std::env::var("EDGEFLEET_BENCH_ONLY").unwrap_or_default();
    if only == "soak" {
        let bytes = std::fs::read(format!("{MODELS}/{}", cases[0].file)).expect("model");
        let model = LoadedModel::load(&bytes).expect("loads");
        println!("soak (release agent process, {}):", cases[0].file);
        soak(dir.path(), &cases[0], &model);
        return;
    }
    if only == "load" {
        let bytes = std::fs::read(format!("{MODELS}/{}", cases[0].file)).expect("model");
        let model = LoadedModel::load(&bytes).expect("loads");
        println!("local API memory under load (release agent process):");
        memory_under_load(dir.path(), &cases[0], &model);
        return;
    }
    if only == "builds" {
        let models: Vec<LoadedModel> = cases
            .iter()
            .map(|c| {
                LoadedModel::load(&std::fs::read(format!("{MODELS}/{}", c.file)).expect("model"))
                    .expect("loads")
            })
            .collect();
        println!("the agent's builds side by side (issue 25), medians:");
        builds(dir.path(), &cases, &models);
        return;
    }
    if only == "channels" {
        println!("agent RSS serving several models, one per channel (issue 20), median of 3:");
        channels_rss(dir.path(), &cases);
        return;
    }
    if only == "rss" || only == "download" {
        let bytes = std::fs::read(format!("{MODELS}/{}", cases[1].file)).expect("model");
        let cnn = LoadedModel::load(&bytes).expect("loads");
        if only == "rss" {
            println!("release agent process:");
            idle_rss_and_size(dir.path(), &cases[1], &cnn);
        } else {
            println!("after the last chunk:");
            post_download_check(dir.path(), &cases[1], &cnn);
        }
        return;
    }
    println!("model load (tract: parse, optimise, plan), median of 15:");
    let mut models = Vec::new();
    for case in &cases {
        let bytes = std::fs::read(format!("{MODELS}/{}", case.file)).expect("model");
        let ms = median(
            (0..15)
                .map(|_| {
                    let t = Instant::now();
                    LoadedModel::load(&bytes).expect("loads");
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        );
        println!("  {:<18} {:>8.2} ms ({} bytes)", case.file, ms, bytes.len());
        models.push(LoadedModel::load(&bytes).expect("loads"));
    }
    // Whether an idle vCPU polls before it halts (a guest kernel setting): when
    // it does not, every wake-up of a thread on an idle vCPU exits to the host,
    // the main cost of a local round trip on this VM.
    if let Ok(ns) = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        println!("guest halt polling: {} ns", ns.trim());
    }
    println!("inference, batch of 1, median:");
    for (case, model) in cases.iter().zip(&models) {
        api_vs_direct(case, model);
    }
    if only == "api" {
        return;
    }
    println!(
        "drift tracking on {}, medians of interleaved rounds:",
        cases[0].file
    );
    drift_overhead(&cases[0], &models[0]);
    println!("tract vs onnxruntime, same model and input, median:");
    for (case, model) in cases.iter().zip(&models) {
        let tract = time_us(case.runs, || {
            model.run(std::slice::from_ref(&case.input)).expect("runs");
        });
        onnxruntime(case, tract);
        if case.file == "forest_cancer.onnx" {
            let bytes = std::fs::read(format!("{MODELS}/{}", case.file)).expect("model");
            let plain = LoadedModel::load_with(&bytes, false).expect("loads");
            let own = time_us(200, || {
                plain.run(std::slice::from_ref(&case.input)).expect("runs");
            });
            println!(
                "  {:<18} tract's own tree evaluator {:>9.1} µs = {:.0}x our compact evaluator",
                case.file,
                own,
                own / tract
            );
        }
    }
    println!("the agent's builds side by side (issue 25), medians:");
    builds(dir.path(), &cases, &models);
    println!("tract options on {} (same image), median:", cases[1].file);
    tract_options(&cases[1]);
    println!("after the last chunk:");
    post_download_check(dir.path(), &cases[1], &models[1]);
    println!("release agent process:");
    idle_rss_and_size(dir.path(), &cases[1], &models[1]);
}

/// Installs `bundle` into the data directory `data` with the agent's CLI.
fn install_bundle(agent: &Path, data: &Path, trust: &Path, bundle: &Path) {
    let out = Command::new(agent)
        .arg("--data-dir")
        .arg(data)
        .arg("--trust")
        .arg(trust)
        .arg("install")
        .arg(bundle)
        .output()
        .expect("install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Starts `edgefleet-agent run` on a free loopback port; returns it once its
/// readiness line names the local API's address.
fn spawn_agent(
    agent: &Path,
    config: Option<&Path>,
    data: &Path,
    trust: &Path,
) -> (std::process::Child, String) {
    spawn_agent_on(None, agent, config, data, trust)
}

/// [`spawn_agent`], on one CPU when `cpu` names it (`taskset`).
fn spawn_agent_on(
    cpu: Option<usize>,
    agent: &Path,
    config: Option<&Path>,
    data: &Path,
    trust: &Path,
) -> (std::process::Child, String) {
    let mut cmd = on_cpu(cpu, agent.as_os_str());
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(data)
        .arg("--trust")
        .arg(trust)
        .args(["run", "--http", "127.0.0.1:0"])
        .env("RUST_LIB_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    let stdout = child.stdout.take().expect("stdout");
    let mut api = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(url) = line.strip_prefix("local API listening on http://") {
            api = url.trim().to_string();
            break;
        }
    }
    (child, api)
}

/// An agent binary (or the Python baseline) answering one model's requests.
struct Server {
    what: String,
    process: std::process::Child,
    client: Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn connect(addr: &str) -> Client {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    Client {
        stream: BufReader::new(stream),
        server_schedstat: String::new(),
    }
}

/// `program` to run on CPU `cpu` when given (`taskset -c`), else as is.
fn on_cpu(cpu: Option<usize>, program: &std::ffi::OsStr) -> Command {
    match cpu {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(cpu.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// This process's main thread (the benchmark's client) on the CPUs of
/// `list` (`taskset -c` syntax); the list it had, when `taskset` did it.
fn pin_self(list: &str) -> Option<String> {
    let pid = std::process::id().to_string();
    let had = Command::new("taskset")
        .args(["-c", "-p", &pid])
        .output()
        .ok()?;
    let had = String::from_utf8_lossy(&had.stdout)
        .rsplit(": ")
        .next()?
        .trim()
        .to_string();
    let pinned = Command::new("taskset")
        .args(["-c", "-p", list, &pid])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    pinned.then_some(had)
}

/// Nanoseconds all threads of process `pid` have run on a CPU (the sum of
/// their `schedstat`s).
fn process_cpu_ns(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the server's threads")
        .filter_map(|t| t.ok())
        .map(|t| cpu_ns(&t.path().join("schedstat").to_string_lossy()))
        .sum()
}

/// The agent builds to compare: this (release, glibc) build, the static musl
/// device build when `cross/build.sh` made it, and `EDGEFLEET_BENCH_STATIC_BASELINE`.
fn agent_builds() -> Vec<(String, PathBuf)> {
    let mut builds = vec![(
        "release build (glibc, this cargo bench)".to_string(),
        PathBuf::from(env!("CARGO_BIN_EXE_edgefleet-agent")),
    )];
    if Path::new(STATIC_X86_64).is_file() {
        builds.push((
            "device build (static musl, cross/out)".to_string(),
            PathBuf::from(STATIC_X86_64),
        ));
    } else {
        println!(
            "  the static musl device build: not measured, not built (cross/build.sh x86_64-unknown-linux-musl)"
        );
    }
    if let Some(other) = std::env::var_os("EDGEFLEET_BENCH_STATIC_BASELINE") {
        let other = PathBuf::from(other);
        builds.push((format!("baseline ({})", other.display()), other));
    }
    builds
}

/// `edgefleet-agent infer --time RUNS` of `agent` on the installed model in
/// `data`: (load ms, median inference µs), as the agent prints them.
fn infer_timed(agent: &Path, data: &Path, trust: &Path, request: &Path, runs: usize) -> (f64, f64) {
    let out = Command::new(agent)
        .arg("--data-dir")
        .arg(data)
        .arg("--trust")
        .arg(trust)
        .arg("infer")
        .arg("--input")
        .arg(request)
        .arg("--time")
        .arg(runs.to_string())
        .output()
        .expect("infer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "infer --time failed: {err}");
    let number_after = |label: &str| -> f64 {
        err.split(label)
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` in: {err}"))
    };
    (number_after("load "), number_after("median "))
}

/// Issue 25: the builds side by side on the same models and requests, with
/// one client: in-process inference and load time (`infer --time`), and
/// inference through the local API (JSON, one connection, keep-alive) against
/// a minimal Python HTTP server around onnxruntime (one thread,
/// `bench/ort_server.py`) when `EDGEFLEET_ORT_PYTHON` names a Python with it.
/// Servers are timed in interleaved rounds; medians across rounds.
fn builds(dir: &Path, cases: &[Case], models: &[LoadedModel]) {
    let builds = agent_builds();
    // The client and every server on one CPU: on this 2-CPU VM a request's
    // latency otherwise depends on whether the server's thread was placed on
    // the client's CPU (a direct switch) or the other (a wake-up of an idle
    // vCPU, 30-80 µs): the same binary measured 0.65-1.25x itself.
    let unpinned = pin_self("0");
    let cpu = unpinned.as_ref().map(|_| 0);
    match cpu {
        Some(_) => println!(
            "  client and servers pinned to CPU 0 (taskset); server CPU per request from the servers' schedstat"
        ),
        None => println!(
            "  not pinned (no taskset): latencies depend on thread placement; read the server CPU per request"
        ),
    }
    let trust = dir.join("builds-root.cbor");
    write_root(&trust);
    let python = std::env::var_os("EDGEFLEET_ORT_PYTHON");
    if python.is_none() {
        println!(
            "  Python + onnxruntime server: not run (set EDGEFLEET_ORT_PYTHON to a python with onnxruntime; see docs/benchmarks.md)"
        );
    }
    for (case, model) in cases.iter().zip(models) {
        // The tree regressors are ours only (tract and the baseline differ).
        if !matches!(
            case.file,
            "iris_logreg.onnx" | "digits_cnn.onnx" | "forest_cancer.onnx"
        ) {
            continue;
        }
        let body = oip_body(&case.input);
        let request = dir.join(format!("{}-request.json", case.channel));
        std::fs::write(&request, &body).expect("request");
        let bundle = make_bundle(dir, case, model, 0);
        println!("  {}:", case.file);
        let mut servers = Vec::new();
        for (i, (what, agent)) in builds.iter().enumerate() {
            let data = dir.join(format!("builds-{}-{i}", case.channel));
            install_bundle(agent, &data, &trust, &bundle);
            let timed: Vec<(f64, f64)> = (0..5)
                .map(|_| infer_timed(agent, &data, &trust, &request, case.runs / 5))
                .collect();
            let load = median(timed.iter().map(|t| t.0).collect());
            let inference = median(timed.iter().map(|t| t.1).collect());
            println!(
                "    {what}: in-process inference {inference:.1} µs, load {load:.2} ms (medians of 5 `infer --time {}`)",
                case.runs / 5
            );
            let (process, addr) = spawn_agent_on(cpu, agent, None, &data, &trust);
            servers.push(Server {
                what: what.clone(),
                process,
                client: connect(&addr),
            });
        }
        if let Some(python) = &python {
            let mut process = on_cpu(cpu, python)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../bench/ort_server.py"
                ))
                .arg(format!("{MODELS}/{}", case.file))
                .stdout(Stdio::piped())
                .spawn()
                .expect("python runs");
            let mut line = String::new();
            BufReader::new(process.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("python says where it listens");
            let addr = line
                .trim()
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("ort_server.py said {line:?}"))
                .to_string();
            servers.push(Server {
                what: "Python + onnxruntime server (1 thread)".into(),
                process,
                client: connect(&addr),
            });
        }
        let path = format!("/v2/models/{}/infer", case.channel);
        let per_round = (case.runs / ROUNDS).max(20);
        let mut rounds = vec![Vec::new(); servers.len()];
        let mut cpu_rounds = vec![Vec::new(); servers.len()];
        for _ in 0..ROUNDS {
            for ((s, times), cpus) in servers.iter_mut().zip(&mut rounds).zip(&mut cpu_rounds) {
                let pid = s.process.id();
                let (wall, cpu) = time_with_cpu_of(
                    per_round,
                    || process_cpu_ns(pid),
                    || {
                        assert_eq!(s.client.post(&path, &body), 200, "{} answered", s.what);
                    },
                );
                times.push(wall);
                cpus.push(cpu);
            }
        }
        let api: Vec<f64> = rounds.into_iter().map(median).collect();
        let cpu_us: Vec<f64> = cpu_rounds.into_iter().map(median).collect();
        let python_at = python.as_ref().map(|_| api.len() - 1);
        for ((s, us), cpu) in servers.iter().zip(&api).zip(&cpu_us) {
            let mut line = format!(
                "    through the local API, {}: {us:.1} µs = {:.2}x the release build",
                s.what,
                us / api[0]
            );
            if let Some(p) = python_at {
                line.push_str(&format!(", {:.2}x the Python server", us / api[p]));
            }
            line.push_str(&format!(
                "; server CPU {cpu:.1} µs/request = {:.2}x the release build",
                cpu / cpu_us[0]
            ));
            if let Some(p) = python_at {
                line.push_str(&format!(", {:.2}x the Python server", cpu / cpu_us[p]));
            }
            println!("{line}");
        }
    }
    if let Some(list) = unpinned {
        pin_self(&list);
    }
}

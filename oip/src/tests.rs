use super::*;
use proptest::prelude::*;

fn tensor(name: &str, shape: &[u64], data: TensorData) -> Tensor {
    Tensor {
        name: name.into(),
        shape: shape.to_vec(),
        data,
    }
}

fn decode_json(body: &str) -> Result<Vec<Tensor>, String> {
    decode_request(body.as_bytes(), None)
        .map(|d| d.inputs)
        .map_err(|e| e.to_string())
}

/// A body with a JSON header of `json` and the binary part `binary`.
fn with_binary(json: &serde_json::Value, binary: &[u8]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(json).expect("json");
    let n = body.len();
    body.extend_from_slice(binary);
    (body, n)
}

fn decode_err(body: &[u8], header_len: Option<usize>) -> String {
    decode_request(body, header_len)
        .expect_err("refused")
        .to_string()
}

#[test]
fn json_data_reads_flat_or_nested_in_row_major_order() {
    let flat = decode_json(
        r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,-3,4e1]}]}"#,
    )
    .expect("flat");
    let nested = decode_json(
        r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[-3,4e1]]}]}"#,
    )
    .expect("nested");
    assert_eq!(
        flat,
        vec![tensor(
            "x",
            &[2, 2],
            TensorData::F32(vec![1.0, 2.5, -3.0, 40.0])
        )]
    );
    assert_eq!(nested, flat);
}

#[test]
fn every_datatype_reads_from_json() {
    let cases = [
        ("FP64", "[0.5,-1]", TensorData::F64(vec![0.5, -1.0])),
        ("INT8", "[-128,127]", TensorData::I8(vec![-128, 127])),
        ("INT32", "[-5,7]", TensorData::I32(vec![-5, 7])),
        (
            "INT64",
            "[-9223372036854775808,9223372036854775807]",
            TensorData::I64(vec![i64::MIN, i64::MAX]),
        ),
        ("UINT8", "[0,255]", TensorData::U8(vec![0, 255])),
        ("BOOL", "[true,false]", TensorData::Bool(vec![true, false])),
        (
            "BYTES",
            r#"["setosa","vir\u00e9\"ginica"]"#,
            TensorData::String(vec!["setosa".into(), "vir\u{e9}\"ginica".into()]),
        ),
    ];
    for (dtype, data, want) in cases {
        let got = decode_json(&format!(
            r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dtype}","data":{data}}}]}}"#
        ))
        .expect(dtype);
        assert_eq!(got, vec![tensor("x", &[2], want)], "{dtype}");
    }
}

#[test]
fn json_elements_of_the_wrong_kind_are_named_by_input_and_position() {
    let cases = [
        (
            "FP32",
            r#"[1,"a",3]"#,
            "element 1 (a string) is not a valid FP32",
        ),
        ("FP32", "[1,2,null]", "element 2 (null) is not a valid FP32"),
        ("FP32", "[true]", "element 0 (true) is not a valid FP32"),
        ("INT64", "[1,2.5]", "element 1 (2.5) is not a valid INT64"),
        ("INT8", "[[1],[128]]", "element 1 (128) is not a valid INT8"),
        ("UINT8", "[-1]", "element 0 (-1) is not a valid UINT8"),
        ("BOOL", "[true,1]", "element 1 (1) is not a valid BOOL"),
        (
            "INT32",
            r#"[{"a":1}]"#,
            "element 0 (an object) is not a valid INT32",
        ),
    ];
    for (dtype, data, want) in cases {
        let err = decode_json(&format!(
            r#"{{"inputs":[{{"name":"feat","shape":[3],"datatype":"{dtype}","data":{data}}}]}}"#
        ))
        .expect_err(data);
        assert_eq!(err, format!("input `feat`: {want}"), "{data}");
    }
    let err = decode_json(r#"{"inputs":[{"name":"s","shape":[1],"datatype":"FP16","data":[1]}]}"#)
        .expect_err("fp16");
    assert!(
        err.contains("input `s`") && err.contains("FP16") && err.contains("BYTES)"),
        "{err}"
    );
    let err = decode_json(r#"{"inputs":[{"name":"s","shape":[1],"datatype":"FP32","data":7}]}"#)
        .expect_err("not an array");
    assert!(err.contains("not an OIP v2 inference request"), "{err}");
}

#[test]
fn data_nested_deeper_than_a_tensor_can_be_is_refused() {
    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    let err = decode_json(&format!(
        r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{deep}}}]}}"#
    ))
    .expect_err("too deep");
    assert!(err.contains("nested deeper than 32"), "{err}");
}

#[test]
fn binary_inputs_follow_the_json_header_in_order() {
    let pixels: Vec<f32> = (0..6).map(|i| i as f32 / 4.0).collect();
    let mut binary: Vec<u8> = pixels.iter().flat_map(|x| x.to_le_bytes()).collect();
    binary.extend([1u8, 0, 1]);
    let json = serde_json::json!({"inputs": [
        {"name": "image", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
        {"name": "ids", "shape": [2], "datatype": "INT64", "data": [3, 4]},
        {"name": "mask", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}},
    ]});
    let (body, n) = with_binary(&json, &binary);
    let d = decode_request(&body, Some(n)).expect("decodes");
    assert_eq!(
        d.inputs,
        vec![
            tensor("image", &[1, 6], TensorData::F32(pixels)),
            tensor("ids", &[2], TensorData::I64(vec![3, 4])),
            tensor("mask", &[3], TensorData::Bool(vec![true, false, true])),
        ]
    );
}

#[test]
fn bytes_elements_are_text_in_json_and_length_prefixed_in_binary() {
    // JSON: a number where text is expected is named.
    let err = decode_json(
        r#"{"inputs":[{"name":"label","shape":[2],"datatype":"BYTES","data":["a",3]}]}"#,
    )
    .expect_err("number refused");
    assert!(
        err.contains("input `label`: element 1 (3) is not a valid BYTES"),
        "{err}"
    );
    // Text where a number is expected.
    let err =
        decode_json(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["1"]}]}"#)
            .expect_err("text refused");
    assert!(
        err.contains("element 0 (a string) is not a valid FP32"),
        "{err}"
    );
    // Binary: 4-byte little-endian length, then the bytes.
    let mut bin = Vec::new();
    for s in ["ab", "", "\u{e9}t\u{e9}"] {
        bin.extend_from_slice(&(s.len() as u32).to_le_bytes());
        bin.extend_from_slice(s.as_bytes());
    }
    let head = |size: usize| {
        serde_json::json!({"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES",
            "parameters": {"binary_data_size": size}}]})
    };
    let (body, n) = with_binary(&head(bin.len()), &bin);
    let got = decode_request(&body, Some(n)).expect("binary BYTES").inputs;
    assert_eq!(
        got[0].data,
        TensorData::String(vec!["ab".into(), String::new(), "\u{e9}t\u{e9}".into()])
    );
    // A length past the end, a cut length, and bytes that are not UTF-8.
    for (bytes, words) in [
        (
            &[9u8, 0, 0, 0, b'a'][..],
            "length 9 goes past the end of its data (1 bytes left)",
        ),
        (&[1u8, 0][..], "2 bytes left, not a 4-byte length"),
        (&[2u8, 0, 0, 0, 0xff, 0xfe][..], "not UTF-8"),
    ] {
        let (body, n) = with_binary(&head(bytes.len()), bytes);
        let err = decode_err(&body, Some(n));
        assert!(
            err.contains("input `s`: BYTES element 0") && err.contains(words),
            "{err}"
        );
    }
}

#[test]
fn binary_data_that_does_not_add_up_is_refused_with_the_reason() {
    let one = |size: u64| serde_json::json!({"inputs": [{"name": "image", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": size}}]});
    let (body, n) = with_binary(&one(8), &[0; 8]);
    assert!(decode_request(&body, Some(n)).is_ok());
    assert_eq!(
        decode_err(&body, Some(body.len() + 1)),
        format!(
            "Inference-Header-Content-Length is {} but the body has {} bytes",
            body.len() + 1,
            body.len()
        )
    );
    let (body, n) = with_binary(&one(12), &[0; 8]);
    assert_eq!(
        decode_err(&body, Some(n)),
        "input `image`: binary_data_size 12 goes past the end of the body (8 bytes of binary data left)"
    );
    let (body, n) = with_binary(&one(8), &[0; 9]);
    assert_eq!(
        decode_err(&body, Some(n)),
        "the body has 1 bytes of binary data beyond the inputs' binary_data_size"
    );
    let (body, n) = with_binary(&one(6), &[0; 6]);
    assert_eq!(
        decode_err(&body, Some(n)),
        "input `image`: binary_data_size 6 is not a whole number of FP32 elements (4 bytes each)"
    );
    let (body, _) = with_binary(&one(8), &[]);
    assert!(
        decode_err(&body, None).contains("no Inference-Header-Content-Length header"),
        "binary size without the header"
    );
    let both = serde_json::json!({"inputs": [{"name": "image", "shape": [2], "datatype": "FP32", "data": [1, 2], "parameters": {"binary_data_size": 8}}]});
    let (body, n) = with_binary(&both, &[0; 8]);
    assert_eq!(
        decode_err(&body, Some(n)),
        "input `image` has both `data` and a `binary_data_size` parameter"
    );
    let neither =
        serde_json::json!({"inputs": [{"name": "image", "shape": [2], "datatype": "FP32"}]});
    let (body, n) = with_binary(&neither, &[]);
    assert!(decode_err(&body, Some(n)).contains("input `image` has no `data`"));
    let mask = serde_json::json!({"inputs": [{"name": "mask", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]});
    let (body, n) = with_binary(&mask, &[1, 2]);
    assert_eq!(
        decode_err(&body, Some(n)),
        "input `mask`: byte 1 (2) is not a valid BOOL (0 or 1)"
    );
    // The header length cuts the JSON: the JSON error, not a panic.
    let (body, n) = with_binary(&one(8), &[0; 8]);
    assert!(decode_err(&body, Some(n - 1)).contains("not an OIP v2 inference request"));
}

fn outputs() -> Vec<Tensor> {
    vec![
        tensor("label", &[2], TensorData::I64(vec![0, 2])),
        tensor(
            "probabilities",
            &[2, 2],
            TensorData::F32(vec![0.1, 0.9, 0.75, 0.25]),
        ),
    ]
}

fn request(json: serde_json::Value) -> InferRequest {
    serde_json::from_value(json).expect("request")
}

fn json_of(e: &Encoded) -> serde_json::Value {
    let end = e.header_len.unwrap_or(e.body.len());
    serde_json::from_slice(&e.body[..end]).expect("json")
}

#[test]
fn responses_are_json_by_default_with_every_output() {
    let req = request(serde_json::json!({"id": "r1", "inputs": []}));
    assert!(!req.wants_binary());
    let e = encode_response("iris", "1.0.0", &req, &outputs()).expect("encodes");
    assert_eq!(e.header_len, None);
    assert_eq!(
        json_of(&e),
        serde_json::json!({
            "model_name": "iris", "model_version": "1.0.0", "id": "r1",
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]},
                {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.75, 0.25]},
            ]
        })
    );
}

#[test]
fn requested_outputs_come_in_the_requested_order_as_json_or_binary() {
    let req = request(serde_json::json!({
        "inputs": [],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": true}},
            {"name": "label"},
        ]
    }));
    assert!(req.wants_binary());
    let e = encode_response("iris", "1.0.0", &req, &outputs()).expect("encodes");
    let n = e.header_len.expect("binary follows");
    let json = json_of(&e);
    assert_eq!(json["outputs"][0]["name"], "probabilities");
    assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 16);
    assert!(json["outputs"][0].get("data").is_none());
    assert_eq!(json["outputs"][1]["data"], serde_json::json!([0, 2]));
    let floats: Vec<f32> = e.body[n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    assert_eq!(floats, vec![0.1, 0.9, 0.75, 0.25]);

    // All binary, one output overriding back to JSON.
    let req = request(serde_json::json!({
        "inputs": [],
        "parameters": {"binary_data_output": true},
        "outputs": [{"name": "label", "parameters": {"binary_data": false}}, {"name": "probabilities"}]
    }));
    let e = encode_response("iris", "1.0.0", &req, &outputs()).expect("encodes");
    let json = json_of(&e);
    assert_eq!(json["outputs"][0]["data"], serde_json::json!([0, 2]));
    assert_eq!(json["outputs"][1]["parameters"]["binary_data_size"], 16);
    assert_eq!(e.body.len(), e.header_len.expect("binary") + 16);

    let req = request(serde_json::json!({"inputs": [], "outputs": [{"name": "score"}]}));
    assert!(req.check_outputs(["label", "score"].into_iter()).is_ok());
    assert_eq!(
        req.check_outputs(["label", "probabilities"].into_iter())
            .expect_err("unknown")
            .to_string(),
        "requested output `score` is not an output of the model (outputs: `label`, `probabilities`)"
    );
    assert_eq!(
        encode_response("iris", "1.0.0", &req, &outputs())
            .expect_err("unknown")
            .to_string(),
        "requested output `score` is not an output of the model (outputs: `label`, `probabilities`)"
    );
}

#[test]
fn a_nan_or_infinite_output_is_refused_as_json_and_carried_as_binary() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let outputs = vec![
            tensor("label", &[1], TensorData::I64(vec![1])),
            tensor("probabilities", &[1, 2], TensorData::F32(vec![0.5, bad])),
        ];
        let req = request(serde_json::json!({"inputs": []}));
        let e = encode_response("iris", "1.0.0", &req, &outputs).expect_err("not JSON");
        assert!(
            matches!(&e, RequestError::NotFinite { output } if output == "probabilities"),
            "{e}"
        );
        assert!(e.to_string().contains("binary_data"), "{e}");
        // As binary data it goes through bit for bit.
        let req = request(serde_json::json!({
            "inputs": [],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}, {"name": "label"}]
        }));
        let e = encode_response("iris", "1.0.0", &req, &outputs).expect("binary");
        let n = e.header_len.expect("binary follows");
        let last = f32::from_le_bytes(e.body[n + 4..n + 8].try_into().expect("4"));
        assert_eq!(last.to_bits(), bad.to_bits());
    }
    // FP64 too.
    let outputs = vec![tensor("score", &[1], TensorData::F64(vec![f64::NAN]))];
    let req = request(serde_json::json!({"inputs": []}));
    assert!(encode_response("m", "1", &req, &outputs).is_err());
}

/// A tensor of any supported type with 0..40 elements.
fn any_tensor() -> impl Strategy<Value = TensorData> {
    prop_oneof![
        prop::collection::vec(any::<f32>(), 0..40).prop_map(TensorData::F32),
        prop::collection::vec(any::<f64>(), 0..40).prop_map(TensorData::F64),
        prop::collection::vec(any::<i8>(), 0..40).prop_map(TensorData::I8),
        prop::collection::vec(any::<i32>(), 0..40).prop_map(TensorData::I32),
        prop::collection::vec(any::<i64>(), 0..40).prop_map(TensorData::I64),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(TensorData::U8),
        prop::collection::vec(any::<bool>(), 0..40).prop_map(TensorData::Bool),
        prop::collection::vec(".{0,12}", 0..40).prop_map(TensorData::String),
    ]
}

/// Equal, with NaN equal to NaN of the same bits.
fn same(a: &TensorData, b: &TensorData) -> bool {
    match (a, b) {
        (TensorData::F32(x), TensorData::F32(y)) => x
            .iter()
            .map(|v| v.to_bits())
            .eq(y.iter().map(|v| v.to_bits())),
        (TensorData::F64(x), TensorData::F64(y)) => x
            .iter()
            .map(|v| v.to_bits())
            .eq(y.iter().map(|v| v.to_bits())),
        _ => a == b,
    }
}

proptest! {
    /// Any tensors sent as binary (and as JSON, when finite) come back as sent;
    /// a response encoded as binary carries the same bytes.
    #[test]
    fn tensors_round_trip_through_binary_and_json(
        tensors in prop::collection::vec((any_tensor(), any::<bool>()), 1..5)
    ) {
        let mut inputs = Vec::new();
        let mut binary = Vec::new();
        for (i, (data, as_binary)) in tensors.iter().enumerate() {
            let dtype = data.dtype().oip_name();
            let shape = [data.len() as u64];
            if *as_binary {
                let before = binary.len();
                to_bytes(data, &mut binary);
                inputs.push(serde_json::json!({"name": format!("t{i}"), "shape": shape, "datatype": dtype,
                    "parameters": {"binary_data_size": binary.len() - before}}));
            } else {
                let json = serde_json::to_value(Data(data)).expect("json");
                inputs.push(serde_json::json!({"name": format!("t{i}"), "shape": shape, "datatype": dtype, "data": json}));
            }
        }
        let (body, n) = with_binary(&serde_json::json!({"inputs": inputs}), &binary);
        let decoded = decode_request(&body, Some(n));
        let non_finite = tensors.iter().any(|(d, b)| !b && match d {
            TensorData::F32(v) => v.iter().any(|x| !x.is_finite()),
            TensorData::F64(v) => v.iter().any(|x| !x.is_finite()),
            _ => false,
        });
        if non_finite {
            // JSON has no NaN or infinity: serialised as null, refused by name.
            let err = decoded.expect_err("null refused").to_string();
            prop_assert!(err.contains("(null) is not a valid FP"), "{}", err);
        } else {
            let decoded = decoded.expect("decodes");
            for ((data, _), got) in tensors.iter().zip(&decoded.inputs) {
                prop_assert!(same(data, &got.data), "{:?} != {:?}", data, got.data);
            }
            let all_binary = request(serde_json::json!({"inputs": [], "parameters": {"binary_data_output": true}}));
            let e = encode_response("m", "1", &all_binary, &decoded.inputs).expect("encodes");
            let mut want = Vec::new();
            for t in &decoded.inputs {
                to_bytes(&t.data, &mut want);
            }
            prop_assert_eq!(&e.body[e.header_len.expect("binary")..], &want[..]);
        }
    }

    /// Arbitrary bytes and header lengths are refused or read, never a panic.
    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..300), split in any::<Option<u16>>()) {
        let _ = decode_request(&body, split.map(usize::from));
    }

    /// A valid request cut short or with one byte changed is refused or read,
    /// never a panic.
    #[test]
    fn damaged_requests_never_panic(cut in 0usize..400, at in 0usize..400, byte in any::<u8>()) {
        let json = serde_json::json!({"inputs": [
            {"name": "image", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
            {"name": "ids", "shape": [2], "datatype": "INT64", "data": [[3], [4]]},
        ], "outputs": [{"name": "y", "parameters": {"binary_data": true}}]});
        let (mut body, n) = with_binary(&json, &[0, 0, 128, 63, 0, 0, 0, 64]);
        if at < body.len() {
            body[at] = byte;
        }
        body.truncate(cut.max(1));
        let _ = decode_request(&body, Some(n.min(body.len())));
        let _ = decode_request(&body, None);
    }
}

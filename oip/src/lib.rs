//! Open Inference Protocol v2 (KServe / Triton) tensors: request inputs in,
//! response outputs out, as JSON and with the binary tensor data extension
//! (`Inference-Header-Content-Length`: the JSON header, then the tensors' raw
//! little-endian bytes). Used by the local API and `edgefleet-agent infer`.
//!
//! Pure: bytes in, tensors or bytes out. Every error names the input or output
//! and what is wrong with it.

use edgefleet_shared::golden::{Tensor, TensorData};
use edgefleet_shared::manifest::ElementType;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Largest request body accepted (16 MiB).
pub const MAX_REQUEST_LEN: usize = 16 * 1024 * 1024;

/// The header that splits a body into its JSON header and binary tensor data.
pub const HEADER_LEN_HEADER: &str = "inference-header-content-length";

/// An inference request's JSON part.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InferRequest {
    /// Request id, echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// Request parameters (only `binary_data_output` is read).
    #[serde(default)]
    pub parameters: Option<RequestParameters>,
    /// Inputs.
    pub inputs: Vec<RequestInput>,
    /// The outputs to return, in this order; all of them when absent.
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// Request-level parameters the agent reads; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RequestParameters {
    /// Every output as binary data unless the output says otherwise.
    #[serde(default)]
    pub binary_data_output: Option<bool>,
}

/// One input tensor of a request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RequestInput {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// `FP32`, `INT64`, ...
    pub datatype: String,
    /// Input parameters (only `binary_data_size` is read).
    #[serde(default)]
    pub parameters: Option<InputParameters>,
    /// The elements in row-major order, flat or nested; absent when the input
    /// comes as binary data.
    #[serde(default)]
    pub data: Option<Elements>,
}

/// Input parameters the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct InputParameters {
    /// The input's bytes follow the JSON header (binary extension).
    #[serde(default)]
    pub binary_data_size: Option<u64>,
}

/// One requested output.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RequestOutput {
    /// Output name.
    pub name: String,
    /// Output parameters (only `binary_data` is read).
    #[serde(default)]
    pub parameters: Option<OutputParameters>,
}

/// Requested-output parameters the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct OutputParameters {
    /// This output as binary data (overrides `binary_data_output`).
    #[serde(default)]
    pub binary_data: Option<bool>,
}

/// One JSON element of a tensor's `data`, before the datatype is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A JSON string: its index in [`Elements::1`] (kept apart so a scalar stays
    /// 16 bytes).
    Text(u32),
    /// Anything else: what it is, for the error.
    Other(NotANumber),
}

/// What a non-scalar element was (one byte, so a [`Scalar`] takes 16 bytes:
/// a request's elements are held in this form while it is decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotANumber {
    /// `null` (how JSON writers put NaN and infinities).
    Null,
    /// A JSON object.
    Object,
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Int(v) => write!(f, "{v}"),
            Scalar::UInt(v) => write!(f, "{v}"),
            Scalar::Float(v) => write!(f, "{v}"),
            Scalar::Bool(v) => write!(f, "{v}"),
            Scalar::Text(_) => f.write_str("a string"),
            Scalar::Other(NotANumber::Null) => f.write_str("null"),
            Scalar::Other(NotANumber::Object) => f.write_str("an object"),
        }
    }
}

/// A tensor's `data` flattened in row-major order: nested arrays (`[[1, 2],
/// [3, 4]]`) read as the flat `[1, 2, 3, 4]`. Decoded straight into scalars,
/// without a JSON value per element.
/// Strings (`BYTES` elements) are kept in the second vector, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Elements(pub Vec<Scalar>, pub Vec<String>);

impl<'de> Deserialize<'de> for Elements {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Elements::default();
        d.deserialize_seq(Flatten {
            out: &mut out,
            depth: 0,
        })?;
        Ok(out)
    }
}

/// Deepest nesting of `data` arrays accepted (a tensor of rank 32).
const MAX_DATA_DEPTH: usize = 32;

struct Flatten<'a> {
    out: &'a mut Elements,
    depth: usize,
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of tensor elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DATA_DEPTH {
            return Err(de::Error::custom(format!(
                "`data` is nested deeper than {MAX_DATA_DEPTH} arrays"
            )));
        }
        while seq
            .next_element_seed(Element {
                out: &mut *self.out,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// One element of a `data` array: a scalar, or a nested array flattened in.
struct Element<'a> {
    out: &'a mut Elements,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Element<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a tensor element")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.out.0.push(Scalar::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.out.0.push(match u64::try_from(v) {
            Ok(u) => Scalar::UInt(u),
            Err(_) => Scalar::Int(v),
        });
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.out.0.push(Scalar::UInt(v));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.out.0.push(Scalar::Float(v));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        // Fewer elements than bytes in the body, so the index fits.
        let index = u32::try_from(self.out.1.len()).unwrap_or(u32::MAX);
        self.out.1.push(v.to_owned());
        self.out.0.push(Scalar::Text(index));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.0.push(Scalar::Other(NotANumber::Null));
        Ok(())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        self.out.0.push(Scalar::Other(NotANumber::Object));
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        Flatten {
            out: self.out,
            depth: self.depth,
        }
        .visit_seq(seq)
    }
}

fn dtype_of(name: &str) -> Option<ElementType> {
    Some(match name {
        "FP32" => ElementType::F32,
        "FP64" => ElementType::F64,
        "INT8" => ElementType::I8,
        "INT32" => ElementType::I32,
        "INT64" => ElementType::I64,
        "UINT8" => ElementType::U8,
        "BOOL" => ElementType::Bool,
        "BYTES" => ElementType::String,
        _ => return None,
    })
}

/// Bytes per element in the binary form (`BYTES`: a 4-byte length, then text).
fn width(dtype: ElementType) -> usize {
    match dtype {
        ElementType::F32 | ElementType::I32 | ElementType::String => 4,
        ElementType::F64 | ElementType::I64 => 8,
        ElementType::I8 | ElementType::U8 | ElementType::Bool => 1,
    }
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The JSON part is not an inference request.
    #[error("the body is not an OIP v2 inference request: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON is a request, but an input, its data or the binary part is wrong.
    #[error("{0}")]
    Invalid(String),
    /// An output asked for as JSON holds NaN or an infinity, which JSON has no
    /// number for (it is not sent as `null`: that would read as a value).
    #[error(
        "output `{output}` holds NaN or an infinity, which JSON cannot carry: ask for it as binary data (`\"parameters\": {{\"binary_data\": true}}` on the output)"
    )]
    NotFinite {
        /// The output.
        output: String,
    },
}

/// A decoded request: its JSON part and its inputs as tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The JSON part (id, parameters, requested outputs); inputs' `data` taken.
    pub request: InferRequest,
    /// The inputs, in the request's order.
    pub inputs: Vec<Tensor>,
}

/// Reads a request body: all JSON (`header_len` `None`), or a JSON header of
/// `header_len` bytes followed by the binary data of the inputs that carry a
/// `binary_data_size` parameter, in their order, with no byte left over.
pub fn decode_request(body: &[u8], header_len: Option<usize>) -> Result<Decoded, RequestError> {
    let invalid = |m: String| RequestError::Invalid(m);
    let (json, mut binary) = match header_len {
        None => (body, &[][..]),
        Some(n) if n > body.len() => {
            return Err(invalid(format!(
                "Inference-Header-Content-Length is {n} but the body has {} bytes",
                body.len()
            )));
        }
        Some(n) => body.split_at(n),
    };
    let mut request: InferRequest = serde_json::from_slice(json)?;
    for (i, input) in request.inputs.iter().enumerate() {
        if request.inputs[..i].iter().any(|o| o.name == input.name) {
            return Err(invalid(format!(
                "input `{}` is given more than once",
                input.name
            )));
        }
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &mut request.inputs {
        let name = &input.name;
        let dtype = dtype_of(&input.datatype).ok_or_else(|| {
            invalid(format!(
                "input `{name}`: datatype {:?} is not supported (FP32, FP64, INT8, INT32, INT64, UINT8, BOOL, BYTES)",
                input.datatype
            ))
        })?;
        let size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
        let data = match (input.data.take(), size) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "input `{name}` has both `data` and a `binary_data_size` parameter"
                )));
            }
            (None, None) => {
                return Err(invalid(format!(
                    "input `{name}` has no `data` (nor a `binary_data_size` parameter)"
                )));
            }
            (Some(elements), None) => from_elements(name, &input.datatype, dtype, elements)?,
            (None, Some(size)) => {
                if header_len.is_none() {
                    return Err(invalid(format!(
                        "input `{name}` has a `binary_data_size` parameter but the request has no Inference-Header-Content-Length header"
                    )));
                }
                let size = usize::try_from(size)
                    .ok()
                    .filter(|s| *s <= binary.len())
                    .ok_or_else(|| {
                        invalid(format!(
                            "input `{name}`: binary_data_size {size} goes past the end of the body ({} bytes of binary data left)",
                            binary.len()
                        ))
                    })?;
                let (bytes, rest) = binary.split_at(size);
                binary = rest;
                from_bytes(name, &input.datatype, dtype, bytes)?
            }
        };
        inputs.push(Tensor {
            name: input.name.clone(),
            shape: input.shape.clone(),
            data,
        });
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "the body has {} bytes of binary data beyond the inputs' binary_data_size",
            binary.len()
        )));
    }
    Ok(Decoded { request, inputs })
}

/// The JSON elements as `dtype`, naming the first one that is not one.
fn from_elements(
    name: &str,
    datatype: &str,
    dtype: ElementType,
    Elements(elements, mut strings): Elements,
) -> Result<TensorData, RequestError> {
    let elements = elements.as_slice();
    let bad = |i: usize, v: &Scalar| {
        RequestError::Invalid(format!(
            "input `{name}`: element {i} ({v}) is not a valid {datatype}"
        ))
    };
    fn all<T>(
        elements: &[Scalar],
        mut convert: impl FnMut(&Scalar) -> Option<T>,
        bad: impl Fn(usize, &Scalar) -> RequestError,
    ) -> Result<Vec<T>, RequestError> {
        // Allocated once at its size (collecting Results would grow it by
        // doubling, a transient copy of the whole tensor).
        let mut out = Vec::with_capacity(elements.len());
        for (i, v) in elements.iter().enumerate() {
            out.push(convert(v).ok_or_else(|| bad(i, v))?);
        }
        Ok(out)
    }
    fn float(v: &Scalar) -> Option<f64> {
        match *v {
            Scalar::Int(x) => Some(x as f64),
            Scalar::UInt(x) => Some(x as f64),
            Scalar::Float(x) => Some(x),
            Scalar::Bool(_) | Scalar::Text(_) | Scalar::Other(_) => None,
        }
    }
    fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &Scalar) -> Option<T> {
        match *v {
            Scalar::Int(x) => T::try_from(x).ok(),
            Scalar::UInt(x) => T::try_from(x).ok(),
            Scalar::Float(_) | Scalar::Bool(_) | Scalar::Text(_) | Scalar::Other(_) => None,
        }
    }
    Ok(match dtype {
        // JSON has no infinity or NaN: a non-finite f32 is a number past its range
        // (1e39), which a cast would quietly make infinite.
        ElementType::F32 => TensorData::F32(all(
            elements,
            |v| float(v).map(|x| x as f32).filter(|x| x.is_finite()),
            bad,
        )?),
        ElementType::F64 => TensorData::F64(all(elements, float, bad)?),
        ElementType::I8 => TensorData::I8(all(elements, int, bad)?),
        ElementType::I32 => TensorData::I32(all(elements, int, bad)?),
        ElementType::I64 => TensorData::I64(all(elements, int, bad)?),
        ElementType::U8 => TensorData::U8(all(elements, int, bad)?),
        ElementType::Bool => TensorData::Bool(all(
            elements,
            |v| match *v {
                Scalar::Bool(b) => Some(b),
                _ => None,
            },
            bad,
        )?),
        ElementType::String => TensorData::String(all(
            elements,
            |v| match *v {
                Scalar::Text(i) => strings.get_mut(i as usize).map(std::mem::take),
                _ => None,
            },
            bad,
        )?),
    })
}

/// Binary data (little-endian, row-major, booleans one byte 0 or 1) as `dtype`.
fn from_bytes(
    name: &str,
    datatype: &str,
    dtype: ElementType,
    bytes: &[u8],
) -> Result<TensorData, RequestError> {
    let w = width(dtype);
    if dtype != ElementType::String && !bytes.len().is_multiple_of(w) {
        return Err(RequestError::Invalid(format!(
            "input `{name}`: binary_data_size {} is not a whole number of {datatype} elements ({w} bytes each)",
            bytes.len()
        )));
    }
    fn le<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks of N bytes")))
            .collect()
    }
    Ok(match dtype {
        ElementType::F32 => TensorData::F32(le(bytes, f32::from_le_bytes)),
        ElementType::F64 => TensorData::F64(le(bytes, f64::from_le_bytes)),
        ElementType::I8 => TensorData::I8(le(bytes, i8::from_le_bytes)),
        ElementType::I32 => TensorData::I32(le(bytes, i32::from_le_bytes)),
        ElementType::I64 => TensorData::I64(le(bytes, i64::from_le_bytes)),
        ElementType::U8 => TensorData::U8(bytes.to_vec()),
        ElementType::String => TensorData::String(strings_from_bytes(name, bytes)?),
        ElementType::Bool => TensorData::Bool(
            bytes
                .iter()
                .enumerate()
                .map(|(i, b)| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    _ => Err(RequestError::Invalid(format!(
                        "input `{name}`: byte {i} ({b}) is not a valid BOOL (0 or 1)"
                    ))),
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// `BYTES` in binary: each element a 4-byte little-endian length, then its bytes
/// (which must be UTF-8 here: labels and categories are text).
fn strings_from_bytes(name: &str, mut bytes: &[u8]) -> Result<Vec<String>, RequestError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let bad = |what: String| {
            RequestError::Invalid(format!(
                "input `{name}`: BYTES element {}: {what}",
                out.len()
            ))
        };
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| bad(format!("{} bytes left, not a 4-byte length", bytes.len())))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(bad(format!(
                "length {len} goes past the end of its data ({} bytes left)",
                rest.len()
            )));
        }
        let (text, rest) = rest.split_at(len);
        let text = std::str::from_utf8(text).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
        out.push(text.to_owned());
        bytes = rest;
    }
    Ok(out)
}

/// The little-endian bytes of `data` (booleans one byte each; strings each
/// after its 4-byte length).
fn to_bytes(data: &TensorData, out: &mut Vec<u8>) {
    fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N], out: &mut Vec<u8>) {
        out.reserve(v.len() * N);
        for x in v {
            out.extend_from_slice(&f(*x));
        }
    }
    match data {
        TensorData::F32(v) => le(v, f32::to_le_bytes, out),
        TensorData::F64(v) => le(v, f64::to_le_bytes, out),
        TensorData::I8(v) => le(v, i8::to_le_bytes, out),
        TensorData::I32(v) => le(v, i32::to_le_bytes, out),
        TensorData::I64(v) => le(v, i64::to_le_bytes, out),
        TensorData::U8(v) => out.extend_from_slice(v),
        TensorData::Bool(v) => out.extend(v.iter().map(|b| u8::from(*b))),
        TensorData::String(v) => {
            for s in v {
                let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
}

impl InferRequest {
    /// Whether the request asks for any output as binary data.
    pub fn wants_binary(&self) -> bool {
        self.parameters
            .as_ref()
            .and_then(|p| p.binary_data_output)
            .unwrap_or(false)
            || self.outputs.iter().flatten().any(|o| {
                o.parameters
                    .as_ref()
                    .and_then(|p| p.binary_data)
                    .unwrap_or(false)
            })
    }
}

fn unknown_output<'a>(name: &str, outputs: impl Iterator<Item = &'a str>) -> RequestError {
    RequestError::Invalid(format!(
        "requested output `{name}` is not an output of the model (outputs: {})",
        outputs
            .map(|o| format!("`{o}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

impl InferRequest {
    /// Checks that every requested output is one of `outputs` (the model's), so
    /// a request for an unknown one is refused before it runs.
    pub fn check_outputs<'a>(
        &self,
        outputs: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), RequestError> {
        for w in self.outputs.iter().flatten() {
            if !outputs.clone().any(|o| o == w.name) {
                return Err(unknown_output(&w.name, outputs));
            }
        }
        Ok(())
    }
}

/// A response body ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The body: JSON, followed by the binary outputs' bytes if any.
    pub body: Vec<u8>,
    /// The JSON part's length when binary data follows it (the value of
    /// `Inference-Header-Content-Length`), `None` for an all-JSON body.
    pub header_len: Option<usize>,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<ResponseOutput<'a>>,
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// Serialises elements straight from the tensor (no JSON value per element).
struct Data<'a>(&'a TensorData);

impl Serialize for Data<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            TensorData::F32(v) => v.serialize(s),
            TensorData::F64(v) => v.serialize(s),
            TensorData::I8(v) => v.serialize(s),
            TensorData::I32(v) => v.serialize(s),
            TensorData::I64(v) => v.serialize(s),
            TensorData::U8(v) => s.collect_seq(v),
            TensorData::Bool(v) => v.serialize(s),
            TensorData::String(v) => v.serialize(s),
        }
    }
}
/// The outputs the response carries, each with whether it goes in binary:
/// all of them, or those the request names (unknown names refused), in the
/// request's order.
fn chosen_outputs<'a>(
    request: &InferRequest,
    outputs: &'a [Tensor],
) -> Result<Vec<(&'a Tensor, bool)>, RequestError> {
    let all_binary = request
        .parameters
        .as_ref()
        .and_then(|p| p.binary_data_output)
        .unwrap_or(false);
    let chosen = match &request.outputs {
        None => outputs.iter().map(|t| (t, all_binary)).collect(),
        Some(wanted) => wanted
            .iter()
            .map(|w| {
                let t = outputs.iter().find(|t| t.name == w.name).ok_or_else(|| {
                    unknown_output(&w.name, outputs.iter().map(|t| t.name.as_str()))
                })?;
                let binary = w
                    .parameters
                    .as_ref()
                    .and_then(|p| p.binary_data)
                    .unwrap_or(all_binary);
                Ok((t, binary))
            })
            .collect::<Result<_, RequestError>>()?,
    };
    Ok(chosen)
}

/// Writes the response to `request`: the outputs it names (all when it names
/// none), each as JSON or as binary data as it asks.
pub fn encode_response(
    model_name: &str,
    model_version: &str,
    request: &InferRequest,
    outputs: &[Tensor],
) -> Result<Encoded, RequestError> {
    let chosen = chosen_outputs(request, outputs)?;
    for (t, as_binary) in &chosen {
        let finite = match &t.data {
            TensorData::F32(v) => v.iter().all(|x| x.is_finite()),
            TensorData::F64(v) => v.iter().all(|x| x.is_finite()),
            _ => true,
        };
        if !as_binary && !finite {
            return Err(RequestError::NotFinite {
                output: t.name.clone(),
            });
        }
    }
    let mut binary = Vec::new();
    let json = ResponseJson {
        model_name,
        model_version,
        id: request.id.as_deref(),
        outputs: chosen
            .iter()
            .map(|(t, as_binary)| {
                let (parameters, data) = if *as_binary {
                    let before = binary.len();
                    to_bytes(&t.data, &mut binary);
                    (
                        Some(BinarySize {
                            binary_data_size: binary.len() - before,
                        }),
                        None,
                    )
                } else {
                    (None, Some(Data(&t.data)))
                };
                ResponseOutput {
                    name: &t.name,
                    datatype: t.data.dtype().oip_name(),
                    shape: &t.shape,
                    parameters,
                    data,
                }
            })
            .collect(),
    };
    let mut body = serde_json::to_vec(&json).map_err(RequestError::Json)?;
    if !chosen.iter().any(|(_, as_binary)| *as_binary) {
        return Ok(Encoded {
            body,
            header_len: None,
        });
    }
    let header_len = body.len();
    body.extend_from_slice(&binary);
    Ok(Encoded {
        body,
        header_len: Some(header_len),
    })
}

const _: () = assert!(std::mem::size_of::<Scalar>() == 16);

#[cfg(test)]
mod tests;

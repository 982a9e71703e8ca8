//! Open Inference Protocol v2 (KServe / Triton) JSON tensors: request inputs in,
//! response outputs out. Used by `edgefleet-agent infer` and, later, the local API.

use edgefleet_shared::golden::{Tensor, TensorData};
use edgefleet_shared::manifest::ElementType;
use serde::{Deserialize, Serialize};

/// Largest request body accepted (16 MiB).
pub const MAX_REQUEST_LEN: usize = 16 * 1024 * 1024;

/// One tensor in OIP v2 JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OipTensor {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// `FP32`, `INT64`, ...
    pub datatype: String,
    /// Row-major elements.
    pub data: Vec<serde_json::Value>,
}

/// An inference request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    /// Inputs.
    pub inputs: Vec<OipTensor>,
}

/// An inference response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    /// Model (channel) name.
    pub model_name: String,
    /// Bundle version.
    pub model_version: String,
    /// Outputs.
    pub outputs: Vec<OipTensor>,
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
        _ => return None,
    })
}

/// Converts a request tensor, naming the input and the element at fault.
pub fn to_tensor(t: &OipTensor) -> Result<Tensor, String> {
    let dtype = dtype_of(&t.datatype).ok_or_else(|| {
        format!(
            "input `{}`: datatype {:?} is not supported",
            t.name, t.datatype
        )
    })?;
    let bad = |i: usize, v: &serde_json::Value| {
        format!(
            "input `{}`: element {i} ({v}) is not a valid {}",
            t.name, t.datatype
        )
    };
    macro_rules! ints {
        ($ty:ty, $variant:ident) => {
            TensorData::$variant(
                t.data
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_i64()
                            .and_then(|x| <$ty>::try_from(x).ok())
                            .ok_or_else(|| bad(i, v))
                    })
                    .collect::<Result<_, _>>()?,
            )
        };
    }
    let data = match dtype {
        ElementType::F32 => TensorData::F32(
            t.data
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_f64().map(|x| x as f32).ok_or_else(|| bad(i, v)))
                .collect::<Result<_, _>>()?,
        ),
        ElementType::F64 => TensorData::F64(
            t.data
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_f64().ok_or_else(|| bad(i, v)))
                .collect::<Result<_, _>>()?,
        ),
        ElementType::I8 => ints!(i8, I8),
        ElementType::I32 => ints!(i32, I32),
        ElementType::I64 => ints!(i64, I64),
        ElementType::U8 => ints!(u8, U8),
        ElementType::Bool => TensorData::Bool(
            t.data
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_bool().ok_or_else(|| bad(i, v)))
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(Tensor {
        name: t.name.clone(),
        shape: t.shape.clone(),
        data,
    })
}

/// Converts a model output for the response.
pub fn from_tensor(t: &Tensor) -> OipTensor {
    let data: Vec<serde_json::Value> = match &t.data {
        TensorData::I8(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        TensorData::I32(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        TensorData::I64(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        TensorData::U8(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        TensorData::Bool(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        TensorData::F32(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
        TensorData::F64(v) => v.iter().map(|x| serde_json::json!(x)).collect(),
    };
    OipTensor {
        name: t.name.clone(),
        shape: t.shape.clone(),
        datatype: t.data.dtype().oip_name().into(),
        data,
    }
}

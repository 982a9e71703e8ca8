//! Tensors as the contract carries them, and the golden cases artifact that the
//! agent runs before activating a model (see `docs/bundle.md`, "Golden cases").

use serde::{Deserialize, Serialize};

use crate::cbor::{self, DecodeError};
use crate::manifest::{Dim, ElementType, HealthPolicy, TensorSpec};

/// Largest golden artifact accepted (16 MiB).
pub const MAX_GOLDEN_LEN: usize = 16 * 1024 * 1024;
/// Most golden cases in one bundle.
pub const MAX_GOLDEN_CASES: usize = 256;

/// A tensor's elements, flat in row-major order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// Signed 8-bit integers.
    I8(Vec<i8>),
    /// Signed 32-bit integers.
    I32(Vec<i32>),
    /// Signed 64-bit integers.
    I64(Vec<i64>),
    /// Unsigned 8-bit integers.
    #[serde(with = "serde_bytes")]
    U8(Vec<u8>),
    /// Booleans.
    Bool(Vec<bool>),
    /// UTF-8 strings (class labels, categories).
    String(Vec<String>),
}

impl TensorData {
    /// Element type.
    pub fn dtype(&self) -> ElementType {
        match self {
            TensorData::F32(_) => ElementType::F32,
            TensorData::F64(_) => ElementType::F64,
            TensorData::I8(_) => ElementType::I8,
            TensorData::I32(_) => ElementType::I32,
            TensorData::I64(_) => ElementType::I64,
            TensorData::U8(_) => ElementType::U8,
            TensorData::Bool(_) => ElementType::Bool,
            TensorData::String(_) => ElementType::String,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
            TensorData::String(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements as f64, for comparisons within tolerance (strings: NaN; they are
    /// compared as text by [`within_tolerance`]).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::I8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::U8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::Bool(v) => v.iter().map(|x| f64::from(u8::from(*x))).collect(),
            TensorData::String(v) => vec![f64::NAN; v.len()],
        }
    }
}

/// A named tensor with a concrete shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tensor {
    /// Input or output name.
    pub name: String,
    /// Concrete shape.
    pub shape: Vec<u64>,
    /// Elements.
    pub data: TensorData,
}

/// Why a tensor does not fit a schema entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorMismatch {
    /// Wrong element type.
    #[error("`{name}` has element type {got}, the model expects {want}")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Given type.
        got: ElementType,
        /// Expected type.
        want: ElementType,
    },
    /// Wrong rank or a fixed dimension differs.
    #[error("`{name}` has shape {got:?}, the model expects {want}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Given shape.
        got: Vec<u64>,
        /// Expected shape, as text.
        want: String,
    },
    /// Element count differs from the product of the shape.
    #[error("`{name}` has {got} elements, its shape {shape:?} needs {want}")]
    Count {
        /// Tensor name.
        name: String,
        /// Given count.
        got: usize,
        /// Shape given.
        shape: Vec<u64>,
        /// Count implied by the shape.
        want: u64,
    },
}

impl Tensor {
    /// Number of elements the shape implies (saturating).
    pub fn shape_len(&self) -> u64 {
        self.shape.iter().fold(1u64, |a, d| a.saturating_mul(*d))
    }

    /// Checks element type, rank, fixed dimensions and element count against `spec`.
    /// Symbolic dimensions accept any size.
    pub fn check_against(&self, spec: &TensorSpec) -> Result<(), TensorMismatch> {
        if self.data.dtype() != spec.dtype {
            return Err(TensorMismatch::Dtype {
                name: self.name.clone(),
                got: self.data.dtype(),
                want: spec.dtype,
            });
        }
        let shape_ok = self.shape.len() == spec.shape.len()
            && self
                .shape
                .iter()
                .zip(&spec.shape)
                .all(|(got, want)| match want {
                    Dim::Fixed(n) => got == n,
                    Dim::Symbol(_) => true,
                });
        if !shape_ok {
            return Err(TensorMismatch::Shape {
                name: self.name.clone(),
                got: self.shape.clone(),
                want: spec.shape_text(),
            });
        }
        if self.shape_len() != self.data.len() as u64 {
            return Err(TensorMismatch::Count {
                name: self.name.clone(),
                got: self.data.len(),
                shape: self.shape.clone(),
                want: self.shape_len(),
            });
        }
        Ok(())
    }
}

/// One golden case: inputs, and the outputs the model must produce for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenCase {
    /// One tensor per model input.
    pub inputs: Vec<Tensor>,
    /// Expected outputs (all model outputs, or a subset by name).
    pub outputs: Vec<Tensor>,
}

/// The golden artifact (`golden.cbor`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenSet {
    /// The cases, run in order.
    pub cases: Vec<GoldenCase>,
}

impl GoldenSet {
    /// Decodes the artifact, capped at [`MAX_GOLDEN_LEN`].
    pub fn from_bytes(bytes: &[u8]) -> Result<GoldenSet, DecodeError> {
        let set: GoldenSet = cbor::from_slice("golden cases", bytes, MAX_GOLDEN_LEN)?;
        if set.cases.is_empty() || set.cases.len() > MAX_GOLDEN_CASES {
            return Err(DecodeError::Invalid {
                what: "golden cases",
                field: "cases",
                reason: format!("must hold 1 to {MAX_GOLDEN_CASES} cases"),
            });
        }
        Ok(set)
    }

    /// Encodes the artifact.
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }
}

/// The first element that is out of tolerance, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfTolerance {
    /// Flat element index.
    pub index: usize,
    /// Value produced, as text.
    pub got: String,
    /// Value expected, as text.
    pub want: String,
}

/// Compares two tensors elementwise: `|got - want| <= abs + rel * |want|`.
/// NaN matches only NaN; strings must be equal (and only strings match strings).
/// Shapes must be equal (checked by the caller).
pub fn within_tolerance(
    got: &TensorData,
    want: &TensorData,
    policy: &HealthPolicy,
) -> Result<(), OutOfTolerance> {
    match (got, want) {
        (TensorData::String(g), TensorData::String(w)) => return same_strings(g, w),
        (TensorData::String(_), _) | (_, TensorData::String(_)) => {
            return Err(OutOfTolerance {
                index: 0,
                got: got.dtype().to_string(),
                want: want.dtype().to_string(),
            });
        }
        _ => {}
    }
    let (g, w) = (got.to_f64(), want.to_f64());
    if g.len() != w.len() {
        return Err(OutOfTolerance {
            index: g.len().min(w.len()),
            got: format!("{} elements", g.len()),
            want: format!("{} elements", w.len()),
        });
    }
    for (index, (g, w)) in g.iter().zip(&w).enumerate() {
        let ok = if w.is_nan() || g.is_nan() {
            w.is_nan() && g.is_nan()
        } else {
            (g - w).abs() <= policy.abs_tolerance + policy.rel_tolerance * w.abs()
        };
        if !ok {
            return Err(OutOfTolerance {
                index,
                got: g.to_string(),
                want: w.to_string(),
            });
        }
    }
    Ok(())
}

fn same_strings(got: &[String], want: &[String]) -> Result<(), OutOfTolerance> {
    if got.len() != want.len() {
        return Err(OutOfTolerance {
            index: got.len().min(want.len()),
            got: format!("{} elements", got.len()),
            want: format!("{} elements", want.len()),
        });
    }
    match got.iter().zip(want).position(|(g, w)| g != w) {
        Some(index) => Err(OutOfTolerance {
            index,
            got: format!("{:?}", got[index]),
            want: format!("{:?}", want[index]),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_absolute_plus_relative() {
        let p = HealthPolicy {
            abs_tolerance: 0.01,
            rel_tolerance: 0.1,
            latency_budget_ms: 1,
        };
        let want = TensorData::F64(vec![10.0, 0.0]);
        assert!(within_tolerance(&TensorData::F64(vec![11.0, 0.01]), &want, &p).is_ok());
        let err = within_tolerance(&TensorData::F64(vec![11.02, 0.0]), &want, &p);
        assert_eq!(err.map_err(|e| e.index), Err(0));
        let err = within_tolerance(&TensorData::F64(vec![10.0, 0.02]), &want, &p);
        assert_eq!(err.map_err(|e| e.index), Err(1));
    }

    #[test]
    fn tensor_shape_checks_name_the_input_and_the_rule() {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: ElementType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(4)],
        };
        let t = |shape: Vec<u64>, data: TensorData| Tensor {
            name: "x".into(),
            shape,
            data,
        };
        assert!(
            t(vec![2, 4], TensorData::F32(vec![0.0; 8]))
                .check_against(&spec)
                .is_ok()
        );
        assert!(matches!(
            t(vec![2, 3], TensorData::F32(vec![0.0; 6])).check_against(&spec),
            Err(TensorMismatch::Shape { .. })
        ));
        assert!(matches!(
            t(vec![1, 4], TensorData::F64(vec![0.0; 4])).check_against(&spec),
            Err(TensorMismatch::Dtype { .. })
        ));
        assert!(matches!(
            t(vec![1, 4], TensorData::F32(vec![0.0; 3])).check_against(&spec),
            Err(TensorMismatch::Count { .. })
        ));
    }
}

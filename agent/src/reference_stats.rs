//! Reference statistics for a bundle, built by `edgefleet bundle build
//! --reference`: the distribution of each input column, and of each model
//! output by running the model over the rows. Build-time work; the device's
//! drift core ([`crate::drift`]) only reads what this writes.

use edgefleet_shared::golden::{Tensor, TensorData};
use edgefleet_shared::manifest::{Dim, ElementType, TensorSpec};
use edgefleet_shared::reference::{self, Distribution, FeatureStats, ReferenceStats};

use crate::model::{InferenceError, LoadedModel};

/// Rows per model run over the reference data.
const BATCH_ROWS: usize = 512;

/// Why reference data cannot be summarised for a model. The messages follow
/// the file's name in the operator's error.
#[derive(Debug, thiserror::Error)]
pub enum SummariseError {
    /// No rows, or a row of the wrong width.
    #[error("needs at least one row of {0} values (one per column)")]
    Rows(usize),
    /// A column named categorical that the data does not have.
    #[error("has no column `{column}` (named as categorical); its columns are {columns}")]
    NoColumn {
        /// The name given.
        column: String,
        /// The data's columns, comma separated.
        columns: String,
    },
    /// The model does not take one float input of the data's width.
    #[error(
        "has {columns} columns; --reference needs a model with one float input of shape [N, {columns}]: {model}"
    )]
    ModelInput {
        /// The data's column count.
        columns: usize,
        /// What the model takes instead.
        model: String,
    },
    /// A categorical value that is not an integer code.
    #[error("categorical column `{column}` holds {value}, not an integer code")]
    NotCode {
        /// The column.
        column: String,
        /// The value.
        value: f64,
    },
    /// More categories than a reference may hold.
    #[error("categorical column `{0}` has more than {max} categories", max = reference::MAX_CATEGORIES)]
    TooManyCategories(String),
    /// A numeric column with nothing to bin.
    #[error("column `{0}` has no finite values")]
    NoFiniteValues(String),
    /// The model fails on the data.
    #[error("the model fails on the reference data: {0}")]
    Model(#[from] InferenceError),
}

/// Reference statistics of `rows` (one value per column of `headers`) for a
/// model with one float input `[N, columns]`: quantile bins per input column
/// (category shares for the columns named in `categorical`), and for the
/// outputs, by running the model over the rows, category shares (integer
/// outputs) or quantile bins (per column of float outputs, named `out[k]`).
pub fn summarise(
    model: &LoadedModel,
    headers: &[String],
    rows: &[Vec<f64>],
    categorical: &[String],
) -> Result<ReferenceStats, SummariseError> {
    if rows.is_empty() || rows.iter().any(|r| r.len() != headers.len()) {
        return Err(SummariseError::Rows(headers.len()));
    }
    if let Some(c) = categorical.iter().find(|c| !headers.contains(c)) {
        return Err(SummariseError::NoColumn {
            column: c.clone(),
            columns: headers.join(", "),
        });
    }
    let input = the_input(model.schema().inputs.as_slice(), headers.len())?;
    let mut features = Vec::with_capacity(headers.len());
    for (j, name) in headers.iter().enumerate() {
        let column: Vec<f64> = rows.iter().map(|r| r[j]).collect();
        features.push(FeatureStats {
            name: name.clone(),
            distribution: column_stats(name, &column, categorical.contains(name))?,
        });
    }
    Ok(ReferenceStats {
        rows: rows.len() as u64,
        features,
        outputs: output_stats(model, input, rows)?,
        thresholds: None,
    })
}

/// The model's one float input `[N, columns]`, or what it takes instead.
fn the_input(inputs: &[TensorSpec], columns: usize) -> Result<&TensorSpec, SummariseError> {
    if let [spec] = inputs
        && spec.shape.len() == 2
        && matches!(spec.dtype, ElementType::F32 | ElementType::F64)
        && match &spec.shape[1] {
            Dim::Fixed(n) => *n as usize == columns,
            Dim::Symbol(_) => true,
        }
    {
        return Ok(spec);
    }
    let model = match inputs {
        [] => "this model has no input".to_owned(),
        [spec] => format!(
            "this model's one input `{}` is {} {}",
            spec.name,
            spec.dtype,
            spec.shape_text()
        ),
        [spec, ..] => format!(
            "this model's first input of several, `{}` is {} {}",
            spec.name,
            spec.dtype,
            spec.shape_text()
        ),
    };
    Err(SummariseError::ModelInput { columns, model })
}

/// One input column's distribution: category shares of integer codes, or
/// quantile bins.
fn column_stats(
    name: &str,
    column: &[f64],
    categorical: bool,
) -> Result<Distribution, SummariseError> {
    if !categorical {
        return reference::numeric(column, reference::DEFAULT_BINS)
            .map(Distribution::Numeric)
            .ok_or_else(|| SummariseError::NoFiniteValues(name.to_owned()));
    }
    let codes = column
        .iter()
        .map(|&value| {
            (value.fract() == 0.0 && value.abs() < 9.0e15)
                .then_some(value as i64)
                .ok_or_else(|| SummariseError::NotCode {
                    column: name.to_owned(),
                    value,
                })
        })
        .collect::<Result<Vec<i64>, _>>()?;
    reference::categorical(&codes)
        .map(Distribution::Categorical)
        .ok_or_else(|| SummariseError::TooManyCategories(name.to_owned()))
}

/// Values of one model output over all rows: floats, or integer codes, and
/// the elements per row.
#[derive(Debug)]
struct OutputValues {
    floats: Vec<f64>,
    ints: Vec<i64>,
    width: u64,
    /// False when an output's shape is not `[N]` or `[N, width]`.
    usable: bool,
}

/// The outputs' distributions, running the model over the rows
/// [`BATCH_ROWS`] at a time. Outputs of another shape than `[N]` or
/// `[N, width]` are left out.
fn output_stats(
    model: &LoadedModel,
    input: &TensorSpec,
    rows: &[Vec<f64>],
) -> Result<Vec<FeatureStats>, SummariseError> {
    let schema = model.schema();
    let mut values: Vec<OutputValues> = schema
        .outputs
        .iter()
        .map(|_| OutputValues {
            floats: vec![],
            ints: vec![],
            width: 1,
            usable: true,
        })
        .collect();
    let columns = rows[0].len() as u64;
    for batch in rows.chunks(BATCH_ROWS) {
        let flat: Vec<f64> = batch.concat();
        let data = match input.dtype {
            ElementType::F64 => TensorData::F64(flat),
            _ => TensorData::F32(flat.iter().map(|v| *v as f32).collect()),
        };
        let tensor = Tensor {
            name: input.name.clone(),
            shape: vec![batch.len() as u64, columns],
            data,
        };
        for (out, v) in model.run(&[tensor])?.iter().zip(&mut values) {
            v.width = match out.shape.as_slice() {
                [n] if *n as usize == batch.len() => 1,
                [n, w] if *n as usize == batch.len() => *w,
                _ => {
                    v.usable = false;
                    continue;
                }
            };
            match &out.data {
                TensorData::I64(x) => v.ints.extend(x),
                TensorData::I32(x) => v.ints.extend(x.iter().map(|x| i64::from(*x))),
                // Text labels have no reference statistics (yet): the label's
                // drift is watched through the probabilities beside it.
                TensorData::String(_) => v.usable = false,
                other => v.floats.extend(other.to_f64()),
            }
        }
    }
    let mut outputs = Vec::new();
    for (spec, v) in schema.outputs.iter().zip(values) {
        if !v.usable {
            continue;
        }
        let width = v.width as usize;
        for col in 0..width {
            let name = if width == 1 {
                spec.name.clone()
            } else {
                format!("{}[{col}]", spec.name)
            };
            let distribution = if v.ints.is_empty() {
                let column: Vec<f64> = v.floats.iter().skip(col).step_by(width).copied().collect();
                reference::numeric(&column, reference::DEFAULT_BINS).map(Distribution::Numeric)
            } else {
                let column: Vec<i64> = v.ints.iter().skip(col).step_by(width).copied().collect();
                reference::categorical(&column).map(Distribution::Categorical)
            };
            if let Some(distribution) = distribution {
                outputs.push(FeatureStats { name, distribution });
            }
        }
    }
    Ok(outputs)
}

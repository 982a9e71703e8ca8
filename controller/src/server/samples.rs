//! Exports of captured samples for labelling and retraining: one table row per
//! input row, pure functions from stored samples to CSV or NPY bytes.
//!
//! Layout: the first input tensor is `[rows, width]` (or one row `[width]`); its
//! columns become `input[0]`.. (named after the tensor). Each output `[rows]`
//! becomes one column, `[rows, k]` becomes k columns `out[0]`... The layout is
//! taken from the first sample; samples of another layout (another model) are
//! skipped and counted: export one bundle at a time (`bundle=`).

use edgefleet_shared::golden::Tensor;
use edgefleet_shared::{DeviceId, Digest};

use crate::server::db::SampleRow;

/// The rows of an export.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// Column names after `device,bundle,at,reason`, inputs then outputs.
    pub columns: Vec<String>,
    /// How many of `columns` are inputs.
    pub inputs: usize,
    /// (device, bundle, at, reason, values) per row.
    pub rows: Vec<(DeviceId, Digest, i64, String, Vec<f64>)>,
    /// Samples skipped: another layout, or unreadable.
    pub skipped: usize,
}

/// Rows of one sample: `(input columns, output columns, values per row)`.
fn sample_rows(body: &serde_json::Value) -> Option<(Vec<String>, usize, Vec<Vec<f64>>)> {
    let inputs: Vec<Tensor> = serde_json::from_value(body.get("inputs")?.clone()).ok()?;
    let outputs: Vec<Tensor> = serde_json::from_value(body.get("outputs")?.clone()).ok()?;
    let x = inputs.first()?;
    let (n, width) = match x.shape.as_slice() {
        [n, w] => (*n as usize, *w as usize),
        [w] => (1, *w as usize),
        _ => return None,
    };
    let xs = x.data.to_f64();
    if xs.len() != n * width {
        return None;
    }
    let mut columns: Vec<String> = (0..width).map(|j| format!("{}[{j}]", x.name)).collect();
    let mut per_output = Vec::new();
    for o in &outputs {
        let k = match o.shape.as_slice() {
            [m] if *m as usize == n => 1,
            [m, k] if *m as usize == n => *k as usize,
            _ => continue,
        };
        if k == 1 {
            columns.push(o.name.clone());
        } else {
            columns.extend((0..k).map(|j| format!("{}[{j}]", o.name)));
        }
        per_output.push((k, o.data.to_f64()));
    }
    let rows = (0..n)
        .map(|r| {
            let mut v = xs[r * width..(r + 1) * width].to_vec();
            for (k, data) in &per_output {
                v.extend_from_slice(&data[r * k..(r + 1) * k]);
            }
            v
        })
        .collect();
    Some((columns, width, rows))
}

/// Flattens stored samples into one table (see the module docs).
pub fn table(samples: &[SampleRow]) -> Table {
    let mut t = Table::default();
    for s in samples {
        let Some((columns, width, rows)) = sample_rows(&s.body) else {
            t.skipped += 1;
            continue;
        };
        if t.columns.is_empty() && t.rows.is_empty() {
            t.columns = columns.clone();
            t.inputs = width;
        }
        if columns != t.columns {
            t.skipped += 1;
            continue;
        }
        for v in rows {
            t.rows
                .push((s.device.clone(), s.digest, s.at, s.reason.clone(), v));
        }
    }
    t
}

/// CSV with a header row: `device,bundle,at,reason,` then the columns.
pub fn to_csv(t: &Table) -> String {
    // The csv crate quotes what needs it: column names come from devices'
    // tensor names and may hold commas, quotes or line breaks.
    let mut w = csv::Writer::from_writer(Vec::new());
    let header = ["device", "bundle", "at", "reason"]
        .into_iter()
        .map(str::to_owned)
        .chain(t.columns.iter().cloned());
    let write = || -> csv::Result<()> {
        w.write_record(header)?;
        for (device, bundle, at, reason, values) in &t.rows {
            let fixed = [
                device.to_string(),
                bundle.to_hex(),
                at.to_string(),
                reason.clone(),
            ];
            w.write_record(fixed.into_iter().chain(values.iter().map(f64::to_string)))?;
        }
        w.flush()?;
        Ok(())
    };
    // Writing to memory cannot fail; a field is never refused by the writer.
    let _ = write();
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// NPY of the input columns: float64, shape `(rows, inputs)`, as `numpy.load`
/// reads it.
pub fn inputs_to_npy(t: &Table) -> Vec<u8> {
    let rows: Vec<&[f64]> = t.rows.iter().map(|r| &r.4[..t.inputs]).collect();
    crate::server::npy::write_f64(&rows, t.inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(device: &str, x: Vec<f32>, rows: u64, labels: Vec<i64>) -> SampleRow {
        let width = x.len() as u64 / rows;
        let probs: Vec<f32> = labels.iter().flat_map(|_| [0.25, 0.75]).collect();
        SampleRow {
            device: DeviceId::new(device).expect("a valid device id"),
            digest: Digest::of(b"ab"),
            at: 7,
            reason: "drift".into(),
            body: json!({
                "inputs": [Tensor { name: "features".into(), shape: vec![rows, width], data: edgefleet_shared::golden::TensorData::F32(x) }],
                "outputs": [
                    Tensor { name: "label".into(), shape: vec![rows], data: edgefleet_shared::golden::TensorData::I64(labels) },
                    Tensor { name: "probabilities".into(), shape: vec![rows, 2], data: edgefleet_shared::golden::TensorData::F32(probs) },
                ],
            }),
        }
    }

    #[test]
    fn samples_flatten_to_one_row_per_input_row_and_other_layouts_are_skipped() {
        let t = table(&[
            sample("d1", vec![1.0, 2.0, 3.0, 4.0], 2, vec![0, 1]),
            sample("d2", vec![5.0, 6.0], 1, vec![1]),
            sample("d3", vec![1.0, 2.0, 3.0], 1, vec![1]),
            SampleRow {
                body: json!({"inputs": "garbage"}),
                ..sample("d4", vec![1.0, 2.0], 1, vec![0])
            },
        ]);
        assert_eq!(
            t.columns,
            [
                "features[0]",
                "features[1]",
                "label",
                "probabilities[0]",
                "probabilities[1]"
            ]
        );
        assert_eq!((t.inputs, t.rows.len(), t.skipped), (2, 3, 2));
        let csv = to_csv(&t);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "device,bundle,at,reason,features[0],features[1],label,probabilities[0],probabilities[1]"
        );
        let ab = Digest::of(b"ab");
        assert_eq!(lines[2], format!("d1,{ab},7,drift,3,4,1,0.25,0.75"));
        assert_eq!(lines[3], format!("d2,{ab},7,drift,5,6,1,0.25,0.75"));
    }

    #[test]
    fn column_names_a_device_chose_are_quoted() {
        let t = Table {
            columns: vec!["a,b".into(), "say \"hi\"".into(), "two\nlines".into()],
            inputs: 3,
            rows: vec![(
                DeviceId::new("d1").expect("a valid device id"),
                Digest::of(b"ab"),
                7,
                "drift".into(),
                vec![1.0, 2.0, 3.5],
            )],
            skipped: 0,
        };
        let text = to_csv(&t);
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let header: Vec<String> = r
            .headers()
            .expect("header")
            .iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(header[4..], ["a,b", "say \"hi\"", "two\nlines"]);
        let row = r.records().next().expect("row").expect("record");
        assert_eq!(row.len(), 7);
        assert_eq!(&row[6], "3.5");
    }

    #[test]
    fn the_npy_export_holds_the_input_rows() {
        let t = table(&[sample("d1", vec![1.0, 2.0, 3.0, 4.0], 2, vec![0, 1])]);
        let back = crate::server::npy::read_matrix(&inputs_to_npy(&t), 100).expect("reads");
        assert_eq!(back, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
    }
}

//! NumPy's `.npy` format (versions 1.0 and 2.0), the small subset edgefleet
//! needs: write a 2-D float64 array (sample exports) and read a 1-D or 2-D
//! little-endian numeric array in C order (reference data for
//! `bundle build --reference data.npy`). The format is a 10- or 12-byte
//! preamble and a Python-literal header; written here rather than through a
//! crate because this subset is a page of code. Pure functions, sizes checked
//! before anything is allocated.

/// Encodes `rows` (each `width` values) as a float64 `.npy` file, shape
/// `(rows, width)`, byte for byte as `numpy.save` writes it.
pub fn write_f64(rows: &[&[f64]], width: usize) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': ({}, {width}), }}",
        rows.len()
    );
    // Preamble (10 bytes) + header + '\n' is a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + rows.len() * width * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for r in rows {
        for v in &r[..width] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// The value of `'key': value` in a header dict (up to the next `,` at depth 0
/// or the closing brace), trimmed.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}':"))? + key.len() + 3;
    let rest = &header[start..];
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

/// What is wrong with a `.npy` file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NpyError {
    /// No magic.
    #[error("is not a .npy file (no \\x93NUMPY magic)")]
    NotNpy,
    /// A format version this reader does not know.
    #[error(".npy format version {0} is not supported")]
    Version(u8),
    /// The header runs past the end of the file.
    #[error("the header is longer than the file")]
    HeaderTooLong,
    /// The header is not UTF-8.
    #[error("the header is not text")]
    HeaderNotText,
    /// A header field is missing.
    #[error("the header has no '{0}'")]
    Missing(&'static str),
    /// A dtype this reader does not convert.
    #[error("dtype {0} is not supported (little-endian float64, float32, int64 or int32)")]
    Dtype(String),
    /// Fortran order.
    #[error("the array is in Fortran order; save it in C order")]
    FortranOrder,
    /// The shape is not a tuple of numbers.
    #[error("shape {0} is not numbers")]
    ShapeText(String),
    /// Not a 1-D or 2-D array.
    #[error("shape {0}: needs 1 or 2 dimensions")]
    Dimensions(String),
    /// More values than the caller accepts.
    #[error("shape {shape} has more than {max} values")]
    TooManyValues {
        /// The shape.
        shape: String,
        /// The cap.
        max: usize,
    },
    /// The data is not as long as the shape says.
    #[error("shape {shape} needs {need} bytes of data, the file has {have}")]
    DataLength {
        /// The shape.
        shape: String,
        /// Bytes the shape needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
}

/// Reads a 1-D or 2-D array of `<f8`, `<f4`, `<i8` or `<i4` in C order as rows
/// of f64 (a 1-D array is one column). At most `max_values` values. The error
/// says what is wrong with the file.
pub fn read_matrix(bytes: &[u8], max_values: usize) -> Result<Vec<Vec<f64>>, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(NpyError::NotNpy);
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(NpyError::Version(v)),
    };
    let body = start
        .checked_add(header_len)
        .filter(|e| *e <= bytes.len())
        .ok_or(NpyError::HeaderTooLong)?;
    let header = std::str::from_utf8(&bytes[start..body]).map_err(|_| NpyError::HeaderNotText)?;
    let descr = field(header, "descr").ok_or(NpyError::Missing("descr"))?;
    let size = match descr.trim_matches('\'') {
        "<f8" | "<i8" => 8,
        "<f4" | "<i4" => 4,
        other => {
            return Err(NpyError::Dtype(other.to_owned()));
        }
    };
    if field(header, "fortran_order") != Some("False") {
        return Err(NpyError::FortranOrder);
    }
    let shape = field(header, "shape").ok_or(NpyError::Missing("shape"))?;
    let dims: Vec<usize> = shape
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse::<usize>()
                .map_err(|_| NpyError::ShapeText(shape.to_owned()))
        })
        .collect::<Result<_, _>>()?;
    let (n, width) = match dims.as_slice() {
        [n] => (*n, 1),
        [n, w] => (*n, *w),
        _ => return Err(NpyError::Dimensions(shape.to_owned())),
    };
    let count = n
        .checked_mul(width)
        .filter(|c| *c <= max_values)
        .ok_or_else(|| NpyError::TooManyValues {
            shape: shape.to_owned(),
            max: max_values,
        })?;
    let data = &bytes[body..];
    if data.len() != count * size {
        return Err(NpyError::DataLength {
            shape: shape.to_owned(),
            need: count * size,
            have: data.len(),
        });
    }
    let kind = descr.trim_matches('\'');
    let values: Vec<f64> = data
        .chunks_exact(size)
        .map(|c| match kind {
            "<f8" => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
            "<i8" => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64,
            "<f4" => f64::from(f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))),
            _ => f64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))),
        })
        .collect();
    Ok(values.chunks(width.max(1)).map(<[f64]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_we_write_is_what_numpy_writes_and_reads_back() {
        // numpy.save of np.array([[1.0, 2.0], [3.0, 4.0]]) (numpy 2.4): 160 bytes.
        let npy = write_f64(&[&[1.0, 2.0], &[3.0, 4.0]], 2);
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }";
        let mut expected = b"\x93NUMPY\x01\x00v\x00".to_vec();
        expected.extend(header.as_bytes());
        expected.extend(std::iter::repeat_n(b' ', 128 - 1 - expected.len()));
        expected.push(b'\n');
        for v in [1.0f64, 2.0, 3.0, 4.0] {
            expected.extend(v.to_le_bytes());
        }
        assert_eq!(npy, expected);
        assert_eq!(npy.len(), 160);
        assert_eq!(
            read_matrix(&npy, 100).expect("reads"),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
    }

    fn file(descr: &str, shape: &str, data: &[u8], fortran: &str) -> Vec<u8> {
        let h = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}\n");
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h.as_bytes());
        out.extend(data);
        out
    }

    proptest::proptest! {
        #[test]
        fn damaged_files_get_an_error_not_a_panic(
            cut in 0usize..200,
            flips in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 0..8),
        ) {
            let mut bytes = write_f64(&[&[1.0, 2.0], &[3.0, 4.0]], 2);
            for (i, b) in flips {
                if let Some(x) = bytes.get_mut(i) {
                    *x = b;
                }
            }
            bytes.truncate(cut);
            let _ = read_matrix(&bytes, 1000);
        }
    }

    #[test]
    fn float32_one_dimensional_and_bad_files() {
        let data: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let one_d = file("<f4", "(3,)", &data, "False");
        assert_eq!(
            read_matrix(&one_d, 10).expect("reads"),
            vec![vec![1.5], vec![-2.0], vec![3.25]]
        );
        for (bytes, expect) in [
            (b"not numpy".to_vec(), "magic"),
            (file("<f4", "(3,)", &data[..8], "False"), "needs 12 bytes"),
            (file(">f8", "(1,)", &[0; 8], "False"), "dtype >f8"),
            (file("<f4", "(3,)", &data, "True"), "Fortran"),
            (
                file("<f4", "(1, 1, 3)", &data, "False"),
                "1 or 2 dimensions",
            ),
            (file("<f4", "(3,)", &data, "False"), "more than 2 values"),
        ] {
            let max = if expect.contains("more than") { 2 } else { 10 };
            let err = read_matrix(&bytes, max).expect_err(expect).to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        }
    }
}

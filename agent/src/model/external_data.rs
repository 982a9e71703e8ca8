//! ONNX external data: weights kept in files beside the model (`model.onnx.data`),
//! which `torch.onnx.export` writes by default since PyTorch 2.x. A device receives
//! one signed file, so `edgefleet bundle build` copies those bytes into the model
//! (what `onnx.save(onnx.load(path))` does) before anything else looks at it.
//!
//! It lives beside the model loader so that the build (`edgefleet`) and the
//! benchmarks read a model the same way; devices never call it. The walk over
//! the model is pure ([`inline_external_data`] takes the reader as
//! an argument); [`read_from_model_dir`] is the file system shell: only files under
//! the model's own directory, never an absolute path, `..` or a link out of it,
//! and never more than the model size limit in all.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use prost::Message;
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{GraphProto, ModelProto, TensorProto};

/// Where one tensor's bytes are, as its `external_data` entries say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    /// The tensor's name (for messages).
    pub tensor: String,
    /// File name relative to the model's directory; checked by [`safe_location`].
    pub location: String,
    /// Byte offset in that file.
    pub offset: u64,
    /// Byte count; to the end of the file when absent.
    pub length: Option<u64>,
}

/// Why a model's external data cannot be inlined.
#[derive(Debug, thiserror::Error)]
pub enum ExternalDataError {
    /// The bytes are not an ONNX model.
    #[error("the file is not an ONNX model: {0}")]
    NotOnnx(#[from] prost::DecodeError),
    /// A tensor marked external has no `location`.
    #[error("tensor `{tensor}` is marked as external data but has no `location`")]
    MissingLocation {
        /// The tensor.
        tensor: String,
    },
    /// An `offset` or `length` is not a non-negative integer.
    #[error("tensor `{tensor}`: external data `{key}` is {value:?}, not a byte count")]
    BadNumber {
        /// The tensor.
        tensor: String,
        /// `offset` or `length`.
        key: String,
        /// What the model says.
        value: String,
    },
    /// A location that would leave the model's directory.
    #[error(
        "tensor `{tensor}`: external data location {location:?} must be a file name relative to the model's directory (no absolute path, no `..`)"
    )]
    UnsafeLocation {
        /// The tensor.
        tensor: String,
        /// What the model says.
        location: String,
    },
    /// The external file could not be read as described.
    #[error("tensor `{tensor}`: external data {location:?}: {source}")]
    Read {
        /// The tensor.
        tensor: String,
        /// The file.
        location: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The inlined model would be larger than a device accepts.
    #[error(
        "the model with its external data inlined would be over {limit} bytes (the model size limit)"
    )]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

/// The model with every external tensor's bytes copied in, or `None` when it has
/// no external data (use the bytes as they are). `read` returns exactly the bytes
/// an [`ExternalRef`] describes; `limit` caps the inlined model's size.
pub fn inline_external_data<R>(
    bytes: &[u8],
    limit: usize,
    mut read: R,
) -> Result<Option<Vec<u8>>, ExternalDataError>
where
    R: FnMut(&ExternalRef, u64) -> Result<Vec<u8>, io::Error>,
{
    let mut model = ModelProto::decode(bytes)?;
    let Some(graph) = model.graph.as_mut() else {
        return Ok(None);
    };
    let mut budget = Budget {
        left: limit.saturating_sub(bytes.len()) as u64,
        limit,
        inlined: 0,
    };
    inline_graph(graph, &mut read, &mut budget)?;
    if budget.inlined == 0 {
        return Ok(None);
    }
    let out = model.encode_to_vec();
    if out.len() > limit {
        return Err(ExternalDataError::TooLarge { limit });
    }
    Ok(Some(out))
}

/// Bytes still allowed, and tensors inlined so far.
struct Budget {
    left: u64,
    limit: usize,
    inlined: usize,
}

/// Inlines the graph's initializers and the tensors in its nodes' attributes
/// (`Constant` values, and subgraphs of `If`/`Loop`/`Scan`).
fn inline_graph<R>(
    graph: &mut GraphProto,
    read: &mut R,
    budget: &mut Budget,
) -> Result<(), ExternalDataError>
where
    R: FnMut(&ExternalRef, u64) -> Result<Vec<u8>, io::Error>,
{
    for tensor in &mut graph.initializer {
        inline_tensor(tensor, read, budget)?;
    }
    for node in &mut graph.node {
        for attr in &mut node.attribute {
            if let Some(t) = attr.t.as_mut() {
                inline_tensor(t, read, budget)?;
            }
            for t in &mut attr.tensors {
                inline_tensor(t, read, budget)?;
            }
            if let Some(g) = attr.g.as_mut() {
                inline_graph(g, read, budget)?;
            }
            for g in &mut attr.graphs {
                inline_graph(g, read, budget)?;
            }
        }
    }
    Ok(())
}

fn inline_tensor<R>(
    tensor: &mut TensorProto,
    read: &mut R,
    budget: &mut Budget,
) -> Result<(), ExternalDataError>
where
    R: FnMut(&ExternalRef, u64) -> Result<Vec<u8>, io::Error>,
{
    if tensor.data_location != Some(DataLocation::External as i32) {
        return Ok(());
    }
    let at = external_ref(tensor)?;
    if at.length.is_some_and(|n| n > budget.left) {
        return Err(ExternalDataError::TooLarge {
            limit: budget.limit,
        });
    }
    let data = read(&at, budget.left).map_err(|source| ExternalDataError::Read {
        tensor: at.tensor.clone(),
        location: at.location.clone(),
        source,
    })?;
    budget.left =
        budget
            .left
            .checked_sub(data.len() as u64)
            .ok_or(ExternalDataError::TooLarge {
                limit: budget.limit,
            })?;
    tensor.raw_data = data;
    tensor.external_data.clear();
    tensor.data_location = Some(DataLocation::Default as i32);
    budget.inlined += 1;
    Ok(())
}

/// Reads a tensor's `external_data` entries, checking the location.
fn external_ref(tensor: &TensorProto) -> Result<ExternalRef, ExternalDataError> {
    let entry = |key: &str| {
        tensor
            .external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let number = |key: &str| -> Result<Option<u64>, ExternalDataError> {
        entry(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| ExternalDataError::BadNumber {
                    tensor: tensor.name.clone(),
                    key: key.to_owned(),
                    value: v.to_owned(),
                })
            })
            .transpose()
    };
    let location = entry("location").ok_or_else(|| ExternalDataError::MissingLocation {
        tensor: tensor.name.clone(),
    })?;
    if !safe_location(location) {
        return Err(ExternalDataError::UnsafeLocation {
            tensor: tensor.name.clone(),
            location: location.to_owned(),
        });
    }
    Ok(ExternalRef {
        tensor: tensor.name.clone(),
        location: location.to_owned(),
        offset: number("offset")?.unwrap_or(0),
        length: number("length")?,
    })
}

/// True for a non-empty relative path made only of plain names: no root, no
/// drive prefix, no `.` or `..`.
pub fn safe_location(location: &str) -> bool {
    let path = Path::new(location);
    !location.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Reads what `at` describes from a file under `model_dir`, at most `cap` bytes;
/// a link that leads out of the directory is refused.
pub fn read_from_model_dir(model_dir: &Path, at: &ExternalRef, cap: u64) -> io::Result<Vec<u8>> {
    let path = inside(model_dir, &at.location)?;
    let mut file = fs::File::open(&path)?;
    let size = file.metadata()?.len();
    if at.offset > size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "offset {} is past the end of the file ({size} bytes)",
                at.offset
            ),
        ));
    }
    let length = at.length.unwrap_or(size - at.offset);
    if length > size - at.offset {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{length} bytes from offset {} run past the end of the file ({size} bytes)",
                at.offset
            ),
        ));
    }
    if length > cap {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("{length} bytes is over the {cap} bytes left under the model size limit"),
        ));
    }
    file.seek(SeekFrom::Start(at.offset))?;
    let mut data = Vec::with_capacity(length as usize);
    file.take(length).read_to_end(&mut data)?;
    if data.len() as u64 != length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file shrank while it was read",
        ));
    }
    Ok(data)
}

/// `location` under `model_dir`, after following links: still inside it.
fn inside(model_dir: &Path, location: &str) -> io::Result<PathBuf> {
    let dir = model_dir.canonicalize()?;
    let path = dir.join(location).canonicalize()?;
    if !path.starts_with(&dir) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "it leads to {}, outside the model's directory",
                path.display()
            ),
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx::pb::{
        AttributeProto, NodeProto, StringStringEntryProto, tensor_proto::DataType,
    };

    fn entry(key: &str, value: &str) -> StringStringEntryProto {
        StringStringEntryProto {
            key: key.into(),
            value: value.into(),
        }
    }

    fn external(name: &str, entries: Vec<StringStringEntryProto>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: vec![2],
            data_type: DataType::Float as i32,
            data_location: Some(DataLocation::External as i32),
            external_data: entries,
            ..Default::default()
        }
    }

    /// A model with an external initializer `w` and an external tensor in a
    /// `Constant` node's attribute.
    fn model(entries: Vec<StringStringEntryProto>) -> Vec<u8> {
        let constant = NodeProto {
            op_type: "Constant".into(),
            output: vec!["c".into()],
            attribute: vec![AttributeProto {
                name: "value".into(),
                t: Some(external("c", entries.clone())),
                ..Default::default()
            }],
            ..Default::default()
        };
        ModelProto {
            graph: Some(GraphProto {
                initializer: vec![external("w", entries)],
                node: vec![constant],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn eight_bytes(_: &ExternalRef, _: u64) -> io::Result<Vec<u8>> {
        Ok(vec![1, 2, 3, 4, 5, 6, 7, 8])
    }

    #[test]
    fn external_tensors_get_their_bytes_and_lose_the_reference() {
        let bytes = model(vec![
            entry("location", "m.onnx.data"),
            entry("offset", "16"),
            entry("length", "8"),
        ]);
        let mut asked = vec![];
        let out = inline_external_data(&bytes, 1 << 20, |at, _| {
            asked.push(at.clone());
            eight_bytes(at, 0)
        })
        .expect("inlines")
        .expect("had external data");
        let want = ExternalRef {
            tensor: "w".into(),
            location: "m.onnx.data".into(),
            offset: 16,
            length: Some(8),
        };
        assert_eq!(asked[0], want);
        assert_eq!(asked.len(), 2, "the initializer and the Constant's tensor");
        let m = ModelProto::decode(out.as_slice()).expect("decodes");
        let g = m.graph.expect("graph");
        let tensors = [
            &g.initializer[0],
            g.node[0].attribute[0].t.as_ref().expect("t"),
        ];
        for t in tensors {
            assert_eq!(t.raw_data, vec![1, 2, 3, 4, 5, 6, 7, 8]);
            assert!(t.external_data.is_empty());
            assert_eq!(t.data_location, Some(DataLocation::Default as i32));
        }
    }

    #[test]
    fn a_model_without_external_data_is_left_as_it_is() {
        let bytes = ModelProto {
            graph: Some(GraphProto::default()),
            ..Default::default()
        }
        .encode_to_vec();
        let out = inline_external_data(&bytes, 1 << 20, |_, _| panic!("nothing to read"));
        assert!(out.expect("reads").is_none());
    }

    #[test]
    fn locations_out_of_the_model_directory_are_refused_before_reading() {
        for bad in ["/etc/passwd", "../secret.bin", "a/../../b", "./x", ""] {
            let bytes = model(vec![entry("location", bad)]);
            let err =
                inline_external_data(&bytes, 1 << 20, |_, _| panic!("read {bad}")).expect_err(bad);
            assert!(
                matches!(err, ExternalDataError::UnsafeLocation { .. }),
                "{bad}: {err}"
            );
        }
        assert!(safe_location("weights/m.onnx.data"));
    }

    #[test]
    fn bad_entries_are_named() {
        let missing = model(vec![entry("offset", "0")]);
        let err = inline_external_data(&missing, 1 << 20, eight_bytes).expect_err("no location");
        assert_eq!(
            err.to_string(),
            "tensor `w` is marked as external data but has no `location`"
        );
        let negative = model(vec![entry("location", "d"), entry("offset", "-1")]);
        let err = inline_external_data(&negative, 1 << 20, eight_bytes).expect_err("offset");
        assert!(err.to_string().contains("`offset` is \"-1\""), "{err}");
    }

    #[test]
    fn the_size_limit_holds_for_declared_and_actual_lengths() {
        let declared = model(vec![entry("location", "d"), entry("length", "1000000")]);
        let err = inline_external_data(&declared, 4096, eight_bytes).expect_err("too large");
        assert!(matches!(err, ExternalDataError::TooLarge { limit: 4096 }));
        // No declared length: the reader is given what is left, and a reader that
        // returned more is still caught.
        let open = model(vec![entry("location", "d")]);
        let err = inline_external_data(&open, open.len() + 12, |_, _| Ok(vec![0; 8]))
            .expect_err("second tensor over");
        assert!(matches!(err, ExternalDataError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn reading_from_the_model_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("m.onnx.data"), b"0123456789").expect("write");
        let at = |offset, length| ExternalRef {
            tensor: "w".into(),
            location: "m.onnx.data".into(),
            offset,
            length,
        };
        let read = |offset, length, cap| read_from_model_dir(dir.path(), &at(offset, length), cap);
        assert_eq!(read(2, Some(3), 100).expect("reads"), b"234");
        assert_eq!(read(8, None, 100).expect("reads"), b"89");
        assert!(read(8, Some(3), 100).is_err(), "past the end");
        assert!(read(11, None, 100).is_err(), "offset past the end");
        assert!(read(0, None, 4).is_err(), "over the cap");

        let outside = tempfile::tempdir().expect("tempdir");
        fs::write(outside.path().join("secret"), b"x").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link"))
            .expect("symlink");
        let link = ExternalRef {
            location: "link".into(),
            ..at(0, None)
        };
        let err = read_from_model_dir(dir.path(), &link, 100).expect_err("link out");
        assert!(
            err.to_string().contains("outside the model's directory"),
            "{err}"
        );
    }

    proptest! {
        /// Any bytes: an error or a model, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = inline_external_data(&bytes, 1 << 16, eight_bytes);
        }

        #[test]
        fn safe_locations_stay_inside(location in "[a-z./]{0,12}") {
            if safe_location(&location) {
                let joined = Path::new("/models").join(&location);
                prop_assert!(joined.starts_with("/models"));
                prop_assert!(!location.split('/').any(|p| p == ".."));
            }
        }
    }
}

//! Safetensors files written byte for byte the same for the same content: the
//! `safetensors` crate serialises its header metadata from a `HashMap`, whose order
//! changes from run to run, so two identical checkpoints would differ in bytes (and
//! in sha256, which keys the gallery cache). Here the metadata is written in sorted
//! order, tensors in the crate's own fixed order, and the file atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;

use crate::atomic::write_atomically;
use crate::error::{DataError, Result};

/// Serialises `tensors` with `metadata` in the header, deterministically.
pub fn serialize(
    tensors: Vec<(String, TensorView<'_>)>,
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let bytes = safetensors::serialize(tensors, None).map_err(|e| e.to_string())?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let (header, data) = bytes[8..].split_at(header_len);
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header.trim_ascii_end()).map_err(|e| e.to_string())?;
    if !metadata.is_empty() {
        let meta = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // The format aligns the data to 8 bytes by padding the header with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend((header.len() as u64).to_le_bytes());
    out.extend(header);
    out.extend_from_slice(data);
    Ok(out)
}

/// Writes a safetensors file atomically (see [`serialize`]).
pub fn write(path: &Path, tensors: Vec<(String, TensorView<'_>)>, metadata: &BTreeMap<String, String>) -> Result<()> {
    let bytes = serialize(tensors, metadata).map_err(|message| DataError::Safetensors {
        path: path.to_path_buf(),
        message,
    })?;
    write_atomically(path, |file| file.write_all(&bytes).map_err(|e| DataError::io(path, e)))
}

/// Largest header `read_metadata` accepts (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The string metadata of a safetensors file, reading only its header.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let bad = |message: String| DataError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| bad("shorter than a safetensors header".into()))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(bad(format!("header of {len} bytes: not a safetensors file")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|_| bad("the file ends inside its header (truncated)".into()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("the header is not JSON: {e}")))?;
    let meta = match value.get("__metadata__") {
        None => return Ok(BTreeMap::new()),
        Some(m) => m,
    };
    serde_json::from_value(meta.clone()).map_err(|e| bad(format!("__metadata__: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, SafeTensors};

    #[test]
    fn the_same_content_gives_the_same_bytes_and_reads_back() {
        let a = [1u8, 0, 0, 0, 2, 0, 0, 0];
        let b = [7u8; 16];
        let meta: BTreeMap<String, String> = (0..40).map(|i| (format!("key{i}"), format!("v{i}"))).collect();
        let files: Vec<Vec<u8>> = (0..5)
            .map(|_| {
                let t = vec![
                    ("b".to_string(), TensorView::new(Dtype::F64, vec![2], &b).unwrap()),
                    ("a".to_string(), TensorView::new(Dtype::I32, vec![2], &a).unwrap()),
                ];
                serialize(t, &meta).unwrap()
            })
            .collect();
        assert!(files.windows(2).all(|w| w[0] == w[1]));
        let (_, header) = SafeTensors::read_metadata(&files[0]).unwrap();
        let back: BTreeMap<String, String> = header.metadata().clone().unwrap().into_iter().collect();
        assert_eq!(back, meta);
        let st = SafeTensors::deserialize(&files[0]).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &a);
        assert_eq!(st.tensor("b").unwrap().data(), &b);
        assert_eq!((files[0].len() - 8) % 8, 0);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, &files[0]).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        std::fs::write(&path, &files[0][..20]).unwrap();
        assert!(read_metadata(&path).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(read_metadata(&path)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors"));
    }
}

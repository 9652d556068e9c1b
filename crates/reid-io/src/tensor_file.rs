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
use crate::error::{IoError, Result};
use crate::feature_data::FeatureData;

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
    let bytes = serialize(tensors, metadata).map_err(|message| IoError::Safetensors {
        path: path.to_path_buf(),
        message,
    })?;
    write_atomically(path, |file| file.write_all(&bytes).map_err(|e| IoError::io(path, e)))
}

/// Largest header accepted (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor's entry in a header.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: [usize; 2],
}

impl Entry {
    /// Bytes per element of the entry's dtype (0 for one this crate does not read).
    fn element_bytes(&self) -> usize {
        match self.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" => 1,
            _ => 0,
        }
    }
}

/// A safetensors file opened for reading tensor by tensor, without holding the
/// whole file in memory: the header parsed and checked against the file's size.
pub struct TensorReader {
    path: std::path::PathBuf,
    file: std::fs::File,
    data_start: u64,
    pub metadata: BTreeMap<String, String>,
    pub entries: BTreeMap<String, Entry>,
}

impl TensorReader {
    /// Opens `path`: a truncated, garbage or oversized header is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        use std::io::Read;
        let bad = |message: String| IoError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|e| IoError::io(path, e))?;
        let size = file.metadata().map_err(|e| IoError::io(path, e))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad("shorter than a safetensors header".into()))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER || len + 8 > size {
            return Err(bad(format!(
                "header of {len} bytes in a file of {size}: not a safetensors file"
            )));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header)
            .map_err(|_| bad("the file ends inside its header (truncated)".into()))?;
        let mut value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("the header is not JSON: {e}")))?;
        let metadata = match value.remove("__metadata__") {
            None => BTreeMap::new(),
            Some(m) => serde_json::from_value(m).map_err(|e| bad(format!("__metadata__: {e}")))?,
        };
        let entries: BTreeMap<String, Entry> = serde_json::from_value(serde_json::Value::Object(value))
            .map_err(|e| bad(format!("a tensor entry does not parse: {e}")))?;
        let data_len = (size - 8 - len) as usize;
        for (name, e) in &entries {
            let [a, b] = e.data_offsets;
            let want = e.shape.iter().product::<usize>() * e.element_bytes();
            if a > b || b > data_len || (e.element_bytes() > 0 && b - a != want) {
                return Err(bad(format!(
                    "tensor '{name}' lies outside the file or does not fit its shape (truncated?)"
                )));
            }
        }
        Ok(TensorReader {
            path: path.to_path_buf(),
            file,
            data_start: 8 + len,
            metadata,
            entries,
        })
    }

    /// Reads tensor `name` as f32 (from F32, or F64 converted), in chunks.
    pub fn read_f32(&mut self, name: &str) -> Result<Vec<f32>> {
        match self.entry(name)?.dtype.as_str() {
            "F32" if cfg!(target_endian = "little") => self.read_f32_in_place(name),
            "F32" => self.read_with(name, 4, |b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            "F64" => self.read_with(name, 8, |b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32),
            d => Err(self.bad(format!("{name} must be F32 or F64, got {d}"))),
        }
    }

    /// Tensor `name` as f32, mapped from the file where its values can be used in
    /// place (F32 on a little-endian machine, 4-aligned), else read as [`Self::read_f32`] does.
    pub fn map_f32(&mut self, name: &str) -> Result<FeatureData> {
        let e = self.entry(name)?;
        let [a, b] = e.data_offsets;
        let mapped = (e.dtype == "F32")
            .then(|| FeatureData::map(&self.file, self.data_start + a as u64, (b - a) / 4))
            .flatten();
        match mapped {
            Some(m) => Ok(m),
            None => self.read_f32(name).map(Into::into),
        }
    }

    /// F32 values read straight into their vector (little-endian machines: the
    /// file's bytes are the values' bytes), without a second copy.
    fn read_f32_in_place(&mut self, name: &str) -> Result<Vec<f32>> {
        use std::io::{Read, Seek, SeekFrom};
        let [a, b] = self.entry(name)?.data_offsets;
        let mut out = vec![0.0f32; (b - a) / 4];
        // SAFETY: the vector's memory is (b - a) initialised bytes, and every bit
        // pattern is a valid f32.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, b - a) };
        let io = |e| IoError::io(&self.path, e);
        self.file
            .seek(SeekFrom::Start(self.data_start + a as u64))
            .map_err(io)?;
        self.file.read_exact(bytes).map_err(|e| IoError::io(&self.path, e))?;
        Ok(out)
    }

    /// Reads tensor `name` as i64 (from I64, or I32 converted).
    pub fn read_i64(&mut self, name: &str) -> Result<Vec<i64>> {
        match self.entry(name)?.dtype.as_str() {
            "I64" => self.read_with(name, 8, |b| i64::from_le_bytes(b.try_into().expect("8 bytes"))),
            "I32" => self.read_with(name, 4, |b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64),
            d => Err(self.bad(format!("{name} must be I64 or I32, got {d}"))),
        }
    }

    /// Reads tensor `name` as f64 (from F64, or F32, I64, I32 or U8 converted).
    pub fn read_f64(&mut self, name: &str) -> Result<Vec<f64>> {
        match self.entry(name)?.dtype.as_str() {
            "F64" => self.read_with(name, 8, |b| f64::from_le_bytes(b.try_into().expect("8 bytes"))),
            "F32" => self.read_with(name, 4, |b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64),
            "I64" => self.read_with(name, 8, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64),
            "I32" => self.read_with(name, 4, |b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64),
            "U8" => self.read_with(name, 1, |b| b[0] as f64),
            d => Err(self.bad(format!("{name} must be F64, F32, I64, I32 or U8, got {d}"))),
        }
    }

    /// The entry of `name`.
    pub fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| self.bad(format!("no '{name}' tensor")))
    }

    fn bad(&self, message: String) -> IoError {
        IoError::Safetensors {
            path: self.path.clone(),
            message,
        }
    }

    /// The values of `name`, `width` bytes each, decoded by `decode`, read 4 MiB at a time.
    fn read_with<T>(&mut self, name: &str, width: usize, decode: impl Fn(&[u8]) -> T) -> Result<Vec<T>> {
        use std::io::{Read, Seek, SeekFrom};
        let [a, b] = self.entry(name)?.data_offsets;
        let io = |e| IoError::io(&self.path, e);
        self.file
            .seek(SeekFrom::Start(self.data_start + a as u64))
            .map_err(io)?;
        let mut out = Vec::with_capacity((b - a) / width);
        let mut buf = vec![0u8; (4 << 20) / width * width];
        let mut left = b - a;
        while left > 0 {
            let n = left.min(buf.len());
            self.file
                .read_exact(&mut buf[..n])
                .map_err(|e| IoError::io(&self.path, e))?;
            out.extend(buf[..n].chunks_exact(width).map(&decode));
            left -= n;
        }
        Ok(out)
    }
}

/// A tensor's shape and its values in f64.
pub type ShapedF64 = (Vec<usize>, Vec<f64>);

/// Every tensor of a safetensors file as (shape, values in f64), by name.
pub fn read_all_f64(path: &Path) -> Result<BTreeMap<String, ShapedF64>> {
    let mut reader = TensorReader::open(path)?;
    let names: Vec<(String, Vec<usize>)> = reader
        .entries
        .iter()
        .map(|(n, e)| (n.clone(), e.shape.clone()))
        .collect();
    names
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), (shape, reader.read_f64(&name)?))))
        .collect()
}

/// The string metadata of a safetensors file, reading only its header.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    TensorReader::open(path).map(|r| r.metadata)
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
        assert!(read_metadata(&path)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors"));
        let cut = &files[0][..files[0].len() - 3];
        std::fs::write(&path, cut).unwrap();
        assert!(read_metadata(&path).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&path, &files[0]).unwrap();
        let mut r = TensorReader::open(&path).unwrap();
        assert_eq!(r.read_i64("a").unwrap(), vec![1, 2]);
        assert!(r.read_f32("a").unwrap_err().to_string().contains("F32 or F64"));
        assert_eq!(r.read_f32("b").unwrap(), vec![f64::from_le_bytes([7; 8]) as f32; 2]);
        let all = read_all_f64(&path).unwrap();
        assert_eq!(all["a"], (vec![2], vec![1.0, 2.0]));
        assert_eq!(all["b"], (vec![2], vec![f64::from_le_bytes([7; 8]); 2]));
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(read_metadata(&path)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors"));
    }
}

//! Named tensors in a safetensors file: validated reading, exact decoding, atomic writing.
//!
//! Reading trusts nothing: the whole file is read (its real length bounds every size), its
//! first bytes are sniffed so that a PyTorch pickle or zip gets a plain "not a safetensors
//! file", and the `safetensors` crate validates the header (length, UTF-8, JSON, offsets
//! that cover the data exactly once, checked arithmetic) before any tensor is touched.
//! Tensor bytes are decoded by copying little-endian values, so unaligned data is fine.
//!
//! Writing goes to a temporary file beside the target, which is synced and then renamed over
//! it: a save that is killed midway leaves the previous file at the path intact.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::kernels::Float;

/// A safetensors file read into memory and validated.
#[derive(Debug)]
pub struct TensorFile {
    path: String,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
}

/// A tensor's name, element type and shape, as the file declares them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name.
    pub name: String,
    /// Its element type, as safetensors spells it (`F32`, `BF16`, …).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl TensorFile {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::Checkpoint`] if it is not a valid
    /// safetensors file (naming the cause: too short, a zip or pickle, a header length past
    /// the end, bad UTF-8 or JSON, offsets that overlap, leave gaps or run past the data,
    /// trailing bytes, a shape too large to address even with zero elements).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        TensorFile::from_bytes(name, bytes)
    }

    /// Validates a file already in memory; `path` is used in error messages only.
    ///
    /// # Errors
    /// As [`TensorFile::read`].
    pub fn from_bytes(path: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.into();
        let bad = |why: String| Error::Checkpoint {
            path: path.clone(),
            why,
        };
        sniff(&bytes).map_err(&bad)?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        // ndarray holds a shape only if the product of its non-zero lengths fits an isize;
        // a tensor of zero elements may still claim a vast shape.
        let mut infos: Vec<_> = meta.tensors().into_iter().collect();
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, info) in infos {
            let fits = (info.shape.iter().filter(|&&d| d != 0)).try_fold(1usize, |n, &d| {
                n.checked_mul(d).filter(|&n| n <= isize::MAX as usize)
            });
            if fits.is_none() {
                return Err(bad(format!(
                    "tensor {name} has shape {:?}, too large to address",
                    info.shape
                )));
            }
        }
        Ok(TensorFile {
            path,
            bytes,
            metadata,
        })
    }

    /// The file's path, as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The string-to-string metadata of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The length of the file in bytes.
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated when the file was read")
    }

    /// Every tensor's name, type and shape, sorted by name.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        let mut out: Vec<TensorInfo> = self
            .view()
            .tensors()
            .into_iter()
            .map(|(name, t)| TensorInfo {
                name,
                dtype: format!("{:?}", t.dtype()),
                shape: t.shape().to_vec(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The total number of elements over all tensors.
    pub fn total_elements(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
            .fold(0u64, u64::saturating_add)
    }

    /// A 64-bit digest of the metadata (every key but `skip_key`, in key order) and of every
    /// tensor's name, type, shape and bytes (in name order): a checksum that any corruption of
    /// the file changes. See [`digest`].
    pub fn digest(&self, skip_key: &str) -> u64 {
        let view = self.view();
        let mut tensors = view.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut d = Digest::new();
        let mut meta: Vec<(&String, &String)> =
            self.metadata.iter().filter(|(k, _)| *k != skip_key).collect();
        meta.sort();
        for (k, v) in meta {
            d.bytes(k.as_bytes());
            d.bytes(v.as_bytes());
        }
        for (name, t) in &tensors {
            d.bytes(name.as_bytes());
            d.bytes(format!("{:?}{:?}", t.dtype(), t.shape()).as_bytes());
            d.bytes(t.data());
        }
        d.finish()
    }

    /// Tensor `name` as a float array of type F, converted only where no value changes: `F32`,
    /// `F16` and `BF16` into `f32`, and any of them or `F64` into `f64`; an `F64` value that
    /// `f32` cannot hold exactly is an error, as is any integer or boolean type.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the tensor if it is missing, or for its type.
    pub fn float<F: Float>(&self, name: &str) -> Result<ArrayD<F>> {
        let view = self.view();
        let t = view
            .tensor(name)
            .map_err(|_| self.error(format!("missing tensor {name}")))?;
        let values = decode::<F>(&t).map_err(|why| self.error(format!("tensor {name}: {why}")))?;
        Ok(ArrayD::from_shape_vec(IxDyn(t.shape()), values).expect("safetensors validated the byte length"))
    }

    /// Tensor `name` as bytes, if it is `U8` or `BOOL`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if it is missing or of another type.
    pub fn bytes_tensor(&self, name: &str) -> Result<ArrayD<u8>> {
        let view = self.view();
        let t = view
            .tensor(name)
            .map_err(|_| self.error(format!("missing tensor {name}")))?;
        match t.dtype() {
            Dtype::U8 | Dtype::BOOL => {
                Ok(ArrayD::from_shape_vec(IxDyn(t.shape()), t.data().to_vec())
                    .expect("validated byte length"))
            }
            other => Err(self.error(format!("tensor {name} is {other:?}, expected U8 or BOOL"))),
        }
    }

    /// Whether the file has a tensor named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.view().tensor(name).is_ok()
    }

    /// An error about this file.
    pub fn error(&self, why: impl Into<String>) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            why: why.into(),
        }
    }
}

/// Recognises files that are clearly something else, before their first bytes are read as a
/// header length.
fn sniff(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.starts_with(b"PK\x03\x04") {
        return Err(
            "not a safetensors file: it is a zip archive (PyTorch's torch.save format); \
                    convert it with safetensors.torch.save_file"
                .into(),
        );
    }
    if bytes.first() == Some(&0x80) {
        return Err(
            "not a safetensors file: it is a Python pickle; convert it with safetensors.torch.save_file"
                .into(),
        );
    }
    if bytes.len() < 8 {
        return Err(format!(
            "not a safetensors file: {} bytes is too short for the 8-byte header length",
            bytes.len()
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let rest = (bytes.len() - 8) as u64;
    if n > rest {
        return Err(format!(
            "not a safetensors file: its header length {n} runs past the end of the file ({rest} bytes after it)"
        ));
    }
    if bytes.get(8) != Some(&b'{') {
        return Err("not a safetensors file: the header does not start with '{'".into());
    }
    Ok(())
}

fn decode<F: Float>(t: &TensorView<'_>) -> std::result::Result<Vec<F>, String> {
    let data = t.data();
    let exact = |x: f64| -> std::result::Result<F, String> {
        let y = F::from_f64(x);
        if y.to_f64() == x || x.is_nan() {
            Ok(y)
        } else {
            Err(format!(
                "the value {x} is not exactly representable in {}; convert the file to {} first",
                F::NAME,
                F::NAME.to_uppercase()
            ))
        }
    };
    match t.dtype() {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| F::from_f64(f32::from_le_bytes(c.try_into().expect("4")) as f64))
            .collect()),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| exact(f64::from_le_bytes(c.try_into().expect("8"))))
            .collect(),
        Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|c| F::from_f64(f16_to_f64(u16::from_le_bytes([c[0], c[1]]))))
            .collect()),
        Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|c| F::from_f64(f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64))
            .collect()),
        other => Err(format!(
            "is {other:?}; expected a float type (F32, or F16, BF16, F64 converted exactly)"
        )),
    }
}

/// An IEEE half-precision value (every one is exact in f32 and f64).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// FNV-1a over 8-byte little-endian words (the tail zero-padded), each input length-prefixed:
/// fast, stable across platforms and Rust versions, and changed by any flipped bit. It detects
/// corruption; it is not a cryptographic hash.
struct Digest(u64);

impl Digest {
    const PRIME: u64 = 0x0000_0100_0000_01B3;

    fn new() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(Self::PRIME);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.word(u64::from_le_bytes(tail));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The [`TensorFile::digest`] of tensors and metadata about to be written.
pub fn digest(tensors: &[(String, OwnedTensor)], metadata: &BTreeMap<String, String>) -> u64 {
    let mut d = Digest::new();
    for (k, v) in metadata {
        d.bytes(k.as_bytes());
        d.bytes(v.as_bytes());
    }
    let mut sorted: Vec<&(String, OwnedTensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in sorted {
        d.bytes(name.as_bytes());
        d.bytes(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
        d.bytes(&t.data);
    }
    d.finish()
}

/// A tensor to write: little-endian bytes with a type and shape.
pub struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl OwnedTensor {
    /// A float tensor in the element type of F (`F32` or `F64`).
    pub fn float<F: Float>(t: ArrayViewD<'_, F>) -> Self {
        let (dtype, data) = if F::NAME == "f32" {
            (
                Dtype::F32,
                t.iter().flat_map(|v| (v.to_f64() as f32).to_le_bytes()).collect(),
            )
        } else {
            (
                Dtype::F64,
                t.iter().flat_map(|v| v.to_f64().to_le_bytes()).collect(),
            )
        };
        OwnedTensor {
            dtype,
            shape: t.shape().to_vec(),
            data,
        }
    }

    /// A `U8` tensor.
    pub fn bytes(t: ArrayViewD<'_, u8>) -> Self {
        OwnedTensor {
            dtype: Dtype::U8,
            shape: t.shape().to_vec(),
            data: t.iter().copied().collect(),
        }
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes named tensors and metadata as a safetensors file, atomically: to a temporary file
/// beside `path`, synced, then renamed over `path`.
///
/// The same tensors and metadata always give the same bytes: the header lists the metadata
/// in key order and the tensors as safetensors orders them (by descending alignment of their
/// type, then by name), and the data follows in that order.
///
/// # Errors
/// [`Error::Io`] if writing fails (the previous file at `path` is then untouched),
/// [`Error::Checkpoint`] if the tensors cannot be serialised.
pub fn write_tensor_file(
    path: impl AsRef<Path>,
    tensors: &[(String, OwnedTensor)],
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let fail = |why: String| Error::Checkpoint {
        path: path.display().to_string(),
        why: format!("cannot serialise: {why}"),
    };
    let bytes = serialize(tensors, &metadata).map_err(|e| fail(e.to_string()))?;
    // The layout is safetensors'; let its reader confirm it before anything is written.
    SafeTensors::deserialize(&bytes).map_err(|e| fail(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// The bytes of a safetensors file: an 8-byte little-endian header length, the JSON header
/// padded with spaces to a multiple of 8 bytes, then the tensors' data back to back.
/// (`safetensors::serialize` takes the metadata as a `HashMap` and writes it in that map's
/// random order.)
fn serialize(
    tensors: &[(String, OwnedTensor)],
    metadata: &BTreeMap<String, String>,
) -> serde_json::Result<Vec<u8>> {
    let mut order: Vec<&(String, OwnedTensor)> = tensors.iter().collect();
    order.sort_by(|(a, x), (b, y)| y.dtype.cmp(&x.dtype).then_with(|| a.cmp(b)));
    let mut entries = Vec::with_capacity(order.len() + 1);
    if !metadata.is_empty() {
        entries.push(format!("\"__metadata__\":{}", serde_json::to_string(metadata)?));
    }
    let mut offset = 0;
    for (name, t) in &order {
        let info = safetensors::tensor::TensorInfo {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data_offsets: (offset, offset + t.data.len()),
        };
        offset += t.data.len();
        entries.push(format!(
            "{}:{}",
            serde_json::to_string(name)?,
            serde_json::to_string(&info)?
        ));
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for (_, t) in &order {
        out.extend_from_slice(&t.data);
    }
    Ok(out)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file path")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every platform can sync a directory.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_decodes_exactly() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert_eq!(f16_to_f64(0x7bff), 65504.0);
        assert!(f16_to_f64(0x7e00).is_nan());
        assert_eq!(f16_to_f64(0xfc00), f64::NEG_INFINITY);
    }

    #[test]
    fn sniffing_names_the_real_format() {
        assert!(sniff(b"PK\x03\x04rest").unwrap_err().contains("zip"));
        assert!(sniff(&[0x80, 2, 0, 0]).unwrap_err().contains("pickle"));
        assert!(sniff(b"abc").unwrap_err().contains("too short"));
        assert!(
            sniff(&[255, 255, 255, 255, 255, 255, 255, 255, b'{'])
                .unwrap_err()
                .contains("past the end")
        );
        assert!(sniff(b"\x02\0\0\0\0\0\0\0hi").unwrap_err().contains("'{'"));
    }
}

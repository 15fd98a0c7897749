//! GGUF v2/v3 reader over a memory map.
//!
//! The header (metadata and tensor infos) is parsed eagerly into owned values; tensor
//! data stays in the map and is handed out as byte slices. Every count, length and
//! offset read from the file is checked against the bytes that remain *before*
//! anything is allocated, so a truncated or hostile file is an error naming the byte
//! offset, never a panic or a huge allocation.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::ggml_type::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays accepted (arrays of arrays are legal, unbounded depth is not).
const MAX_ARRAY_DEPTH: usize = 8;
const MAX_DIMS: u32 = 4;
/// Most metadata values (array elements included) a file may hold. A parsed array element
/// takes at most 64 bytes however small it is on disk (an array nested in an array; a number
/// takes its own size, a string 8 bytes beside its text), so this caps the header's memory
/// at 256 MiB plus the file's own string bytes. The largest real vocabularies (262k tokens
/// with scores and types, or 152k tokens with 151k merges) use under a million.
pub const MAX_METADATA_VALUES: u64 = 4 << 20;
const _: () = assert!(std::mem::size_of::<GgufArray>() <= 64);

/// Why a GGUF file was refused.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file: bad magic {found:?} at byte 0")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} at byte 4 (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("truncated file: needed {needed} bytes for {what} at byte {offset}, only {available} remain")]
    Truncated { what: &'static str, offset: u64, needed: u64, available: u64 },
    #[error("{what} count {count} at byte {offset} cannot fit in the {remaining} bytes that remain")]
    CountTooLarge { what: &'static str, count: u64, offset: u64, remaining: u64 },
    #[error("invalid UTF-8 in {what} at byte {offset}")]
    BadUtf8 { what: &'static str, offset: u64 },
    #[error("unknown metadata value type {type_id} for key `{key}` at byte {offset}")]
    UnknownValueType { key: String, type_id: u32, offset: u64 },
    #[error("arrays nested deeper than {MAX_ARRAY_DEPTH} for key `{key}` at byte {offset}")]
    TooDeep { key: String, offset: u64 },
    #[error("tensor `{name}` has unknown ggml type {type_id}")]
    UnknownTensorType { name: String, type_id: u32 },
    #[error("tensor `{name}` has {n_dims} dimensions (expected 1 to {MAX_DIMS})")]
    TooManyDims { name: String, n_dims: u32 },
    #[error(
        "tensor `{name}` has shape {dims:?} that is empty, overflows, or is not a whole number of {ggml_type} blocks"
    )]
    BadShape { name: String, dims: Vec<u64>, ggml_type: GgmlType },
    #[error("tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned { name: String, offset: u64, alignment: u64 },
    #[error("tensor `{name}` data [{start}, {end}) lies outside the file ({file_len} bytes)")]
    DataOutOfBounds { name: String, start: u64, end: u64, file_len: u64 },
    #[error("duplicate {what} `{name}`")]
    Duplicate { what: &'static str, name: String },
    #[error("general.alignment must be a non-zero power of two, found {0}")]
    BadAlignment(u64),
    #[error("tensor `{second}` data [{second_start}, ..) overlaps tensor `{first}` data [.., {first_end})")]
    Overlap { first: String, first_end: u64, second: String, second_start: u64 },
    #[error("metadata holds more than {MAX_METADATA_VALUES} values (at byte {offset})")]
    MetadataTooLarge { offset: u64 },
    #[error("metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: &'static str },
}

/// GGUF's value type names, indexed by the type's number in the file.
const TYPE_NAMES: [&str; 13] =
    ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"];

/// GGUF's number for the type of `$v`, a [`GgufValue`] or [`GgufArray`] (`$enum`): both
/// name their variants after the types.
macro_rules! type_id {
    ($enum:ident, $v:expr) => {
        match $v {
            $enum::U8(_) => 0,
            $enum::I8(_) => 1,
            $enum::U16(_) => 2,
            $enum::I16(_) => 3,
            $enum::U32(_) => 4,
            $enum::I32(_) => 5,
            $enum::F32(_) => 6,
            $enum::Bool(_) => 7,
            $enum::String(_) => 8,
            $enum::Array(_) => 9,
            $enum::U64(_) => 10,
            $enum::I64(_) => 11,
            $enum::F64(_) => 12,
        }
    };
}

/// One metadata value, in any of GGUF's value types.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: GGUF gives an array one element type, so its elements are held in one
/// vector of that type. A 262,144-token vocabulary's texts, scores and types take their own
/// bytes (about 5 MB) rather than a 32-byte value per element and an allocation per text
/// (over 30 MB).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(StrList),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// Strings in one buffer: the texts back to back and where each ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StrList {
    text: String,
    ends: Vec<usize>,
}

impl StrList {
    /// An empty list with room for `n` strings.
    pub fn with_capacity(n: usize) -> Self {
        StrList { text: String::new(), ends: Vec::with_capacity(n) }
    }

    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// String `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| &self[i])
    }
}

impl std::ops::Index<usize> for StrList {
    type Output = str;

    fn index(&self, i: usize) -> &str {
        self.get(i).unwrap_or_else(|| panic!("string {i} of a list of {}", self.len()))
    }
}

impl<S: AsRef<str>> FromIterator<S> for StrList {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut list = StrList::default();
        iter.into_iter().for_each(|s| list.push(s.as_ref()));
        list
    }
}

/// `$m!` applied to every variant of [`GgufArray`] but strings and arrays, with the
/// matching [`GgufValue`] variant.
macro_rules! scalar_arrays {
    ($m:ident) => {
        $m!(U8, I8, U16, I16, U32, I32, F32, Bool, U64, I64, F64)
    };
}

impl GgufArray {
    pub fn len(&self) -> usize {
        macro_rules! len {
            ($($v:ident),*) => {
                match self {
                    $(GgufArray::$v(items) => items.len(),)*
                    GgufArray::String(items) => items.len(),
                    GgufArray::Array(items) => items.len(),
                }
            };
        }
        scalar_arrays!(len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// GGUF's number for the element type.
    pub fn elem_type_id(&self) -> u32 {
        type_id!(GgufArray, self)
    }

    /// GGUF's name for the element type (`u32`, `string`, ...).
    pub fn elem_type_name(&self) -> &'static str {
        TYPE_NAMES[self.elem_type_id() as usize]
    }

    /// Element `i` as a value of its own (a string or nested array is copied).
    pub fn get(&self, i: usize) -> Option<GgufValue> {
        macro_rules! get {
            ($($v:ident),*) => {
                match self {
                    $(GgufArray::$v(items) => items.get(i).copied().map(GgufValue::$v),)*
                    GgufArray::String(items) => items.get(i).map(|s| GgufValue::String(s.to_owned())),
                    GgufArray::Array(items) => items.get(i).cloned().map(GgufValue::Array),
                }
            };
        }
        scalar_arrays!(get)
    }

    /// Every element as a value of its own, in order.
    pub fn values(&self) -> impl Iterator<Item = GgufValue> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// The strings, if the elements are strings.
    pub fn as_strs(&self) -> Option<&StrList> {
        match self {
            GgufArray::String(items) => Some(items),
            _ => None,
        }
    }

    /// The array of `items`, which must all have one type (an empty list is an array of
    /// `u8`); `None` when their types differ.
    pub fn from_values(items: Vec<GgufValue>) -> Option<Self> {
        let first = items.first().map_or(0, GgufValue::type_id);
        if items.iter().any(|v| v.type_id() != first) {
            return None;
        }
        macro_rules! collect {
            ($($v:ident),*) => {
                match items.first() {
                    None => GgufArray::U8(Vec::new()),
                    $(Some(GgufValue::$v(_)) => GgufArray::$v(
                        items.into_iter().filter_map(|v| if let GgufValue::$v(x) = v { Some(x) } else { None }).collect(),
                    ),)*
                    Some(GgufValue::String(_)) => GgufArray::String(items.iter().filter_map(GgufValue::as_str).collect()),
                    Some(GgufValue::Array(_)) => GgufArray::Array(
                        items.into_iter().filter_map(|v| if let GgufValue::Array(x) = v { Some(x) } else { None }).collect(),
                    ),
                }
            };
        }
        Some(scalar_arrays!(collect))
    }
}

impl GgufValue {
    /// An array of `items`, which must all have one type.
    ///
    /// # Panics
    /// When the items' types differ (GGUF arrays hold one element type).
    pub fn array(items: Vec<GgufValue>) -> GgufValue {
        GgufValue::Array(GgufArray::from_values(items).expect("a GGUF array holds one element type"))
    }

    /// GGUF's number for this value's type.
    pub fn type_id(&self) -> u32 {
        type_id!(GgufValue, self)
    }

    /// GGUF's name for this value's type (`u32`, `string`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        TYPE_NAMES[self.type_id() as usize]
    }

    /// Any integer value that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any float value (integers are not silently converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items if the value is an array.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor lives and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, i.e. the row length.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of values (the product of the dims; `parse_header` checked it does not overflow).
    pub fn n_elems(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Everything before the tensor data: version, metadata in file order, tensor infos.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section in the file.
    pub data_offset: u64,
}

impl GgufHeader {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    fn wrong(key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::WrongType { key: key.to_owned(), expected, found: v.type_name() }
    }

    /// `key` as any non-negative integer; a missing key or another type is an error naming it.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| Self::wrong(key, "unsigned integer", v))
    }

    /// `key` as an integer that fits in a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| Self::wrong(key, "u32", v))
    }

    /// `key` as a float (f32 or f64).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        v.as_f64().map(|x| x as f32).ok_or_else(|| Self::wrong(key, "float", v))
    }

    /// `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| Self::wrong(key, "bool", v))
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, "string", v))
    }

    /// `key` as an array of any element type.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray, GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| Self::wrong(key, "array", v))
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&StrList, GgufError> {
        let a = self.get_array(key)?;
        a.as_strs().ok_or_else(|| GgufError::WrongType {
            key: key.to_owned(),
            expected: "array of string",
            found: a.elem_type_name(),
        })
    }

    /// The info of tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A parsed GGUF file whose tensor data stays memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: GgufHeader,
    map: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` and parses its header; tensor ranges are checked against the file size.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        let map = map_file(&file).map_err(io)?;
        let header = parse_header(&map)?;
        Ok(GgufFile { path: path.to_owned(), header, map })
    }

    /// The whole file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The bytes of one tensor of this file (in range: `parse_header` checked it). Pass only
    /// infos from this file's own header.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + info.offset) as usize;
        &self.map[start..start + info.n_bytes as usize]
    }
}

/// The one unsafe step of the reader, kept to a single line in a single function.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and private to this process; Starling never writes
    // model files it serves. Another process truncating the file while it is mapped is
    // outside what any mmap-based loader (llama.cpp included) can defend against.
    unsafe { Mmap::map(file) }
}

/// Parses everything up to the tensor data, checking every range against `bytes.len()`.
pub fn parse_header(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut r = Reader { bytes, pos: 0, values: 0 };
    let magic: [u8; 4] = r.take(4, "magic")?.try_into().expect("4 bytes");
    if &magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors_at = r.pos as u64;
    let n_tensors = r.u64("tensor count")?;
    let n_kv_at = r.pos as u64;
    let n_kv = r.u64("metadata count")?;
    // Each metadata entry needs at least 8 (key length) + 4 (type) + 1 (value) bytes;
    // each tensor info at least 8 + 4 + 8 + 4 + 8. Refuse counts that cannot possibly fit.
    r.check_count(n_kv, 13, "metadata", n_kv_at)?;
    r.check_count(n_tensors, 32, "tensor", n_tensors_at)?;
    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv as usize);
    let mut seen = std::collections::HashSet::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        if !seen.insert(key.clone()) {
            return Err(GgufError::Duplicate { what: "metadata key", name: key });
        }
        let type_offset = r.pos as u64;
        let type_id = r.u32("metadata value type")?;
        let value = r.value(&key, type_id, type_offset, 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((key, v)) => {
            let a = v.as_u64().ok_or_else(|| GgufHeader::wrong(key, "unsigned integer", v))?;
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::BadAlignment(a));
            }
            a
        }
        None => DEFAULT_ALIGNMENT,
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    let mut seen = std::collections::HashSet::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor dimension count")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("tensor dimension")?);
        }
        let type_id = r.u32("tensor type")?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), type_id })?;
        let offset = r.u64("tensor offset")?;
        let n_elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n > 0);
        let n_bytes = n_elems
            .filter(|_| dims[0].is_multiple_of(ggml_type.block_elems() as u64))
            .and_then(|n| ggml_type.bytes_for(n));
        let Some(n_bytes) = n_bytes else {
            return Err(GgufError::BadShape { name, dims, ggml_type });
        };
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::Misaligned { name, offset, alignment });
        }
        if !seen.insert(name.clone()) {
            return Err(GgufError::Duplicate { what: "tensor", name });
        }
        tensors.push(TensorInfo { name, dims, ggml_type, offset, n_bytes });
    }

    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    check_data_ranges(&tensors, data_offset, bytes.len() as u64)?;
    Ok(GgufHeader { version, metadata, tensors, alignment, data_offset })
}

/// Every tensor's data lies inside the file, and no two tensors share bytes.
fn check_data_ranges(tensors: &[TensorInfo], data_offset: u64, file_len: u64) -> Result<(), GgufError> {
    for t in tensors {
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
        if end.is_none_or(|end| end > file_len) {
            return Err(GgufError::DataOutOfBounds {
                name: t.name.clone(),
                start: data_offset.saturating_add(t.offset),
                end: data_offset.saturating_add(t.offset).saturating_add(t.n_bytes),
                file_len,
            });
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.offset < a.offset + a.n_bytes {
            return Err(GgufError::Overlap {
                first: a.name.clone(),
                first_end: data_offset + a.offset + a.n_bytes,
                second: b.name.clone(),
                second_start: data_offset + b.offset,
            });
        }
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Metadata values read so far (see [`MAX_METADATA_VALUES`]).
    values: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated { what, offset: self.pos as u64, needed: n, available: self.remaining() });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N as u64, what)?.try_into().expect("exact length"))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Refuses a count of items of at least `min_item_bytes` each that cannot fit.
    /// `offset` is where the count itself was read.
    fn check_count(&self, count: u64, min_item_bytes: u64, what: &'static str, offset: u64) -> Result<(), GgufError> {
        if count.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(GgufError::CountTooLarge { what, count, offset, remaining: self.remaining() });
        }
        Ok(())
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        self.str(what).map(str::to_owned)
    }

    fn str(&mut self, what: &'static str) -> Result<&'a str, GgufError> {
        let len = self.u64(what)?;
        let offset = self.pos as u64;
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw).map_err(|_| GgufError::BadUtf8 { what, offset })
    }

    fn value(&mut self, key: &str, type_id: u32, offset: u64, depth: usize) -> Result<GgufValue, GgufError> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(GgufError::MetadataTooLarge { offset: self.pos as u64 });
        }
        Ok(match type_id {
            0 => GgufValue::U8(u8::from_le_bytes(self.array("u8 value")?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array("i8 value")?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array("u16 value")?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array("u32 value")?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            7 => GgufValue::Bool(self.array::<1>("bool value")?[0] != 0),
            8 => GgufValue::String(self.string("string value")?),
            9 => GgufValue::Array(self.array_value(key, offset, depth)?),
            10 => GgufValue::U64(u64::from_le_bytes(self.array("u64 value")?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
            _ => return Err(GgufError::UnknownValueType { key: key.to_owned(), type_id, offset }),
        })
    }

    /// An array value at nesting `depth` (0 for a key's own value); `offset` is where the
    /// value starts, for errors.
    fn array_value(&mut self, key: &str, offset: u64, depth: usize) -> Result<GgufArray, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::TooDeep { key: key.to_owned(), offset });
        }
        let elem_offset = self.pos as u64;
        let elem_type = self.u32("array element type")?;
        let len_offset = self.pos as u64;
        let len = self.u64("array length")?;
        let size = match elem_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => 8,
            9 => 12,
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id: elem_type,
                    offset: elem_offset,
                });
            }
        };
        self.check_count(len, size, "array element", len_offset)?;
        self.values = self.values.saturating_add(len);
        if self.values > MAX_METADATA_VALUES {
            return Err(GgufError::MetadataTooLarge { offset: len_offset });
        }
        let n = len as usize;
        // Fixed-size elements: check_count has made sure all `n` are there.
        macro_rules! fixed {
            ($v:ident, $t:ty, $what:literal) => {{
                let raw = self.take(len * size, $what)?;
                GgufArray::$v(
                    raw.chunks_exact(size as usize)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("element size")))
                        .collect(),
                )
            }};
        }
        Ok(match elem_type {
            0 => fixed!(U8, u8, "u8 value"),
            1 => fixed!(I8, i8, "i8 value"),
            2 => fixed!(U16, u16, "u16 value"),
            3 => fixed!(I16, i16, "i16 value"),
            4 => fixed!(U32, u32, "u32 value"),
            5 => fixed!(I32, i32, "i32 value"),
            6 => fixed!(F32, f32, "f32 value"),
            7 => GgufArray::Bool(self.take(len, "bool value")?.iter().map(|&b| b != 0).collect()),
            8 => {
                let mut items = StrList::with_capacity(n);
                for _ in 0..n {
                    items.push(self.str("string value")?);
                }
                GgufArray::String(items)
            }
            9 => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.array_value(key, elem_offset, depth + 1)?);
                }
                GgufArray::Array(items)
            }
            10 => fixed!(U64, u64, "u64 value"),
            11 => fixed!(I64, i64, "i64 value"),
            _ => fixed!(F64, f64, "f64 value"),
        })
    }
}

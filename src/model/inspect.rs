//! A summary of a GGUF file for people (`Display`) and scripts (`serde` JSON):
//! what `starling inspect` prints.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::Value;

use super::arch::describe;
use super::desc::{ArchDesc, RopeFactors};
use super::gguf::{GgufFile, GgufValue};

/// Array items shown before the rest is summarised by its length.
const ARRAY_PREVIEW: usize = 5;
/// Characters of a string shown before it is cut.
const STRING_PREVIEW: usize = 80;

/// Everything `inspect` reports about one file.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    pub file_size: u64,
    pub metadata: Vec<MetadataEntry>,
    pub tensors: Vec<TensorEntry>,
    /// Per ggml type: tensor count, elements, bytes (sorted by type name).
    pub totals: Vec<TypeTotal>,
    /// The resolved architecture description, when the file validates as a model
    /// Starling runs.
    pub architecture: Option<ArchDesc>,
    /// Why validation failed, when it did.
    pub validation_error: Option<String>,
}

/// One metadata key, its value summarised.
#[derive(Clone, Debug, Serialize)]
pub struct MetadataEntry {
    pub key: String,
    /// `u32`, `string`, `array<string>`, ...
    pub value_type: String,
    /// For arrays: the number of items.
    pub len: Option<usize>,
    /// Scalars as themselves; arrays as their first few items; long strings cut with `…`.
    pub value: Value,
}

/// One tensor's info.
#[derive(Clone, Debug, Serialize)]
pub struct TensorEntry {
    pub name: String,
    pub ggml_type: String,
    pub dims: Vec<u64>,
    pub n_bytes: u64,
    /// Absolute offset of the data in the file.
    pub offset: u64,
}

/// How much of the file one ggml type accounts for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TypeTotal {
    pub ggml_type: String,
    pub tensors: usize,
    pub elems: u64,
    pub n_bytes: u64,
}

/// Summarises `file`: header, metadata, tensors, per-type totals and the architecture.
pub fn inspect(file: &GgufFile) -> InspectReport {
    let h = &file.header;
    let tensors: Vec<TensorEntry> = h
        .tensors
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            ggml_type: t.ggml_type.name().to_owned(),
            dims: t.dims.clone(),
            n_bytes: t.n_bytes,
            offset: h.data_offset + t.offset,
        })
        .collect();
    let mut totals: BTreeMap<&str, TypeTotal> = BTreeMap::new();
    for t in &h.tensors {
        let name = t.ggml_type.name();
        let e = totals.entry(name).or_insert_with(|| TypeTotal {
            ggml_type: name.to_owned(),
            tensors: 0,
            elems: 0,
            n_bytes: 0,
        });
        e.tensors += 1;
        e.elems += t.n_elems();
        e.n_bytes += t.n_bytes;
    }
    let (architecture, validation_error) = match describe(h) {
        Ok(desc) => (Some(desc), None),
        Err(e) => (None, Some(e.to_string())),
    };
    InspectReport {
        path: file.path.display().to_string(),
        version: h.version,
        alignment: h.alignment,
        data_offset: h.data_offset,
        file_size: file.file_len(),
        metadata: h.metadata.iter().map(|(k, v)| summarise(k, v)).collect(),
        tensors,
        totals: totals.into_values().collect(),
        architecture,
        validation_error,
    }
}

fn summarise(key: &str, v: &GgufValue) -> MetadataEntry {
    let (value_type, len) = match v {
        GgufValue::Array(items) => (format!("array<{}>", items.elem_type_name()), Some(items.len())),
        _ => (v.type_name().to_owned(), None),
    };
    let value = match v {
        GgufValue::Array(items) => Value::Array(items.values().take(ARRAY_PREVIEW).map(|v| preview(&v)).collect()),
        _ => preview(v),
    };
    MetadataEntry { key: key.to_owned(), value_type, len, value }
}

/// One value as JSON; nested arrays become `"array<type>[len]"`, long strings are cut.
fn preview(v: &GgufValue) -> Value {
    match v {
        GgufValue::String(s) => Value::String(cut(s)),
        GgufValue::Bool(b) => Value::Bool(*b),
        GgufValue::F32(x) => serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        GgufValue::F64(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        GgufValue::Array(items) => Value::String(format!("array<{}>[{}]", items.elem_type_name(), items.len())),
        other => other.as_i64().map(Value::from).or_else(|| other.as_u64().map(Value::from)).unwrap_or(Value::Null),
    }
}

/// `s` up to [`STRING_PREVIEW`] characters, then `…(N more chars)`.
fn cut(s: &str) -> String {
    match s.char_indices().nth(STRING_PREVIEW) {
        None => s.to_owned(),
        Some((at, _)) => format!("{}…({} more chars)", &s[..at], s[at..].chars().count()),
    }
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.path)?;
        writeln!(
            f,
            "GGUF v{}  alignment {}  data at byte {}  file {} bytes",
            self.version, self.alignment, self.data_offset, self.file_size
        )?;
        writeln!(f, "\nmetadata ({} keys)", self.metadata.len())?;
        let key_w = self.metadata.iter().map(|m| m.key.len()).max().unwrap_or(0);
        for m in &self.metadata {
            let len = m.len.map(|n| format!("[{n}]")).unwrap_or_default();
            let ty = format!("{}{len}", m.value_type);
            writeln!(f, "  {:key_w$}  {ty:18}  {}", m.key, m.value)?;
        }
        writeln!(f, "\ntensors ({})", self.tensors.len())?;
        let name_w = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0).max(4);
        writeln!(f, "  {:name_w$}  {:6}  {:20}  {:>12}  {:>12}", "name", "type", "dims", "bytes", "offset")?;
        for t in &self.tensors {
            let dims = format!("{:?}", t.dims);
            writeln!(f, "  {:name_w$}  {:6}  {dims:20}  {:>12}  {:>12}", t.name, t.ggml_type, t.n_bytes, t.offset)?;
        }
        writeln!(f, "\ntotals per type")?;
        for t in &self.totals {
            writeln!(
                f,
                "  {:6}  {:>5} tensors  {:>12} elems  {:>12} bytes",
                t.ggml_type, t.tensors, t.elems, t.n_bytes
            )?;
        }
        match (&self.architecture, &self.validation_error) {
            (Some(desc), _) => write_desc(f, desc),
            (None, Some(err)) => writeln!(f, "\nnot a runnable model: {err}"),
            (None, None) => Ok(()),
        }
    }
}

fn write_desc(f: &mut fmt::Formatter<'_>, d: &ArchDesc) -> fmt::Result {
    writeln!(f, "\narchitecture: {} (valid)", d.family)?;
    writeln!(
        f,
        "  vocab {}  embd {}  layers {}  heads {} (kv {}, dim {})  ffn {}  ctx {}",
        d.n_vocab, d.n_embd, d.n_layer, d.n_head, d.n_head_kv, d.head_dim, d.n_ff, d.n_ctx_train
    )?;
    let yes = |b: bool| if b { "yes" } else { "no" };
    writeln!(
        f,
        "  rms eps {:e}  q/k norms {}  post norms {}  activation {:?}  embedding scale {}",
        d.rms_eps,
        yes(d.qk_norm),
        yes(d.post_norms),
        d.activation,
        d.embed_scale.map_or("none".to_owned(), |s| format!("{s}")),
    )?;
    let factors = match &d.rope_factors {
        RopeFactors::None => "none".to_owned(),
        RopeFactors::Tensor(name) => name.clone(),
    };
    writeln!(
        f,
        "  rope {:?} over {} dims, factors {factors}, magnitude {}  attention scale {}",
        d.rope_style, d.rope_dim, d.rope_magnitude, d.attn_scale
    )?;
    let mut bases: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, l) in d.layers.iter().enumerate() {
        let kind = match (l.sliding, d.sliding_window) {
            (true, Some(w)) => format!("window {w}, rope base {} scale {}", l.rope.freq_base, l.rope.freq_scale),
            _ => format!("global, rope base {} scale {}", l.rope.freq_base, l.rope.freq_scale),
        };
        match bases.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, layers)) => layers.push(i),
            None => bases.push((kind, vec![i])),
        }
    }
    for (kind, layers) in bases {
        writeln!(f, "  layers {layers:?}: {kind}")?;
    }
    writeln!(
        f,
        "  output head {}  logit softcap {}",
        if d.tied_output { "tied to token_embd" } else { "output.weight" },
        d.logit_softcap.map_or("none".to_owned(), |c| c.to_string())
    )?;
    if !d.extra_tensors.is_empty() {
        writeln!(f, "  unused tensors: {}", d.extra_tensors.join(", "))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(STRING_PREVIEW + 7);
        let c = cut(&s);
        assert!(c.starts_with(&"é".repeat(STRING_PREVIEW)));
        assert!(c.ends_with("…(7 more chars)"), "{c}");
        assert_eq!(cut("short"), "short");
    }

    #[test]
    fn arrays_are_summarised_by_type_length_and_first_items() {
        let v = GgufValue::array((0..100u32).map(GgufValue::U32).collect());
        let m = summarise("k", &v);
        assert_eq!(m.value_type, "array<u32>");
        assert_eq!(m.len, Some(100));
        assert_eq!(m.value, serde_json::json!([0, 1, 2, 3, 4]));
        let nested = GgufValue::array(vec![GgufValue::array(vec![GgufValue::I8(-1); 3])]);
        assert_eq!(summarise("n", &nested).value, serde_json::json!(["array<i8>[3]"]));
    }
}

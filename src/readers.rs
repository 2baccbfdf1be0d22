//! Streaming readers of vector files, for `tandem insert` and `tandem search --file`:
//!
//! - `.npy`: a 2-D float32 array in C order, little-endian (what `np.save(path, x.astype("<f4"))`
//!   writes). The NPY header is parsed here; it is a few lines.
//! - `.fvecs`: each vector is its dimension as an i32 (little-endian) then that many f32 (the
//!   format of the SIFT/GIST benchmark sets).
//! - JSON lines: `{"id": 1, "vector": [..], "payload": {"k": v}}` per line; `id` and `payload` are
//!   optional.
//!
//! Files are read a batch at a time, so a 10 GB file costs one batch of memory. Rows without an
//! id get `start_id + row index` (the row index counts from 0 at the top of the file). Every
//! error names the file and the row (binary formats) or line (JSON lines) at fault.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tandem_proto::v1 as pb;

/// How to read a vector file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// From the file name's extension, else from its first bytes.
    Auto,
    /// A 2-D little-endian float32 array in C order.
    Npy,
    /// Per vector: its dimension (i32 LE), then that many f32 LE.
    Fvecs,
    /// One JSON object per line: {"id": 1, "vector": [...], "payload": {...}}.
    Jsonl,
}

/// Rows read from a file, in the flattened shape of the API's insert request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub ids: Vec<i64>,
    /// `ids.len() * dim` floats, row after row.
    pub vectors: Vec<f32>,
    /// Empty when no row of the batch has a payload, else one per id.
    pub payloads: Vec<pb::Payload>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// An open vector file, read batch by batch.
pub struct VectorFile {
    path: PathBuf,
    format: Format,
    kind: Kind,
    dim: Option<usize>,
    total_rows: Option<u64>,
    /// Index of the next row to read.
    row: u64,
    start_id: i64,
}

enum Kind {
    /// `remaining` rows of `dim` floats follow.
    Npy {
        r: BufReader<File>,
        remaining: u64,
    },
    Fvecs {
        r: BufReader<File>,
    },
    Jsonl {
        r: BufReader<File>,
        line: u64,
        buf: String,
    },
}

impl std::fmt::Debug for VectorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VectorFile({}, {:?}, dim {:?})", self.path.display(), self.format, self.dim)
    }
}

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

impl VectorFile {
    /// Opens `path` and reads its header (npy) or first vector's dimension (fvecs).
    pub fn open(path: &Path, format: Format, start_id: i64) -> anyhow::Result<VectorFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
        let mut r = BufReader::with_capacity(1 << 20, file);
        let format = match format {
            Format::Auto => detect(path, &mut r)?,
            f => f,
        };
        let (kind, dim, total_rows) = match format {
            Format::Npy => {
                let h = read_npy_header(&mut r).with_context(|| format!("{}: not a readable .npy file", path.display()))?;
                let data = h.rows.checked_mul(h.dim as u64 * 4);
                if data.is_none_or(|d| d > file_len.saturating_sub(h.header_len)) {
                    bail!(
                        "{}: truncated: the header says {} rows of dim {} ({} bytes of data) but the file holds {} bytes after its header",
                        path.display(),
                        h.rows,
                        h.dim,
                        data.map_or("too many".to_string(), |d| d.to_string()),
                        file_len.saturating_sub(h.header_len)
                    );
                }
                (Kind::Npy { r, remaining: h.rows }, Some(h.dim), Some(h.rows))
            }
            Format::Fvecs => {
                let dim = match peek_fvecs_dim(&mut r).with_context(|| format!("cannot read {}", path.display()))? {
                    None => None,
                    Some(d) if d <= 0 => {
                        bail!("{}: row 0 has dimension {d}: an .fvecs row starts with its dimension (> 0)", path.display())
                    }
                    Some(d) => Some(d as usize),
                };
                // Exact when the file is well-formed; a bad row is reported when reached.
                let total = dim.map(|d| file_len / (4 + 4 * d as u64));
                (Kind::Fvecs { r }, dim, total.or(Some(0)))
            }
            Format::Jsonl => (Kind::Jsonl { r, line: 0, buf: String::new() }, None, None),
            Format::Auto => unreachable!("detect() picks a concrete format"),
        };
        Ok(VectorFile { path: path.to_path_buf(), format, kind, dim, total_rows, row: 0, start_id })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The vector dimension: known on open for npy and fvecs, after the first batch for JSON lines.
    pub fn dim(&self) -> Option<usize> {
        self.dim
    }

    /// Rows in the file, when known without reading it all (npy, fvecs).
    pub fn total_rows(&self) -> Option<u64> {
        self.total_rows
    }

    /// Rows read so far.
    pub fn rows_read(&self) -> u64 {
        self.row
    }

    /// Reads up to `max_rows` rows; `None` at the end of the file.
    pub fn next_batch(&mut self, max_rows: usize) -> anyhow::Result<Option<Batch>> {
        let max_rows = max_rows.max(1);
        let batch = match &mut self.kind {
            Kind::Npy { r, remaining } => {
                let dim = self.dim.unwrap_or(0);
                let n = (*remaining).min(max_rows as u64) as usize;
                if n == 0 {
                    return Ok(None);
                }
                let mut bytes = vec![0u8; n * dim * 4];
                r.read_exact(&mut bytes)
                    .with_context(|| format!("{}: cannot read rows {}..{}", self.path.display(), self.row, self.row + n as u64))?;
                *remaining -= n as u64;
                let ids = seq_ids(&self.path, self.start_id, self.row, n)?;
                Batch { ids, vectors: f32s(&bytes), payloads: Vec::new() }
            }
            Kind::Fvecs { r } => {
                let Some(dim) = self.dim else { return Ok(None) };
                let mut vectors = Vec::with_capacity(max_rows.min(1 << 16) * dim);
                let mut row_bytes = vec![0u8; 4 + dim * 4];
                let mut n = 0;
                while n < max_rows {
                    let row = self.row + n as u64;
                    let got = read_full(r, &mut row_bytes).with_context(|| format!("{}: cannot read row {row}", self.path.display()))?;
                    if got == 0 {
                        break;
                    }
                    if got < 4 {
                        bail!("{}: row {row} is truncated: {got} bytes, not even its dimension", self.path.display());
                    }
                    let d = i32::from_le_bytes([row_bytes[0], row_bytes[1], row_bytes[2], row_bytes[3]]);
                    if d as i64 != dim as i64 {
                        bail!("{}: row {row} has dimension {d}, but the first row has {dim}", self.path.display());
                    }
                    if got < row_bytes.len() {
                        bail!(
                            "{}: row {row} is truncated: {} of its {dim} floats are missing",
                            self.path.display(),
                            (row_bytes.len() - got).div_ceil(4)
                        );
                    }
                    vectors.extend(f32s(&row_bytes[4..]));
                    n += 1;
                }
                if n == 0 {
                    return Ok(None);
                }
                let ids = seq_ids(&self.path, self.start_id, self.row, n)?;
                Batch { ids, vectors, payloads: Vec::new() }
            }
            Kind::Jsonl { r, line, buf } => {
                let mut batch = Batch::default();
                let mut payloads: Vec<Option<pb::Payload>> = Vec::new();
                while batch.len() < max_rows {
                    buf.clear();
                    let got = r.read_line(buf).with_context(|| format!("{}:{}: cannot read", self.path.display(), *line + 1))?;
                    if got == 0 {
                        break;
                    }
                    *line += 1;
                    let text = buf.trim();
                    if text.is_empty() {
                        continue;
                    }
                    let row = self.row + batch.len() as u64;
                    let parsed = parse_json_row(text, self.dim).with_context(|| format!("{}:{}", self.path.display(), *line))?;
                    self.dim.get_or_insert(parsed.vector.len());
                    let id = match parsed.id {
                        Some(id) => id,
                        None => seq_ids(&self.path, self.start_id, row, 1)?[0],
                    };
                    batch.ids.push(id);
                    batch.vectors.extend_from_slice(&parsed.vector);
                    payloads.push(parsed.payload);
                }
                if batch.is_empty() {
                    return Ok(None);
                }
                if payloads.iter().any(Option::is_some) {
                    batch.payloads = payloads.into_iter().map(Option::unwrap_or_default).collect();
                }
                batch
            }
        };
        self.row += batch.len() as u64;
        Ok(Some(batch))
    }
}

fn seq_ids(path: &Path, start_id: i64, row: u64, n: usize) -> anyhow::Result<Vec<i64>> {
    let first = i64::try_from(row).ok().and_then(|r| start_id.checked_add(r));
    let last = first.and_then(|f| f.checked_add(n as i64 - 1));
    match (first, last) {
        (Some(first), Some(last)) => Ok((first..=last).collect()),
        _ => bail!("{}: row {row}: id --start-id {start_id} + {row} overflows i64", path.display()),
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn detect(path: &Path, r: &mut BufReader<File>) -> anyhow::Result<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("npy") => return Ok(Format::Npy),
        Some("fvecs") => return Ok(Format::Fvecs),
        Some("jsonl" | "ndjson" | "json") => return Ok(Format::Jsonl),
        _ => {}
    }
    let head = r.fill_buf().with_context(|| format!("cannot read {}", path.display()))?;
    if head.starts_with(NPY_MAGIC) {
        Ok(Format::Npy)
    } else if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        Ok(Format::Jsonl)
    } else {
        bail!("cannot tell the format of {} from its name or contents: pass --format npy, fvecs or jsonl", path.display())
    }
}

fn peek_fvecs_dim(r: &mut BufReader<File>) -> std::io::Result<Option<i32>> {
    let head = r.fill_buf()?;
    match head.len() {
        0 => return Ok(None),
        1..4 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "row 0 is truncated")),
        _ => {}
    }
    Ok(Some(i32::from_le_bytes([head[0], head[1], head[2], head[3]])))
}

#[derive(Debug, PartialEq)]
struct NpyHeader {
    rows: u64,
    dim: usize,
    /// Bytes before the data: magic, version, length and the header text.
    header_len: u64,
}

/// Parses the NPY header (format versions 1, 2 and 3), accepting only 2-D little-endian float32
/// in C order.
fn read_npy_header(r: &mut impl Read) -> anyhow::Result<NpyHeader> {
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).context("file too short for an NPY header")?;
    if &pre[..6] != NPY_MAGIC {
        bail!("missing the NPY magic bytes \\x93NUMPY");
    }
    let (major, minor) = (pre[6], pre[7]);
    let (text_len, prefix_len) = match major {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).context("truncated NPY header")?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).context("truncated NPY header")?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        _ => bail!("NPY format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"),
    };
    if text_len > 1 << 20 {
        bail!("NPY header of {text_len} bytes is implausibly large");
    }
    let mut text = vec![0u8; text_len];
    r.read_exact(&mut text).context("truncated NPY header")?;
    let text = String::from_utf8(text).context("NPY header is not text")?;
    let (rows, dim) = parse_npy_dict(&text)?;
    Ok(NpyHeader { rows, dim, header_len: (prefix_len + text_len) as u64 })
}

/// The header is a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 128), }`.
fn parse_npy_dict(text: &str) -> anyhow::Result<(u64, usize)> {
    let descr = npy_value(text, "descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let little_f4 = descr == "<f4" || (descr == "=f4" && cfg!(target_endian = "little"));
    if !little_f4 {
        let what = match descr {
            "<f8" | "=f8" | ">f8" => " (float64)",
            "<f2" | "=f2" | ">f2" => " (float16)",
            ">f4" => " (big-endian float32)",
            _ => "",
        };
        bail!(
            "dtype {descr:?}{what} is not supported: tandem reads little-endian float32 ('<f4'); \
             convert with np.save(path, x.astype('<f4'))"
        );
    }
    match npy_value(text, "fortran_order")?.as_str() {
        "False" => {}
        "True" => bail!("the array is in Fortran order: save a C-ordered copy with np.save(path, np.ascontiguousarray(x))"),
        other => bail!("fortran_order {other:?} is neither True nor False"),
    }
    let shape = npy_value(text, "shape")?;
    let inner = shape.strip_prefix('(').and_then(|s| s.strip_suffix(')')).with_context(|| format!("shape {shape:?} is not a tuple"))?;
    let dims: Vec<u64> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<u64>().with_context(|| format!("shape {shape:?} holds {s:?}, not a size")))
        .collect::<anyhow::Result<_>>()?;
    match dims[..] {
        [rows, dim] if dim > 0 && dim <= u32::MAX as u64 => Ok((rows, dim as usize)),
        [_, 0] => bail!("shape {shape} has dimension 0"),
        _ => bail!("shape {shape} is not 2-D (rows, dim): tandem reads a matrix with one vector per row"),
    }
}

/// The text of `key`'s value in the header dict: a quoted string, a word, or a parenthesised tuple.
fn npy_value(text: &str, key: &str) -> anyhow::Result<String> {
    let at = ["'", "\""]
        .iter()
        .find_map(|q| text.find(&format!("{q}{key}{q}")).map(|i| i + key.len() + 2))
        .with_context(|| format!("NPY header has no {key:?}: {text:?}"))?;
    let rest = text[at..].trim_start();
    let rest = rest.strip_prefix(':').with_context(|| format!("NPY header: no ':' after {key:?}"))?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else if let Some(q) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') {
        rest[1..].find(q).map(|i| i + 2)
    } else {
        rest.find([',', '}'])
    };
    let end = end.with_context(|| format!("NPY header: cannot read the value of {key:?}"))?;
    Ok(rest[..end].trim().to_string())
}

#[derive(Debug)]
struct JsonRow {
    id: Option<i64>,
    vector: Vec<f32>,
    payload: Option<pb::Payload>,
}

fn parse_json_row(text: &str, dim: Option<usize>) -> anyhow::Result<JsonRow> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        // serde_json counts lines within the one line it was given; only the column helps.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or_default().to_string();
        anyhow::anyhow!("not valid JSON at column {}: {msg}", e.column())
    })?;
    let serde_json::Value::Object(obj) = v else { bail!("expected a JSON object like {{\"id\": 1, \"vector\": [0.1, 0.2]}}") };
    let mut row = JsonRow { id: None, vector: Vec::new(), payload: None };
    let mut has_vector = false;
    for (k, v) in obj {
        match k.as_str() {
            "id" => {
                row.id = match &v {
                    serde_json::Value::Null => None,
                    serde_json::Value::Number(n) => Some(n.as_i64().with_context(|| format!("id {n} is not a 64-bit signed integer"))?),
                    other => bail!("id {other} is not an integer"),
                }
            }
            "vector" => {
                let serde_json::Value::Array(xs) = v else { bail!("\"vector\" is not an array of numbers") };
                row.vector = xs
                    .iter()
                    .enumerate()
                    .map(|(i, x)| match x.as_f64() {
                        Some(f) if (f as f32).is_finite() => Ok(f as f32),
                        Some(f) => bail!("vector[{i}] = {f} does not fit a finite float32"),
                        None => bail!("vector[{i}] = {x} is not a number"),
                    })
                    .collect::<anyhow::Result<_>>()?;
                has_vector = true;
            }
            "payload" => {
                row.payload = match v {
                    serde_json::Value::Null => None,
                    serde_json::Value::Object(fields) => Some(payload_from_json(fields)?),
                    other => bail!("\"payload\" is {other}, not an object"),
                }
            }
            other => bail!("unknown key {other:?}: a row has \"id\" (optional), \"vector\" and \"payload\" (optional)"),
        }
    }
    if !has_vector {
        bail!("no \"vector\"");
    }
    if row.vector.is_empty() {
        bail!("\"vector\" is empty");
    }
    if let Some(dim) = dim.filter(|d| *d != row.vector.len()) {
        bail!("vector has dimension {}, but the first row has {dim}", row.vector.len());
    }
    Ok(row)
}

/// JSON int -> int64, other numbers -> double, bool, string; null leaves the field unset.
pub fn payload_from_json(fields: serde_json::Map<String, serde_json::Value>) -> anyhow::Result<pb::Payload> {
    use pb::value::Kind;
    let mut out = HashMap::with_capacity(fields.len());
    for (name, v) in fields {
        let kind = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Kind::Int64Value(i)
                } else if n.is_u64() {
                    bail!("payload field {name:?} = {n} does not fit an int64");
                } else {
                    Kind::DoubleValue(n.as_f64().with_context(|| format!("payload field {name:?} = {n} is not a number"))?)
                }
            }
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                bail!("payload field {name:?} is {v}: payload values are integers, numbers, booleans or strings")
            }
        };
        out.insert(name, pb::Value { kind: Some(kind) });
    }
    Ok(pb::Payload { fields: out })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn npy_bytes(descr: &str, shape: &str, data: &[f32], version: u8) -> Vec<u8> {
        let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let pre = if version == 1 { 10 } else { 12 };
        // numpy pads the header with spaces so the data starts 64-byte aligned.
        while (pre + dict.len() + 1) % 64 != 0 {
            dict.push(' ');
        }
        dict.push('\n');
        let mut out = NPY_MAGIC.to_vec();
        out.extend([version, 0]);
        if version == 1 {
            out.extend((dict.len() as u16).to_le_bytes());
        } else {
            out.extend((dict.len() as u32).to_le_bytes());
        }
        out.extend(dict.as_bytes());
        for x in data {
            out.extend(x.to_le_bytes());
        }
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn read_all(f: &mut VectorFile, batch: usize) -> anyhow::Result<Vec<Batch>> {
        let mut out = Vec::new();
        while let Some(b) = f.next_batch(batch)? {
            out.push(b);
        }
        Ok(out)
    }

    #[test]
    fn npy_streams_in_batches_with_sequential_ids() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<f32> = (0..15).map(|i| i as f32).collect();
        for version in [1, 2] {
            let p = write(dir.path(), "x.npy", &npy_bytes("<f4", "(5, 3)", &data, version));
            let mut f = VectorFile::open(&p, Format::Auto, 100).unwrap();
            assert_eq!((f.format(), f.dim(), f.total_rows()), (Format::Npy, Some(3), Some(5)));
            let batches = read_all(&mut f, 2).unwrap();
            assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), vec![2, 2, 1]);
            assert_eq!(batches[1].ids, vec![102, 103]);
            assert_eq!(batches[1].vectors, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
            assert!(batches[0].payloads.is_empty());
        }
    }

    #[test]
    fn npy_rejects_other_dtypes_shapes_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.npy", &npy_bytes("<f8", "(2, 2)", &[0.0; 8], 1));
        let e = format!("{:#}", VectorFile::open(&p, Format::Auto, 0).unwrap_err());
        assert!(e.contains("d.npy") && e.contains("\"<f8\" (float64) is not supported"), "{e}");

        let p = write(dir.path(), "s.npy", &npy_bytes("<f4", "(8,)", &[0.0; 8], 1));
        let e = format!("{:#}", VectorFile::open(&p, Format::Auto, 0).unwrap_err());
        assert!(e.contains("shape (8,) is not 2-D"), "{e}");

        let mut bytes = npy_bytes("<f4", "(4, 2)", &[1.0; 8], 1);
        bytes.truncate(bytes.len() - 3);
        let p = write(dir.path(), "t.npy", &bytes);
        let e = format!("{:#}", VectorFile::open(&p, Format::Auto, 0).unwrap_err());
        assert!(e.contains("t.npy: truncated") && e.contains("4 rows of dim 2"), "{e}");

        let p = write(dir.path(), "m.npy", b"not an npy file at all");
        let e = format!("{:#}", VectorFile::open(&p, Format::Auto, 0).unwrap_err());
        assert!(e.contains("m.npy") && e.contains("magic"), "{e}");
    }

    #[test]
    fn npy_header_parsing() {
        assert_eq!(parse_npy_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (10, 4), }").unwrap(), (10, 4));
        assert_eq!(parse_npy_dict("{'shape': (0, 4), 'fortran_order': False, 'descr': '<f4'}").unwrap(), (0, 4));
        let e = parse_npy_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (10, 4), }").unwrap_err();
        assert!(e.to_string().contains("Fortran order"), "{e}");
        let e = parse_npy_dict("{'descr': '<i8', 'fortran_order': False, 'shape': (10, 4), }").unwrap_err();
        assert!(e.to_string().contains("\"<i8\""), "{e}");
        let e = parse_npy_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }").unwrap_err();
        assert!(e.to_string().contains("(2, 3, 4) is not 2-D"), "{e}");
    }

    fn fvecs(rows: &[Vec<f32>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in rows {
            out.extend((r.len() as i32).to_le_bytes());
            for x in r {
                out.extend(x.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn fvecs_reads_rows_and_reports_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32, -(i as f32)]).collect();
        let p = write(dir.path(), "ok.fvecs", &fvecs(&rows));
        let mut f = VectorFile::open(&p, Format::Auto, 0).unwrap();
        assert_eq!((f.dim(), f.total_rows()), (Some(2), Some(5)));
        let b = read_all(&mut f, 3).unwrap();
        assert_eq!(b[1].ids, vec![3, 4]);
        assert_eq!(b[1].vectors, vec![3.0, -3.0, 4.0, -4.0]);

        let mut bad = rows.clone();
        bad[3] = vec![1.0, 2.0, 3.0];
        let p = write(dir.path(), "dim.fvecs", &fvecs(&bad));
        let mut f = VectorFile::open(&p, Format::Auto, 0).unwrap();
        let e = read_all(&mut f, 10).unwrap_err().to_string();
        assert!(e.contains("dim.fvecs: row 3 has dimension 3, but the first row has 2"), "{e}");

        let mut short = fvecs(&rows);
        short.truncate(short.len() - 4);
        let p = write(dir.path(), "short.fvecs", &short);
        let mut f = VectorFile::open(&p, Format::Fvecs, 0).unwrap();
        let e = read_all(&mut f, 2).unwrap_err().to_string();
        assert!(e.contains("short.fvecs: row 4 is truncated"), "{e}");

        let p = write(dir.path(), "empty.fvecs", b"");
        let mut f = VectorFile::open(&p, Format::Auto, 0).unwrap();
        assert!(read_all(&mut f, 2).unwrap().is_empty());
    }

    #[test]
    fn jsonl_reads_ids_vectors_and_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"{"id": 7, "vector": [1, 2], "payload": {"category": "books", "price": 9.5, "qty": 3, "new": true, "gone": null}}

{"vector": [3.5, 4], "payload": {}}
{"vector": [5, 6]}
"#;
        let p = write(dir.path(), "rows.jsonl", text.as_bytes());
        let mut f = VectorFile::open(&p, Format::Auto, 1000).unwrap();
        let b = read_all(&mut f, 2).unwrap();
        assert_eq!(f.dim(), Some(2));
        assert_eq!(b[0].ids, vec![7, 1001], "a row without id gets start_id + its row index");
        assert_eq!(b[0].vectors, vec![1.0, 2.0, 3.5, 4.0]);
        let p0 = &b[0].payloads[0].fields;
        use pb::value::Kind;
        assert_eq!(p0["category"].kind, Some(Kind::StringValue("books".into())));
        assert_eq!(p0["price"].kind, Some(Kind::DoubleValue(9.5)));
        assert_eq!(p0["qty"].kind, Some(Kind::Int64Value(3)));
        assert_eq!(p0["new"].kind, Some(Kind::BoolValue(true)));
        assert!(!p0.contains_key("gone"));
        assert_eq!(b[1].ids, vec![1002]);
        assert!(b[1].payloads.is_empty(), "no payload in the batch: none sent");
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("{\"vector\": [1, 2]}\n{\"vector\": [1, 2, 3]}\n", ":2", "dimension 3, but the first row has 2"),
            ("{\"vector\": [1, 2]}\n\n{\"vector\": [1, \"x\"]}\n", ":3", "vector[1] = \"x\" is not a number"),
            ("{\"vector\": [1, 2]\n", ":1", "not valid JSON"),
            ("{\"vec\": [1, 2]}\n", ":1", "unknown key \"vec\""),
            ("{\"id\": 1.5, \"vector\": [1]}\n", ":1", "id 1.5 is not a 64-bit signed integer"),
            ("{\"vector\": [1], \"payload\": {\"tags\": [\"a\"]}}\n", ":1", "payload field \"tags\""),
            ("{\"vector\": [1], \"payload\": {\"n\": 18446744073709551615}}\n", ":1", "does not fit an int64"),
            ("{\"payload\": {}}\n", ":1", "no \"vector\""),
            ("[1, 2]\n", ":1", "expected a JSON object"),
        ];
        for (text, line, needle) in cases {
            let p = write(dir.path(), "bad.jsonl", text.as_bytes());
            let mut f = VectorFile::open(&p, Format::Jsonl, 0).unwrap();
            let e = format!("{:#}", read_all(&mut f, 10).unwrap_err());
            assert!(e.contains(&format!("bad.jsonl{line}")) && e.contains(needle), "{e} should name {line} and {needle}");
        }
    }

    #[test]
    fn auto_detection_and_id_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "noext", &npy_bytes("<f4", "(1, 1)", &[1.0], 1));
        assert_eq!(VectorFile::open(&p, Format::Auto, 0).unwrap().format(), Format::Npy);
        let p = write(dir.path(), "rows.txt", b"  {\"vector\": [1]}\n");
        assert_eq!(VectorFile::open(&p, Format::Auto, 0).unwrap().format(), Format::Jsonl);
        let p = write(dir.path(), "blob.bin", b"\x01\x02");
        let e = VectorFile::open(&p, Format::Auto, 0).unwrap_err().to_string();
        assert!(e.contains("blob.bin") && e.contains("--format"), "{e}");

        let p = write(dir.path(), "o.npy", &npy_bytes("<f4", "(2, 1)", &[1.0, 2.0], 1));
        let mut f = VectorFile::open(&p, Format::Auto, i64::MAX).unwrap();
        let e = read_all(&mut f, 10).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
    }
}

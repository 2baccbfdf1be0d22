//! `tandem search`: top-k search with one or more query vectors, given inline or read from a file.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tandem_proto::v1 as pb;

use super::{ConnectArgs, ReadArgs, client_with_session, fmt_payload, payload_json, table};
use crate::readers::{Format, VectorFile};

/// Query vectors per request when reading them from a file (the server's default `limits.max_nq`
/// is 1024; smaller requests keep replies modest).
const QUERIES_PER_REQUEST: usize = 256;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("queries_from").required(true).args(["vector", "file"])))]
pub struct SearchArgs {
    /// The collection to search.
    #[arg(long)]
    pub collection: String,
    /// A query vector, "0.1,0.2,..."; repeat for several queries.
    #[arg(long, value_name = "FLOATS", allow_hyphen_values = true)]
    pub vector: Vec<String>,
    /// Read query vectors from a file (.npy, .fvecs or JSON lines).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Format of --file.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// How many vectors to take from the top of --file [default: 1].
    #[arg(long)]
    pub queries: Option<usize>,
    /// Hits per query.
    #[arg(long, default_value_t = 10)]
    pub top_k: u32,
    /// Payload filter, e.g. 'category == "books" and price < 20'; hits are the true top-k of
    /// the rows that pass it.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub filter: String,
    /// Payload fields to return with each hit, comma separated; "*" = all, "" = none.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub output_fields: Vec<String>,
    #[command(flatten)]
    pub read: ReadArgs,
    /// IVF_FLAT: lists probed (0 = the server's default).
    #[arg(long, default_value_t = 0)]
    pub nprobe: u32,
    /// HNSW: search breadth (0 = the server's default).
    #[arg(long, default_value_t = 0)]
    pub ef: u32,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// Parses `"0.1, 0.2,0.3"` (brackets allowed) into floats, naming the element that is not one.
pub fn parse_vector(s: &str) -> anyhow::Result<Vec<f32>> {
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    let v = inner
        .split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, x)| match x.parse::<f32>() {
            Ok(f) if f.is_finite() => Ok(f),
            _ => bail!("--vector {s:?}: element {i} ({x:?}) is not a finite number"),
        })
        .collect::<anyhow::Result<Vec<f32>>>()?;
    Ok(v)
}

pub async fn run(a: SearchArgs) -> anyhow::Result<()> {
    if a.file.is_none() && a.queries.is_some() {
        bail!("--queries applies to --file; with --vector, every vector given is a query");
    }
    let (vectors, dim) = if let Some(path) = &a.file {
        let n = a.queries.unwrap_or(1);
        if n == 0 {
            bail!("--queries 0: nothing to search for");
        }
        let (path, format) = (path.clone(), a.format);
        tokio::task::spawn_blocking(move || read_queries(&path, format, n)).await??
    } else {
        let vs: Vec<Vec<f32>> = a.vector.iter().map(|s| parse_vector(s)).collect::<anyhow::Result<_>>()?;
        let dim = vs[0].len();
        if let Some((i, v)) = vs.iter().enumerate().find(|(_, v)| v.len() != dim) {
            bail!("--vector number {i} has {} elements, the first has {dim}", v.len());
        }
        (vs.concat(), dim)
    };
    let output_fields: Vec<String> = a.output_fields.iter().filter(|f| !f.is_empty()).cloned().collect();
    // The session starts at --session-token and follows every reply, so the chunks of a long
    // query file are read at ever newer (never older) snapshots.
    let client = client_with_session(&a.conn.endpoint, &a.read.session_token).await?;
    let mut results = Vec::new();
    for chunk in vectors.chunks(QUERIES_PER_REQUEST * dim) {
        let hits = client
            .search(&a.collection)
            .vectors(chunk.chunks(dim))
            .top_k(a.top_k)
            .filter(a.filter.clone())
            .output_fields(output_fields.clone())
            .nprobe(a.nprobe)
            .ef(a.ef)
            .consistency(a.read.consistency())
            .await?;
        results.extend(hits.iter().map(|h| pb::Hits { hits: h.iter().map(pb::Hit::from).collect() }));
    }
    let token = client.session_token().unwrap_or_default();
    if a.json {
        let out = serde_json::json!({ "results": results.iter().map(hits_json).collect::<Vec<_>>(), "session_token": token });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (i, hits) in results.iter().enumerate() {
            if i > 0 {
                println!();
            }
            println!("{}", hits_text(i, hits));
        }
    }
    Ok(())
}

fn read_queries(path: &std::path::Path, format: Format, n: usize) -> anyhow::Result<(Vec<f32>, usize)> {
    let mut f = VectorFile::open(path, format, 0)?;
    let mut vectors = Vec::new();
    let mut got = 0;
    while got < n {
        let Some(b) = f.next_batch((n - got).min(4096))? else { break };
        got += b.len();
        vectors.extend(b.vectors);
    }
    let dim = f.dim().context("no vectors")?;
    if got == 0 {
        bail!("{} holds no vectors", path.display());
    }
    Ok((vectors, dim))
}

/// `query 0: 3 hits` and a table of rank, id, distance and payload.
pub fn hits_text(query: usize, hits: &pb::Hits) -> String {
    let n = hits.hits.len();
    let head = format!("query {query}: {n} hit{}", if n == 1 { "" } else { "s" });
    if n == 0 {
        return head;
    }
    let rows: Vec<Vec<String>> = hits
        .hits
        .iter()
        .enumerate()
        .map(|(i, h)| vec![(i + 1).to_string(), h.id.to_string(), format!("{:.6}", h.distance), fmt_payload(h.payload.as_ref())])
        .collect();
    let body = table(&["rank", "id", "distance", "payload"], &rows);
    format!("{head}\n{}", body.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"))
}

fn hits_json(hits: &pb::Hits) -> serde_json::Value {
    hits.hits.iter().map(|h| serde_json::json!({"id": h.id, "distance": h.distance, "payload": payload_json(h.payload.as_ref())})).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_parse_and_errors_name_the_element() {
        assert_eq!(parse_vector("0.5, -1,2e1").unwrap(), vec![0.5, -1.0, 20.0]);
        assert_eq!(parse_vector("[1,2]").unwrap(), vec![1.0, 2.0]);
        let e = parse_vector("1,x,3").unwrap_err().to_string();
        assert!(e.contains("element 1 (\"x\")"), "{e}");
        assert!(parse_vector("1,,2").is_err());
        assert!(parse_vector("1,NaN").is_err());
    }
}

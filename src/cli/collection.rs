//! `tandem collection create|list|describe|drop`: collection DDL.

use anyhow::bail;
use tandem_client::{CollectionSpec, FieldType, Index, Metric};
use tandem_proto::v1 as pb;

use super::{ConnectArgs, client, fmt_ts, table};

#[derive(Debug, clap::Subcommand)]
pub enum CollectionCmd {
    /// Create a collection.
    Create(CreateArgs),
    /// List collection names, one per line.
    List(ListArgs),
    /// Show a collection's schema, rows, segments and serviceable timestamp.
    Describe(DescribeArgs),
    /// Drop a collection and delete its data.
    Drop(DropArgs),
    /// Set how many replica groups of query nodes hold the collection (docs/scaling.md).
    Load(LoadArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricArg {
    /// Squared euclidean distance (smaller is closer).
    L2,
    /// Inner product (larger is closer).
    Ip,
    /// Cosine similarity (larger is closer); vectors are normalised on write.
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IndexArg {
    /// Exact search.
    Flat,
    /// Inverted lists (--nlist); fast to build, tune recall with search --nprobe.
    #[value(name = "ivf_flat", alias = "ivf-flat")]
    IvfFlat,
    /// Graph index (--m, --ef-construction); best recall/latency, slower to build.
    Hnsw,
}

/// A payload field declaration, `name:type`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldArg {
    pub name: String,
    pub ty: FieldType,
}

impl std::str::FromStr for FieldArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((name, ty)) = s.split_once(':') else {
            return Err(format!(
                "field {s:?} has no type: write NAME:TYPE with TYPE int64, int32, int16, int8, double, float32, bool, string or json"
            ));
        };
        let ty = match ty.trim().to_ascii_lowercase().as_str() {
            "int64" | "int" => FieldType::Int64,
            "double" | "float" | "float64" => FieldType::Double,
            "float32" => FieldType::Float,
            "int32" => FieldType::Int32,
            "int16" => FieldType::Int16,
            "int8" => FieldType::Int8,
            "json" => FieldType::Json,
            "bool" => FieldType::Bool,
            "string" | "str" => FieldType::String,
            other => {
                return Err(format!(
                    "field {name:?} has unknown type {other:?}: use int64, int32, int16, int8, double, float32, bool, string or json"
                ));
            }
        };
        Ok(FieldArg { name: name.trim().to_string(), ty })
    }
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Collection name: letters, digits and _, starting with a letter or _.
    pub name: String,
    /// Vector dimension.
    #[arg(long)]
    pub dim: u32,
    #[arg(long, value_enum, default_value = "l2")]
    pub metric: MetricArg,
    #[arg(long, value_enum, default_value = "flat")]
    pub index: IndexArg,
    /// IVF_FLAT: number of inverted lists (server default 128).
    #[arg(long)]
    pub nlist: Option<u32>,
    /// HNSW: graph degree (server default 16).
    #[arg(long)]
    pub m: Option<u32>,
    /// HNSW: build breadth (server default 200).
    #[arg(long)]
    pub ef_construction: Option<u32>,
    /// Number of shards (ordered change logs); more shards spread writes over more WALs.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// A payload field, NAME:TYPE with TYPE int64, double, bool or string. Repeat it, or separate
    /// fields with commas.
    #[arg(long = "field", value_name = "NAME:TYPE", value_delimiter = ',')]
    pub fields: Vec<FieldArg>,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    pub name: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

#[derive(Debug, clap::Args)]
pub struct DropArgs {
    pub name: String,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    pub name: String,
    /// Replica groups to hold copies, 0 for none (the cluster's own process serves it alone);
    /// without it, every group (the default).
    #[arg(long)]
    pub replicas: Option<u32>,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

pub async fn run(cmd: CollectionCmd) -> anyhow::Result<()> {
    match cmd {
        CollectionCmd::Create(a) => create(a).await,
        CollectionCmd::List(a) => {
            let names = client(&a.conn.endpoint).await?.list_collections().await?;
            if a.json {
                println!("{}", serde_json::to_string(&names)?);
            } else {
                for n in names {
                    println!("{n}");
                }
            }
            Ok(())
        }
        CollectionCmd::Describe(a) => {
            let info = client(&a.conn.endpoint).await?.describe_collection(&a.name).await?;
            let info = pb::CollectionInfo::from(&info);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&collection_json(&info))?);
            } else {
                println!("{}", describe_text(&info));
            }
            Ok(())
        }
        CollectionCmd::Drop(a) => {
            client(&a.conn.endpoint).await?.drop_collection(&a.name).await?;
            println!("dropped collection {:?}", a.name);
            Ok(())
        }
        CollectionCmd::Load(a) => {
            let groups = client(&a.conn.endpoint).await?.load_collection(&a.name, a.replicas).await?;
            let list: Vec<String> = groups.iter().map(u32::to_string).collect();
            match list.len() {
                0 => println!("collection {:?}: no replica group holds it; the cluster serves it alone", a.name),
                _ => println!("collection {:?}: held by replica group(s) {}", a.name, list.join(", ")),
            }
            Ok(())
        }
    }
}

/// The schema `create` sends; flags that do not apply to the chosen index are refused rather
/// than silently ignored.
pub fn spec_of(a: &CreateArgs) -> anyhow::Result<CollectionSpec> {
    let index = match a.index {
        IndexArg::Flat | IndexArg::IvfFlat if a.m.is_some() || a.ef_construction.is_some() => {
            bail!("--m and --ef-construction apply to --index hnsw, not {}", flag_value(a.index))
        }
        IndexArg::Flat | IndexArg::Hnsw if a.nlist.is_some() => {
            bail!("--nlist applies to --index ivf_flat, not {}", flag_value(a.index))
        }
        IndexArg::Flat => Index::Flat,
        IndexArg::IvfFlat => Index::IvfFlat { nlist: a.nlist.unwrap_or(0) },
        IndexArg::Hnsw => Index::Hnsw { m: a.m.unwrap_or(0), ef_construction: a.ef_construction.unwrap_or(0) },
    };
    let metric = match a.metric {
        MetricArg::L2 => Metric::L2,
        MetricArg::Ip => Metric::Ip,
        MetricArg::Cosine => Metric::Cosine,
    };
    let spec = CollectionSpec::new(a.name.clone(), a.dim).metric(metric).index(index).shards(a.shards);
    Ok(a.fields.iter().fold(spec, |s, f| s.field(f.name.clone(), f.ty)))
}

/// How a value-enum flag value is spelled on the command line.
fn flag_value(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().map_or_else(String::new, |p| p.get_name().to_string())
}

async fn create(a: CreateArgs) -> anyhow::Result<()> {
    let spec = spec_of(&a)?;
    let info = client(&a.conn.endpoint).await?.create_collection(spec).await?;
    let s = pb::CollectionInfo::from(&info).schema.unwrap_or_default();
    println!(
        "created collection {:?}: dim {}, {}, {}, {} shard{}",
        s.name,
        s.dim,
        metric_name(s.metric),
        index_name(s.index.as_ref()),
        s.shards,
        if s.shards == 1 { "" } else { "s" }
    );
    Ok(())
}

pub fn metric_name(m: i32) -> &'static str {
    match pb::Metric::try_from(m) {
        Ok(pb::Metric::L2) => "L2",
        Ok(pb::Metric::Ip) => "IP",
        Ok(pb::Metric::Cosine) => "COSINE",
        Ok(pb::Metric::Unspecified) | Err(_) => "unknown metric",
    }
}

pub fn index_name(spec: Option<&pb::IndexSpec>) -> String {
    use pb::index_spec::Kind;
    match spec.and_then(|s| s.kind.as_ref()) {
        None | Some(Kind::Flat(_)) => "FLAT".into(),
        Some(Kind::IvfFlat(i)) => format!("IVF_FLAT (nlist {})", i.nlist),
        Some(Kind::Hnsw(h)) => format!("HNSW (m {}, ef_construction {})", h.m, h.ef_construction),
    }
}

fn type_name(t: i32) -> &'static str {
    match pb::ScalarType::try_from(t) {
        Ok(pb::ScalarType::Int64) => "int64",
        Ok(pb::ScalarType::Double) => "double",
        Ok(pb::ScalarType::Bool) => "bool",
        Ok(pb::ScalarType::String) => "string",
        Ok(pb::ScalarType::Int32) => "int32",
        Ok(pb::ScalarType::Int16) => "int16",
        Ok(pb::ScalarType::Int8) => "int8",
        Ok(pb::ScalarType::Float) => "float",
        Ok(pb::ScalarType::Json) => "json",
        Ok(pb::ScalarType::Unspecified) | Err(_) => "unknown",
    }
}

fn state_name(s: i32) -> &'static str {
    use pb::segment_info::State;
    match State::try_from(s) {
        Ok(State::Growing) => "growing",
        Ok(State::Sealed) => "sealed",
        Ok(State::Indexed) => "indexed",
        Ok(State::Unspecified) | Err(_) => "unknown",
    }
}

pub fn describe_text(info: &pb::CollectionInfo) -> String {
    use pb::segment_info::State;
    let s = info.schema.clone().unwrap_or_default();
    let fields = if s.fields.is_empty() {
        "(none)".to_string()
    } else {
        s.fields.iter().map(|f| format!("{} {}", f.name, type_name(f.r#type))).collect::<Vec<_>>().join(", ")
    };
    let count = |st: State| info.segments.iter().filter(|g| g.state == st as i32).count();
    let summary = format!(
        "{} ({} growing, {} sealed, {} indexed)",
        info.segments.len(),
        count(State::Growing),
        count(State::Sealed),
        count(State::Indexed)
    );
    let mut out = table(
        &["collection", &s.name],
        &[
            vec!["id".into(), info.collection_id.to_string()],
            vec!["created".into(), fmt_ts(info.created_ts)],
            vec!["dim".into(), s.dim.to_string()],
            vec!["metric".into(), metric_name(s.metric).into()],
            vec!["index".into(), index_name(s.index.as_ref())],
            vec!["shards".into(), s.shards.to_string()],
            vec!["fields".into(), fields],
            vec!["rows".into(), info.rows.to_string()],
            vec!["segments".into(), summary],
            vec!["serviceable".into(), format!("{} (ts {})", fmt_ts(info.serviceable_ts), info.serviceable_ts)],
        ],
    );
    if !info.segments.is_empty() {
        let mut segs = info.segments.clone();
        segs.sort_by_key(|g| (g.shard, g.id));
        let rows: Vec<Vec<String>> = segs
            .iter()
            .map(|g| vec![g.shard.to_string(), g.id.to_string(), state_name(g.state).into(), g.rows.to_string(), g.deleted.to_string()])
            .collect();
        out.push_str("\n\n");
        out.push_str(&table(&["shard", "segment", "state", "rows", "deleted"], &rows));
    }
    out
}

pub fn collection_json(info: &pb::CollectionInfo) -> serde_json::Value {
    use pb::index_spec::Kind;
    let s = info.schema.clone().unwrap_or_default();
    let index = match s.index.as_ref().and_then(|i| i.kind.as_ref()) {
        None | Some(Kind::Flat(_)) => serde_json::json!({"type": "flat"}),
        Some(Kind::IvfFlat(i)) => serde_json::json!({"type": "ivf_flat", "nlist": i.nlist}),
        Some(Kind::Hnsw(h)) => serde_json::json!({"type": "hnsw", "m": h.m, "ef_construction": h.ef_construction}),
    };
    serde_json::json!({
        "name": s.name,
        "collection_id": info.collection_id,
        "created_ts": info.created_ts,
        "dim": s.dim,
        "metric": metric_name(s.metric).to_ascii_lowercase(),
        "index": index,
        "shards": s.shards,
        "fields": s.fields.iter().map(|f| serde_json::json!({"name": f.name, "type": type_name(f.r#type)})).collect::<Vec<_>>(),
        "rows": info.rows,
        "serviceable_ts": info.serviceable_ts,
        "segments": info.segments.iter().map(|g| serde_json::json!({
            "id": g.id, "shard": g.shard, "state": state_name(g.state), "rows": g.rows, "deleted": g.deleted,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(subcommand)]
        cmd: CollectionCmd,
    }

    fn create(args: &[&str]) -> anyhow::Result<CollectionSpec> {
        let t = T::try_parse_from(["t", "create"].iter().chain(args)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let CollectionCmd::Create(c) = t.cmd else { unreachable!() };
        spec_of(&c)
    }

    #[test]
    fn create_flags_become_a_schema() {
        let s =
            create(&["docs", "--dim", "8", "--index", "hnsw", "--m", "8", "--field", "a:int64,b:string", "--field", "c:double"]).unwrap();
        assert_eq!(s.dim, 8);
        assert_eq!(s.fields.len(), 3);
        assert_eq!(s.fields[1], tandem_client::Field { name: "b".into(), ty: FieldType::String });
        assert_eq!(s.index, Index::Hnsw { m: 8, ef_construction: 0 });
        assert_eq!(s.shards, 1);

        let e = create(&["docs", "--dim", "8", "--nlist", "4"]).unwrap_err().to_string();
        assert!(e.contains("--nlist applies to --index ivf_flat"), "{e}");
        let e = create(&["docs", "--dim", "8", "--field", "a:float16"]).unwrap_err().to_string();
        assert!(e.contains("unknown type \"float16\""), "{e}");
        let s = create(&["docs", "--dim", "8", "--field", "a:float32,b:int8,c:json"]).unwrap();
        let types: Vec<FieldType> = s.fields.iter().map(|f| f.ty).collect();
        assert_eq!(types, [FieldType::Float, FieldType::Int8, FieldType::Json]);
        let e = create(&["docs", "--dim", "8", "--field", "a"]).unwrap_err().to_string();
        assert!(e.contains("field \"a\" has no type"), "{e}");
        assert!(create(&["docs", "--dim", "8", "--index", "ivf-flat", "--nlist", "4"]).is_ok());
    }
}

//! `tandem info`: the cluster's identity, role and the state of each collection.

use tandem_proto::v1 as pb;

use super::{ConnectArgs, client, fmt_bytes, fmt_ts, table};

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

pub async fn run(a: InfoArgs) -> anyhow::Result<()> {
    let info = client(&a.conn.endpoint).await?.cluster_info().await?;
    let info = pb::GetClusterInfoResponse::from(&info);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
    } else {
        println!("{}", info_text(&info));
    }
    Ok(())
}

pub fn role_name(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Leading) => "leading",
        Ok(pb::Role::Alternative) => "alternative",
        Ok(pb::Role::Standby) => "standby",
        Ok(pb::Role::Recovering) => "recovering",
        Ok(pb::Role::Unspecified) | Err(_) => "unknown",
    }
}

/// How far `ts` is behind `now`, in wall-clock milliseconds.
fn lag_ms(now: u64, ts: u64) -> u64 {
    tandem_cluster::ts::physical_ms(now).saturating_sub(tandem_cluster::ts::physical_ms(ts))
}

pub fn info_text(info: &pb::GetClusterInfoResponse) -> String {
    let mut out = table(
        &["cluster", &info.cluster_id],
        &[
            vec!["role".into(), format!("{} (epoch {})", role_name(info.role), info.epoch)],
            vec!["version".into(), info.version.clone()],
            vec!["time".into(), format!("{} (ts {})", fmt_ts(info.current_ts), info.current_ts)],
            vec!["collections".into(), info.collections.len().to_string()],
        ],
    );
    if !info.collections.is_empty() {
        let rows: Vec<Vec<String>> = info
            .collections
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.rows.to_string(),
                    c.growing_segments.to_string(),
                    c.sealed_segments.to_string(),
                    fmt_bytes(c.memory_bytes),
                    fmt_bytes(c.disk_bytes),
                    format!("ts {} ({} ms behind)", c.serviceable_ts, lag_ms(info.current_ts, c.serviceable_ts)),
                ]
            })
            .collect();
        out.push_str("\n\n");
        out.push_str(&table(&["collection", "rows", "growing", "sealed", "memory", "disk", "serviceable"], &rows));
    }
    out
}

pub fn info_json(info: &pb::GetClusterInfoResponse) -> serde_json::Value {
    serde_json::json!({
        "cluster_id": info.cluster_id,
        "role": role_name(info.role),
        "epoch": info.epoch,
        "current_ts": info.current_ts,
        "version": info.version,
        "collections": info.collections.iter().map(|c| serde_json::json!({
            "name": c.name,
            "rows": c.rows,
            "growing_segments": c.growing_segments,
            "sealed_segments": c.sealed_segments,
            "memory_bytes": c.memory_bytes,
            "disk_bytes": c.disk_bytes,
            "serviceable_ts": c.serviceable_ts,
        })).collect::<Vec<_>>(),
    })
}

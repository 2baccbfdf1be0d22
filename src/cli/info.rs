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
        // With query nodes, which replica groups hold each collection (LoadCollection).
        let groups = !info.query_nodes.is_empty();
        let rows: Vec<Vec<String>> = info
            .collections
            .iter()
            .map(|c| {
                let mut row = vec![
                    c.name.clone(),
                    c.rows.to_string(),
                    c.growing_segments.to_string(),
                    c.sealed_segments.to_string(),
                    fmt_bytes(c.memory_bytes),
                    fmt_bytes(c.disk_bytes),
                    format!("ts {} ({} ms behind)", c.serviceable_ts, lag_ms(info.current_ts, c.serviceable_ts)),
                ];
                if groups {
                    let list: Vec<String> = c.replica_groups.iter().map(u32::to_string).collect();
                    row.push(if list.is_empty() { "none".into() } else { list.join(",") });
                }
                row
            })
            .collect();
        let mut head = vec!["collection", "rows", "growing", "sealed", "memory", "disk", "serviceable"];
        if groups {
            head.push("groups");
        }
        out.push_str("\n\n");
        out.push_str(&table(&head, &rows));
    }
    if !info.query_nodes.is_empty() {
        let rows: Vec<Vec<String>> = info
            .query_nodes
            .iter()
            .map(|q| {
                let state = if q.up { "up" } else { "down" };
                vec![
                    q.endpoint.clone(),
                    q.group.to_string(),
                    state.into(),
                    q.segments.to_string(),
                    q.searches.to_string(),
                    q.stolen.to_string(),
                    q.shards_led.to_string(),
                    q.growing_searches.to_string(),
                ]
            })
            .collect();
        out.push_str("\n\n");
        out.push_str(&table(&["query node", "group", "state", "segments", "sub-searches", "stolen", "leads", "growing searched"], &rows));
    }
    // Who keeps and searches each shard's growing rows, per replica group.
    let mut leaders: Vec<(&str, u32, u32, &str)> = info
        .query_nodes
        .iter()
        .flat_map(|q| q.led_shards.iter().map(move |l| (l.collection.as_str(), l.shard, q.group, q.endpoint.as_str())))
        .collect();
    if !leaders.is_empty() {
        leaders.sort_unstable();
        let rows: Vec<Vec<String>> = leaders
            .into_iter()
            .map(|(c, shard, group, endpoint)| vec![c.to_string(), shard.to_string(), group.to_string(), endpoint.to_string()])
            .collect();
        out.push_str("\n\n");
        out.push_str(&table(&["collection", "shard", "group", "shard leader"], &rows));
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
            "replica_groups": c.replica_groups,
        })).collect::<Vec<_>>(),
        "query_nodes": info.query_nodes.iter().map(|q| serde_json::json!({
            "group": q.group,
            "endpoint": q.endpoint,
            "up": q.up,
            "segments": q.segments,
            "searches": q.searches,
            "stolen": q.stolen,
            "shards_led": q.shards_led,
            "growing_searches": q.growing_searches,
            "joined": q.joined,
            "led_shards": q.led_shards.iter().map(|l| serde_json::json!({"collection": l.collection, "shard": l.shard})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_nodes_are_listed_with_their_group_state_and_copies() {
        let q = |group, endpoint: &str, up, segments| pb::QueryNodeStatus {
            group,
            endpoint: endpoint.into(),
            up,
            segments,
            searches: 7,
            stolen: 2,
            shards_led: 3,
            growing_searches: 5,
            led_shards: Vec::new(),
            joined: false,
        };
        let mut info = pb::GetClusterInfoResponse { cluster_id: "a".into(), role: pb::Role::Leading as i32, ..Default::default() };
        assert!(!info_text(&info).contains("query node"), "a cluster without query nodes lists none");
        info.query_nodes = vec![q(0, "http://10.0.0.11:19540", false, 0), q(1, "http://10.0.0.13:19540", true, 8)];
        let status =
            |name: &str, groups: Vec<u32>| pb::CollectionStatus { name: name.into(), replica_groups: groups, ..Default::default() };
        info.collections = vec![status("docs", vec![0, 1]), status("logs", vec![])];
        let text = info_text(&info);
        let line = |ep: &str| text.lines().find(|l| l.contains(ep)).unwrap_or_else(|| panic!("{ep} not listed:\n{text}")).to_string();
        let words = |l: String| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(words(line("10.0.0.11")), ["http://10.0.0.11:19540", "0", "down", "0", "7", "2", "3", "5"]);
        assert_eq!(words(line("10.0.0.13")), ["http://10.0.0.13:19540", "1", "up", "8", "7", "2", "3", "5"]);
        assert_eq!(words(line("docs")).last().map(String::as_str), Some("0,1"), "{text}");
        assert_eq!(words(line("logs")).last().map(String::as_str), Some("none"), "{text}");
        let json = info_json(&info);
        assert_eq!(json["query_nodes"][1]["segments"], 8);
        assert_eq!(json["query_nodes"][0]["up"], false);
        assert_eq!(json["query_nodes"][0]["stolen"], 2);
        assert_eq!(json["query_nodes"][0]["shards_led"], 3);
        assert_eq!(json["query_nodes"][0]["growing_searches"], 5);
        assert_eq!(json["query_nodes"][0]["joined"], false);
        assert_eq!(json["collections"][0]["replica_groups"], serde_json::json!([0, 1]));
        assert!(!text.contains("shard leader"), "no node leads a shard: no leaders listed\n{text}");
        // Shard leaders, one table row per (collection, shard, group), in that order.
        let led = |c: &str, shard| pb::LedShard { collection: c.into(), shard };
        info.query_nodes[1].led_shards = vec![led("docs", 1), led("docs", 0)];
        info.query_nodes[0].led_shards = vec![led("docs", 0)];
        let text = info_text(&info);
        let table: Vec<Vec<String>> = text.lines().skip_while(|l| !l.contains("shard leader")).skip(1).map(|l| words(l.into())).collect();
        assert_eq!(
            table,
            [
                ["docs", "0", "0", "http://10.0.0.11:19540"],
                ["docs", "0", "1", "http://10.0.0.13:19540"],
                ["docs", "1", "1", "http://10.0.0.13:19540"]
            ],
            "{text}"
        );
        let json = info_json(&info);
        assert_eq!(
            json["query_nodes"][1]["led_shards"],
            serde_json::json!([{"collection": "docs", "shard": 1}, {"collection": "docs", "shard": 0}])
        );
    }
}

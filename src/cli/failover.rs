//! `tandem failover --to CLUSTER`: a manual switchover with no data loss. The leader stops
//! taking writes (a gateway holds them), waits until the transport holds every change it
//! acknowledged, steps down and hands leadership to CLUSTER, which takes it once it has
//! consumed the log to its end (docs/operations.md). Needs an arbiter (`ha.arbiter`).

use std::time::Duration;

use anyhow::Context;
use tandem_proto::replication::v1 as rp;
use tandem_proto::replication::v1::replication_client::ReplicationClient;

use super::ConnectArgs;

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// The cluster id to hand leadership to (a caught-up alternative or standby).
    #[arg(long, value_name = "CLUSTER")]
    pub to: String,
    /// The longest the switchover may take (drain, catch-up, handover).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub timeout: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(a: FailoverArgs) -> anyhow::Result<()> {
    let mut endpoint = a.connect.endpoint.clone();
    // Sent to a cluster that does not lead, the reply names the leader: ask it instead, once.
    for attempt in 0..2 {
        let mut client = ReplicationClient::new(super::channel(&endpoint).await?);
        let mut req = tonic::Request::new(rp::SwitchoverRequest { to: a.to.clone() });
        req.set_timeout(Duration::from_secs(a.timeout));
        match client.switchover(req).await {
            Ok(r) => {
                let r = r.into_inner();
                println!("cluster {} leads now (epoch {}) at {}", r.leader, r.epoch, r.endpoint);
                return Ok(());
            }
            Err(s) if attempt == 0 && s.code() == tonic::Code::FailedPrecondition => {
                let Some(leader) = tandem_proto::wire::leader_hint(&s) else {
                    return Err(super::status_error(s));
                };
                endpoint = leader;
            }
            Err(s) => return Err(super::status_error(s)).with_context(|| format!("switchover to {}", a.to)),
        }
    }
    unreachable!("the loop returns")
}

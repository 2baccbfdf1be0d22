//! Coordinator state in the arbiter's store: a member's proxy keeps its placement of segment
//! copies on query nodes there (`state/<cluster>/placement` in etcd), so a restarted member, on
//! this machine or another, starts from it.

use std::sync::Arc;

use tandem_arbiter::Session;
use tandem_cluster::ClusterError;
use tandem_cluster::placement::StateStore;

/// One named state of this member, in its arbiter session's store.
pub struct ArbiterState {
    pub session: Arc<dyn Session>,
    pub name: &'static str,
}

/// The arbiter's errors as the cluster sees them: an unreachable arbiter is transient.
fn cluster_error(e: tandem_arbiter::ArbiterError) -> ClusterError {
    if e.is_transient() { ClusterError::Unavailable(e.to_string()) } else { ClusterError::Internal(e.to_string()) }
}

#[tonic::async_trait]
impl StateStore for ArbiterState {
    async fn get(&self) -> tandem_cluster::Result<Option<Vec<u8>>> {
        self.session.get_state(self.name).await.map_err(cluster_error)
    }

    async fn put(&self, value: Vec<u8>) -> tandem_cluster::Result<()> {
        self.session.put_state(self.name, value).await.map_err(cluster_error)
    }

    fn describe(&self) -> String {
        format!("the arbiter's state {:?}", self.name)
    }
}

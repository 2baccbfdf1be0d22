//! A cluster's role in its replication group.
//!
//! ```text
//!               promote (arbiter)                      new epoch seen
//!  Alternative ──────────────────► Leading ────────────────────────────► Recovering
//!      ▲  ▲                                                                  │
//!      │  └──────────────────────── caught up ──────────────────────────────┘
//!      │ promote (manual)
//!   Standby  (serves nothing until promoted)
//! ```
//!
//! Each capability is an exhaustive match: a new role must decide every one of them.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leading,
    Alternative,
    Standby,
    Recovering,
}

impl Role {
    pub fn accepts_writes(self) -> bool {
        match self {
            Role::Leading => true,
            Role::Alternative | Role::Standby | Role::Recovering => false,
        }
    }

    pub fn is_readable(self) -> bool {
        match self {
            Role::Leading | Role::Alternative => true,
            // A recovering replica serves nothing until it has caught up (invariant 7).
            Role::Standby | Role::Recovering => false,
        }
    }

    pub fn can_be_promoted(self) -> bool {
        match self {
            Role::Alternative | Role::Standby => true,
            Role::Leading | Role::Recovering => false,
        }
    }

    pub fn to_proto(self) -> tandem_proto::v1::Role {
        use tandem_proto::v1::Role as P;
        match self {
            Role::Leading => P::Leading,
            Role::Alternative => P::Alternative,
            Role::Standby => P::Standby,
            Role::Recovering => P::Recovering,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Leading => "leading",
            Role::Alternative => "alternative",
            Role::Standby => "standby",
            Role::Recovering => "recovering",
        })
    }
}
